"""Stage 3, PPO: the SFT model, with a value head, learns to write responses the reward model
scores higher, without drifting far from the SFT model (the frozen reference).

The published algorithm (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
Preferences"; Stiennon et al. 2020; the structure of TRL's PPOTrainer), written for MARK's
Mamba LM, whose recurrent-state generation makes sampling cheap. One iteration:

1. **Rollout**: sample a response to each of ``rollout_batch_size`` training prompts from the
   policy (temperature ``temperature``, top-p 1: the log-probabilities below are of exactly
   the distribution sampled from).
2. **Score**: the reward model scores ``prompt + response`` (normalized; a response cut off
   before ``<|eos|>`` loses ``missing_eos_penalty``). Per-token reward: ``-beta * KL_t``, the
   log-ratio ``log pi(y_t) - log pi_ref(y_t)``, at every response token, plus the score at the
   last one.
3. **Advantages**: GAE(gamma, lambda) over the response tokens with the value head's values;
   returns = advantages + values; advantages whitened over the batch.
4. **Update**: ``ppo_epochs`` passes over the batch in mini-batches: clipped surrogate policy
   loss + ``vf_coef`` x clipped value loss.
5. **KL control**: beta fixed, or adapted towards ``kl.target`` (Ziegler et al. eq. 2).

Its own loop (PPO is not supervised training), with MARK's checkpoint I/O, logging, seeding
and device handling. Every random draw is a function of (seed, iteration), so ``--resume``
from ``checkpoint_step_N.pt`` continues exactly. Delivers ``ppo_policy.pt`` (a Mamba LM
checkpoint with the value head beside it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from src.core.checkpoint import (
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    write_latest_pointer,
)
from src.core.config import config_to_dict, save_config
from src.core.errors import CheckpointError, ConfigError
from src.core.logging import MetricsLogger, setup_logging
from src.core.runtime import capture_rng_state, resolve_device, restore_rng_state, seed_everything
from src.mamba.generate import generate_ids
from src.mamba.model import MambaLM
from src.mamba.tokenizer import MambaTokenizer
from src.rlhf.checkpoints import save_lm
from src.rlhf.config import KLControlConfig, PPOConfig, StageConfig
from src.rlhf.data import PromptFormat, pad_right
from src.rlhf.reward_encoder import EncoderRewardModel
from src.rlhf.reward_model import RewardModel
from src.training.adapters import frozen_reference, load_trainable_state, trainable_state_dict
from src.training.engine import build_optimizer

KIND = "rlhf_ppo"


# ----------------------------------------------------------------------------- KL control


class FixedKLController:
    """beta stays ``coef``."""

    def __init__(self, coef: float) -> None:
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        """No change: the coefficient is fixed."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019), eq. 2: ``e = clip(KL / target - 1, -0.2, 0.2)``,
    ``beta <- beta * (1 + e * n_steps / horizon)``: beta grows while the policy's KL to the
    reference is above the target and shrinks while it is below."""

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        super().__init__(init_coef)
        self.target = target
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """Move beta after a batch of ``n_steps`` responses whose mean KL was ``current_kl``."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


def build_kl_controller(cfg: KLControlConfig) -> FixedKLController:
    """The adaptive or the fixed controller of ``cfg``."""
    if cfg.adaptive:
        return AdaptiveKLController(cfg.init_coef, cfg.target, cfg.horizon)
    return FixedKLController(cfg.init_coef)


# ----------------------------------------------------------------------------- masked statistics


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1."""
    return (values * mask).sum() / mask.sum().clamp_min(1)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``values`` shifted and scaled to mean 0, variance 1 over the masked entries (0 elsewhere)."""
    mean = masked_mean(values, mask)
    variance = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(variance + eps) * mask


# ----------------------------------------------------------------------------- the RL pieces


def per_token_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """KL estimate per sampled token: ``log pi(y_t) - log pi_ref(y_t)``. Its expectation under
    the policy is KL(pi || pi_ref) at that position; summed over a response, the KL of the
    whole response."""
    return logprobs - ref_logprobs


def sequence_kl(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) KL estimate of each response: the per-token estimates summed over its tokens."""
    return (per_token_kl(logprobs, ref_logprobs) * mask).sum(-1)


def compute_rewards(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, kl_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (B, R): ``-kl_coef * KL_t`` at every response token, plus the
    sequence's score (B,) at its last token. Also returns the KL part alone."""
    kl_penalty = -kl_coef * per_token_kl(logprobs, ref_logprobs) * mask
    rewards = kl_penalty.clone()
    last = (mask.sum(-1).long() - 1).clamp_min(0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores
    return rewards, kl_penalty


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over response tokens (Schulman et al. 2016).

    ``rewards``, ``values``, ``mask``: (B, R), responses left-aligned, ``mask`` 1 on real
    tokens. ``delta_t = r_t + gamma * V_{t+1} - V_t`` (V after the last token is 0: the
    episode ends), ``A_t = delta_t + gamma * lam * A_{t+1}``. Returns ``(advantages,
    returns = advantages + values)``, both 0 where ``mask`` is 0.
    """
    length = rewards.shape[1]
    values = values * mask
    advantages = torch.zeros_like(rewards)
    next_advantage = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_mask = mask[:, t + 1] if t + 1 < length else torch.zeros_like(mask[:, 0])
        next_value = values[:, t + 1] * next_mask if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_advantage = delta + gamma * lam * next_advantage * next_mask
        advantages[:, t] = next_advantage
    advantages = advantages * mask
    return advantages, (advantages + values) * mask


def ppo_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip_range: float,
    clip_range_value: float,
    vf_coef: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped objective over the masked response tokens.

    Policy: ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`` with
    ``ratio = exp(logprobs - old_logprobs)``. Value: ``0.5 * max((V - R)^2, (V_clip - R)^2)``
    with ``V_clip`` within ``clip_range_value`` of the old value. Returns
    ``(policy loss + vf_coef * value loss, statistics)``.
    """
    ratio = torch.exp(logprobs - old_logprobs)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    pg_loss = masked_mean(torch.max(pg_unclipped, pg_clipped), mask)

    values_clipped = old_values + torch.clamp(values - old_values, -clip_range_value, clip_range_value)
    vf_unclipped = (values - returns) ** 2
    vf_clipped = (values_clipped - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(vf_unclipped, vf_clipped), mask)

    with torch.no_grad():
        stats = {
            "pg_loss": float(pg_loss),
            "vf_loss": float(vf_loss),
            "pg_clipfrac": float(masked_mean((pg_clipped > pg_unclipped).float(), mask)),
            "vf_clipfrac": float(masked_mean((vf_clipped > vf_unclipped).float(), mask)),
            "approx_kl": float(0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask)),
            "ratio": float(masked_mean(ratio, mask)),
        }
    return pg_loss + vf_coef * vf_loss, stats


# ----------------------------------------------------------------------------- policy and rollouts


def response_logprobs(
    lm: MambaLM, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Log-probabilities of the response tokens ``targets`` (B, R) read at ``positions`` (B, R)
    (the position whose next-token distribution produced each one) of ``input_ids`` (B, T),
    under ``softmax(logits / temperature)``.

    Returns ``(logprobs (B, R), entropy (B, R), hidden (B, R, d_model))``. Only the response
    positions go through the LM head.
    """
    hidden = lm(input_ids, compute_logits=False).hidden_states
    picked = hidden.gather(1, positions[..., None].expand(-1, -1, hidden.shape[-1]))
    logits = lm.lm_head(picked.to(lm.lm_head.weight.dtype)).float() / temperature
    log_dist = torch.log_softmax(logits, dim=-1)
    logprobs = log_dist.gather(-1, targets[..., None]).squeeze(-1)
    entropy = -(log_dist.exp() * log_dist).sum(-1)
    return logprobs, entropy, picked


class PolicyWithValueHead(nn.Module):
    """The policy LM and a linear value head on its final hidden states (TRL's
    ``AutoModelForCausalLMWithValueHead``). The head starts at zero: values start at 0."""

    def __init__(self, lm: MambaLM) -> None:
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.args.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logprobs, values, entropy)``, each (B, R), at the response positions."""
        logprobs, entropy, hidden = response_logprobs(self.lm, input_ids, positions, targets, temperature)
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1).float()
        return logprobs, values, entropy


@dataclass
class ResponseBatch:
    """Prompts + responses as one right-padded batch, and where the responses are.

    ``input_ids`` (B, T): ``prompt + response`` per row; ``positions`` (B, R): the position
    predicting response token j (``len(prompt) - 1 + j``); ``targets`` (B, R): the response
    tokens, left-aligned; ``mask`` (B, R): 1.0 on real response tokens.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor

    def to(self, device: torch.device) -> "ResponseBatch":
        return ResponseBatch(*(t.to(device) for t in (self.input_ids, self.positions, self.targets, self.mask)))

    def rows(self, index: torch.Tensor) -> "ResponseBatch":
        return ResponseBatch(self.input_ids[index], self.positions[index], self.targets[index], self.mask[index])


def build_response_batch(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_id: int) -> ResponseBatch:
    """The :class:`ResponseBatch` of ``prompts[i] + responses[i]`` (every response non-empty)."""
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token")
    input_ids, _ = pad_right([list(p) + list(r) for p, r in zip(prompts, responses)], pad_id)
    targets, lengths = pad_right(responses, pad_id)
    steps = torch.arange(targets.shape[1])
    mask = (steps[None, :] < lengths[:, None]).float()
    starts = torch.tensor([len(p) - 1 for p in prompts], dtype=torch.long)
    # Padded slots point at the last real position (any valid index will do: they are masked).
    positions = torch.minimum(starts[:, None] + steps[None, :], (starts + lengths - 1)[:, None])
    return ResponseBatch(input_ids, positions, targets, mask)


def scored_sequences(
    prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], eos_id: int
) -> tuple[list[list[int]], torch.Tensor]:
    """What the reward model reads: ``prompt + response + <|eos|>`` (the ``<|eos|>`` added
    when the response was cut off), and which responses were cut off (B,) bool."""
    truncated = torch.tensor([len(r) == 0 or r[-1] != eos_id for r in responses])
    sequences = [list(p) + list(r) + ([eos_id] if cut else []) for p, r, cut in zip(prompts, responses, truncated.tolist())]
    return sequences, truncated


def reward_scores(
    reward_model: RewardModel | EncoderRewardModel,
    prompts: Sequence[Sequence[int]],
    responses: Sequence[Sequence[int]],
    tokenizer: MambaTokenizer,
    missing_eos_penalty: float | None = None,
    score_clip: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(normalized scores (B,), truncated (B,))`` of ``responses`` to ``prompts`` under the
    reward model, with the missing-``<|eos|>`` penalty and clipping of ``PPOConfig``."""
    truncated = torch.tensor([len(r) == 0 or r[-1] != tokenizer.eos_id for r in responses])
    # Each backbone reads the responses its own way: the Mamba RM as ids, the encoder as decoded text.
    raw = reward_model.score_responses(prompts, responses, tokenizer)
    scores = reward_model.normalized(raw.to(reward_model.score_mean.device)).cpu()
    if missing_eos_penalty:
        scores = scores - missing_eos_penalty * truncated.float()
    if score_clip:
        scores = scores.clamp(-score_clip, score_clip)
    return scores, truncated


@dataclass
class Rollout:
    """One iteration's samples and everything PPO computes from them (tensors on the device)."""

    batch: ResponseBatch
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    kl: torch.Tensor  # (B,) KL estimate of each response
    truncated: torch.Tensor
    response_lengths: torch.Tensor


@torch.no_grad()
def collect_rollout(
    policy: PolicyWithValueHead,
    reference: MambaLM | None,
    reward_model: RewardModel,
    tokenizer: MambaTokenizer,
    prompts: Sequence[Sequence[int]],
    cfg: PPOConfig,
    kl_coef: float,
    seed: int,
) -> Rollout:
    """Sample a response to each prompt, score it, and compute rewards, advantages and returns."""
    device = next(policy.parameters()).device
    # The weights are fixed during a rollout: the default decoder (the native kernel on the
    # CPU) packs them again after each update, which costs ~2 ms against ~30% less CPU than the
    # eager step for a demo rollout (32 answers; tests/rlhf/test_ppo.py checks the same samples).
    responses = generate_ids(
        policy.lm, prompts, cfg.max_new_tokens, cfg.temperature, 1.0, seed=seed, eos_id=tokenizer.eos_id
    )
    scores, truncated = reward_scores(reward_model, prompts, responses, tokenizer, cfg.missing_eos_penalty, cfg.score_clip)
    batch = build_response_batch(prompts, responses, tokenizer.pad_id).to(device)
    policy.eval()
    logprobs, values, _ = policy(batch.input_ids, batch.positions, batch.targets, cfg.temperature)
    with frozen_reference(policy.lm, reference) as ref:  # reference None: the policy with its adapter disabled
        ref_logprobs, _, _ = response_logprobs(ref, batch.input_ids, batch.positions, batch.targets, cfg.temperature)
    mask = batch.mask
    scores = scores.to(device)
    rewards, _ = compute_rewards(scores, logprobs, ref_logprobs, mask, kl_coef)
    advantages, returns = compute_gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask)
    return Rollout(
        batch=batch, logprobs=logprobs, ref_logprobs=ref_logprobs, values=values, scores=scores,
        rewards=rewards, advantages=advantages, returns=returns, kl=sequence_kl(logprobs, ref_logprobs, mask),
        truncated=truncated, response_lengths=mask.sum(-1),
    )


def ppo_update(
    policy: PolicyWithValueHead,
    optimizer: torch.optim.Optimizer,
    rollout: Rollout,
    cfg: PPOConfig,
    generator: torch.Generator,
) -> dict[str, float]:
    """``ppo_epochs`` passes of clipped-objective mini-batch steps over ``rollout``; returns the
    mean statistics (losses, clip fractions, approximate KL to the rollout policy, entropy)."""
    policy.train()
    size = rollout.batch.input_ids.shape[0]
    totals: dict[str, float] = {}
    updates = 0
    params = [p for p in policy.parameters() if p.requires_grad]
    for _ in range(cfg.ppo_epochs):
        order = torch.randperm(size, generator=generator).to(rollout.batch.input_ids.device)
        for start in range(0, size, cfg.mini_batch_size):
            rows = order[start : start + cfg.mini_batch_size]
            mb = rollout.batch.rows(rows)
            logprobs, values, entropy = policy(mb.input_ids, mb.positions, mb.targets, cfg.temperature)
            loss, stats = ppo_loss(
                logprobs, rollout.logprobs[rows], rollout.advantages[rows], values, rollout.values[rows],
                rollout.returns[rows], mb.mask, cfg.clip_range, cfg.clip_range_value, cfg.vf_coef,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.max_grad_norm > 0:
                stats["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            stats["entropy"] = float(masked_mean(entropy.detach(), mb.mask))
            for key, value in stats.items():
                totals[key] = totals.get(key, 0.0) + value
            updates += 1
    return {key: value / updates for key, value in totals.items()}


# ----------------------------------------------------------------------------- the trainer


def _prompt_order(num_prompts: int, seed: int, step: int, batch_size: int) -> list[int]:
    """The prompts of iteration ``step``: consecutive slices of per-epoch permutations, so every
    prompt is used once before any repeats; a function of (seed, step) only."""
    per_epoch = max(1, num_prompts // batch_size)
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(num_prompts, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch)).tolist()
    return order[slot * batch_size : (slot + 1) * batch_size]


def _save_resumable(path: Path, policy, optimizer, kl_ctl, step: int, stage: StageConfig, history: list) -> Path:
    save_checkpoint(
        {
            "kind": KIND,
            "model": {k: v.detach().cpu() for k, v in trainable_state_dict(policy).items()},  # an adapter: it + value head
            "optimizer": optimizer.state_dict(),
            "kl_controller": kl_ctl.state_dict(),
            "rng": capture_rng_state(),
            "progress": {"step": step},
            "inputs": dict(stage.inputs),
            "config": config_to_dict(stage),
            "history": history,
        },
        path,
    )
    write_latest_pointer(path.parent, path, step)
    for old in path.parent.glob("checkpoint_step_*.pt"):  # keep only the newest
        if old != path:
            old.unlink(missing_ok=True)
    return path


def train_ppo(
    policy_lm: MambaLM,
    reference: MambaLM | None,
    reward_model: RewardModel,
    tokenizer: MambaTokenizer,
    prompts: Sequence[str],
    stage: StageConfig,
    resume: bool = False,
) -> dict[str, Any]:
    """Optimise ``policy_lm`` (a copy of the SFT model) with PPO against ``reward_model``, with
    a KL penalty to ``reference`` (the frozen SFT model), on the training ``prompts``.

    ``reference=None``: ``policy_lm`` has a LoRA adapter and the reference is ``policy_lm`` with
    the adapter disabled (no second copy of the model); the value head trains beside the adapter.
    ``stage.training`` is a :class:`PPOConfig`. Writes ``checkpoint_step_N.pt`` under
    ``stage.paths.checkpoint_dir`` (every ``save_steps`` and at the end), logs to
    ``stage.paths.log_dir``, and delivers ``stage.output_file`` (``ppo_policy.pt``).
    Returns ``{"metrics": ..., "outputs": ...}`` with the last iterations' averages.
    """
    cfg: PPOConfig = stage.training
    ckpt_dir, log_dir = Path(stage.paths.checkpoint_dir), Path(stage.paths.log_dir)
    log = setup_logging(KIND, log_dir)
    device = resolve_device(stage.system.device)
    seed_everything(stage.system.seed)

    policy = PolicyWithValueHead(policy_lm).to(device)
    if reference is not None:
        reference = reference.to(device).eval().requires_grad_(False)
    reward_model = reward_model.to(device).eval().requires_grad_(False)
    fmt = PromptFormat(tokenizer, stage.model.prompt_template, stage.model.max_prompt_tokens, stage.model.max_response_tokens)
    prompt_ids = [fmt.prompt_ids(p) for p in prompts]
    if len(prompt_ids) < cfg.rollout_batch_size:
        raise ConfigError(f"training.ppo.rollout_batch_size: {cfg.rollout_batch_size} is more than the {len(prompt_ids)} training prompts")
    optimizer = build_optimizer(policy, cfg.learning_rate, cfg.weight_decay)
    kl_ctl = build_kl_controller(cfg.kl)
    start_step, history = 0, []

    if resume:
        latest = find_latest_checkpoint(ckpt_dir, "checkpoint_step_*.pt")
        if latest is None:
            log.warning("--resume: no PPO checkpoint in %s, starting from the SFT model", ckpt_dir)
        else:
            state = load_checkpoint(latest, kind=KIND)
            if state.get("inputs") != stage.inputs:
                raise CheckpointError(f"{latest}: this PPO checkpoint started from other inputs (SFT or reward model); run without --resume")
            if int(state["progress"]["step"]) > cfg.num_steps:
                raise CheckpointError(
                    f"{latest}: it is at iteration {state['progress']['step']}, past training.ppo.num_steps="
                    f"{cfg.num_steps}; raise num_steps or run without --resume"
                )
            load_trainable_state(policy, state["model"], latest)
            optimizer.load_state_dict(state["optimizer"])
            kl_ctl.load_state_dict(state["kl_controller"])
            restore_rng_state(state["rng"])
            start_step, history = int(state["progress"]["step"]), list(state.get("history", []))
            log.info("resumed PPO from %s at iteration %d (beta %.4f)", latest, start_step, kl_ctl.value)

    ckpt_dir.mkdir(parents=True, exist_ok=True)
    save_config(stage, ckpt_dir / "config.yaml")
    metrics_log = MetricsLogger(
        log_dir, KIND, use_tensorboard=stage.system.use_tensorboard, use_wandb=stage.system.use_wandb,
        wandb_project=stage.system.wandb_project, config=config_to_dict(stage),
    )
    log.info(
        "PPO: %d prompts, %d iterations of %d responses (%d epochs x mini-batches of %d), beta %.3f (%s, target KL %.1f), device %s",
        len(prompt_ids), cfg.num_steps, cfg.rollout_batch_size, cfg.ppo_epochs, cfg.mini_batch_size, kl_ctl.value,
        "adaptive" if cfg.kl.adaptive else "fixed", cfg.kl.target, device,
    )
    progress = tqdm(total=cfg.num_steps, initial=start_step, desc=f"train {KIND}", dynamic_ncols=True)
    for step in range(start_step, cfg.num_steps):
        started = time.perf_counter()
        step_seed = stage.system.seed * 1_000_003 + step
        batch_prompts = [prompt_ids[i] for i in _prompt_order(len(prompt_ids), stage.system.seed, step, cfg.rollout_batch_size)]
        kl_coef = kl_ctl.value
        rollout = collect_rollout(policy, reference, reward_model, tokenizer, batch_prompts, cfg, kl_coef, step_seed)
        stats = ppo_update(policy, optimizer, rollout, cfg, torch.Generator().manual_seed(step_seed))
        mean_kl = float(rollout.kl.mean())
        kl_ctl.update(mean_kl, cfg.rollout_batch_size)
        record = {
            "score": float(rollout.scores.mean()),
            "reward": float(rollout.scores.mean()) - kl_coef * mean_kl,
            "kl": mean_kl,
            "kl_coef": kl_coef,
            "response_length": float(rollout.response_lengths.mean()),
            "truncated_rate": float(rollout.truncated.float().mean()),
            "value_mean": float(masked_mean(rollout.values, rollout.batch.mask)),
            "return_mean": float(masked_mean(rollout.returns, rollout.batch.mask)),
            **stats,
            "seconds": time.perf_counter() - started,
        }
        history.append({"step": step + 1, **record})
        progress.update(1)
        progress.set_postfix(score=f"{record['score']:.3f}", kl=f"{mean_kl:.2f}", beta=f"{kl_coef:.3f}")
        if (step + 1) % cfg.log_steps == 0 or step + 1 == cfg.num_steps:
            metrics_log.log_metrics(record, step + 1, kind="train")
            log.info(
                "iteration %d/%d | score %.3f | KL %.3f | beta %.4f | reward %.3f | length %.1f | pg %.4f | vf %.4f | clip %.3f",
                step + 1, cfg.num_steps, record["score"], mean_kl, kl_coef, record["reward"],
                record["response_length"], stats["pg_loss"], stats["vf_loss"], stats["pg_clipfrac"],
            )
        if cfg.save_steps and (step + 1) % cfg.save_steps == 0 and step + 1 < cfg.num_steps:
            _save_resumable(ckpt_dir / f"checkpoint_step_{step + 1}.pt", policy, optimizer, kl_ctl, step + 1, stage, history)
    progress.close()
    last = ckpt_dir / f"checkpoint_step_{cfg.num_steps}.pt"
    if start_step < cfg.num_steps or not last.exists():
        _save_resumable(last, policy, optimizer, kl_ctl, cfg.num_steps, stage, history)
    metrics_log.close()

    # Averages over the last quarter of the run: a single iteration's batch is noisy.
    tail = history[-max(1, len(history) // 4) :] if history else []
    first = history[: max(1, len(history) // 4)] if history else []

    def mean_of(rows: list[dict], key: str) -> float:
        return float(sum(r[key] for r in rows) / len(rows)) if rows else float("nan")

    metrics = {
        "iterations": cfg.num_steps,
        "score_first_quarter": mean_of(first, "score"),
        "score_last_quarter": mean_of(tail, "score"),
        "kl_last_quarter": mean_of(tail, "kl"),
        "kl_coef_final": kl_ctl.value,
        "kl_target": cfg.kl.target,
        "response_length_last_quarter": mean_of(tail, "response_length"),
    }
    save_lm(
        stage.output_file, policy.lm, tokenizer, stage, metrics,
        value_head={k: v.detach().cpu() for k, v in policy.value_head.state_dict().items()},
        history=history,
    )
    log.info("PPO done: score %.3f -> %.3f, KL %.3f (target %.1f): saved %s", metrics["score_first_quarter"],
             metrics["score_last_quarter"], metrics["kl_last_quarter"], cfg.kl.target, stage.output_file)
    return {
        "metrics": metrics,
        "outputs": {"ppo_policy": str(stage.output_file), "checkpoint_dir": str(ckpt_dir),
                    "metrics_log": str(log_dir / "metrics.jsonl")},
    }
