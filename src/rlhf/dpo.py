"""Alignment stage ``dpo``: Direct Preference Optimization (Rafailov et al. 2023) of the SFT
model on ``{prompt, chosen, rejected}`` pairs against itself frozen as the reference.

With ``pi`` the policy, ``ref`` the frozen SFT model and ``log p(y|x)`` the summed log-prob of
a response's tokens, the implicit reward of a response is ``beta * (log pi - log ref)`` and
the loss of a pair is (``eps`` = ``label_smoothing``; the conservative DPO of Mitchell 2023)::

    d    = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))
    loss = -(1 - eps) * log sigmoid(beta * d) - eps * log sigmoid(-beta * d)

With ``eps = 0`` this is TRL's ``DPOTrainer`` ``loss_type="sigmoid"`` (TRL 1.16 computes it
inside ``DPOTrainer._compute_loss``, which needs a Hugging Face causal LM; MARK's Mamba is
not one, so the loss is written here and tested on hand-computed values). ``rpo_alpha``
adds ``alpha`` x the chosen answer's mean per-token negative log-likelihood under the policy
(RPO, Pang et al. 2024; TRL's ``rpo_alpha``): it keeps the chosen answers likely, where plain
DPO on a small model lowers both answers' likelihood and its answers drift longer.

``pairs: sampled`` (online / iterative DPO, as in TRL's ``OnlineDPOTrainer`` and Xiong et al.
2024, one round): instead of the dataset's answers, which a small SFT model may be far from,
each prompt of the preference files gets ``num_samples`` answers sampled from the SFT model,
scored by the reward model exactly as PPO scores its rollouts (normalized, minus
``missing_eos_penalty`` for an answer cut before ``<|eos|>``); the best becomes ``chosen`` and
the worst ``rejected``. The val pairs are sampled the same way from the val prompts.

Trained through the shared engine: the reference log-probs are computed once before
training (the reference never changes) and ride in the batches; the checkpoint with the
lowest val DPO loss becomes ``dpo_policy.pt`` (a Mamba LM checkpoint, ``load_mamba`` reads it).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from src.core.logging import get_logger
from src.core.runtime import seed_everything
from src.data.readers import PreferenceExample
from src.mamba.generate import generate_ids
from src.mamba.model import MambaLM
from src.mamba.tokenizer import MambaTokenizer
from src.rlhf.checkpoints import fit_best, lm_extra, same_inputs_check, save_lm
from src.rlhf.config import DPOConfig, StageConfig
from src.rlhf.data import PreferenceDataset, PromptFormat, evaluate_in_batches
from src.rlhf.ppo import build_response_batch, reward_scores, response_logprobs
from src.rlhf.reward_model import count_pairs
from src.training.adapters import frozen_reference
from src.training.engine import TrainTask

KIND = "rlhf_dpo"
log = get_logger(KIND)


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO losses (B,) and the implicit rewards of the chosen and rejected
    responses (B,) each, from summed response log-probs (B,) under the policy and the reference."""
    chosen_logratio = policy_chosen - reference_chosen
    rejected_logratio = policy_rejected - reference_rejected
    logits = beta * (chosen_logratio - rejected_logratio)
    losses = -(1.0 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses, beta * chosen_logratio.detach(), beta * rejected_logratio.detach()


def sequence_logprobs(lm: MambaLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probs (N,) of the response tokens of a batch from :func:`collate_dpo`."""
    logprobs, _, _ = response_logprobs(lm, batch["input_ids"], batch["positions"], batch["targets"])
    return (logprobs * batch["mask"]).sum(-1)


def rpo_nll(chosen_logps: torch.Tensor, chosen_tokens: torch.Tensor) -> torch.Tensor:
    """Per-pair (B,) mean negative log-likelihood per token of the chosen answers, from their
    summed log-probs and token counts: RPO's term, added to the DPO loss x ``rpo_alpha``."""
    return -chosen_logps / chosen_tokens.clamp_min(1)


class DPODataset(Dataset):
    """Item ``i``: ``(prompt_ids, chosen_ids, rejected_ids, ref_chosen_logp, ref_rejected_logp)``."""

    def __init__(self, pairs: PreferenceDataset, reference_logps: torch.Tensor) -> None:
        self.items = [(*pairs[i], float(reference_logps[i, 0]), float(reference_logps[i, 1])) for i in range(len(pairs))]
        self._lengths = pairs.lengths()

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        return self.items[index]

    def lengths(self) -> list[int]:
        return self._lengths


def collate_dpo(items: list, pad_id: int) -> dict[str, torch.Tensor]:
    """2B sequences (rows ``0..B-1`` prompt+chosen, ``B..2B-1`` prompt+rejected) with where
    their responses are, and the reference log-probs ``ref_logps`` (2B,) when the items carry them."""
    prompts = [it[0] for it in items] * 2
    responses = [it[1] for it in items] + [it[2] for it in items]
    rb = build_response_batch(prompts, responses, pad_id)
    batch = {"input_ids": rb.input_ids, "positions": rb.positions, "targets": rb.targets, "mask": rb.mask}
    if len(items[0]) == 5:
        batch["ref_logps"] = torch.tensor([it[3] for it in items] + [it[4] for it in items], dtype=torch.float32)
    return batch


@torch.no_grad()
def reference_logprobs(reference: MambaLM, pairs: PreferenceDataset, pad_id: int, batch_size: int = 32) -> torch.Tensor:
    """(N, 2): summed log-probs of each pair's chosen and rejected response under ``reference``."""
    outputs = evaluate_in_batches(
        reference, pairs, lambda items: collate_dpo(items, pad_id),
        lambda m, b: dict(zip(("chosen", "rejected"), (t.tolist() for t in sequence_logprobs(m, b).chunk(2)))),
        batch_size,
    )
    return torch.tensor([outputs["chosen"], outputs["rejected"]], dtype=torch.float32).T


@torch.no_grad()
def sampled_pairs(
    policy: MambaLM, reward_model, fmt: PromptFormat, prompts: Sequence[str], cfg: DPOConfig, seed: int, batch_size: int = 64
) -> tuple[PreferenceDataset, dict[str, float]]:
    """``pairs: sampled``: for each distinct prompt, ``cfg.num_samples`` answers of ``policy``
    ranked by the reward model (:func:`src.rlhf.ppo.reward_scores`): (prompt, best, worst).
    Prompts whose best and worst scores are within ``cfg.min_score_gap`` give no pair. Every
    draw is seeded by ``seed`` and the batch index. Returns the pairs and their statistics."""
    tokenizer = fmt.tokenizer
    prompt_ids = [fmt.prompt_ids(p) for p in dict.fromkeys(prompts)]
    flat = [ids for ids in prompt_ids for _ in range(cfg.num_samples)]
    responses, scores = [], []
    for start in tqdm(range(0, len(flat), batch_size), desc="DPO pairs: sample + score", unit="batch", leave=False):
        chunk = flat[start : start + batch_size]
        out = generate_ids(policy, chunk, cfg.sample_max_new_tokens, cfg.sample_temperature, 1.0,
                           seed=seed + start // batch_size, eos_id=tokenizer.eos_id)
        responses += out
        scores.append(reward_scores(reward_model, chunk, out, tokenizer, cfg.missing_eos_penalty)[0])
    score = torch.cat(scores).view(len(prompt_ids), cfg.num_samples)
    best, worst = score.argmax(1).tolist(), score.argmin(1).tolist()
    gap = score.max(1).values - score.min(1).values
    items = [
        (ids, responses[i * cfg.num_samples + best[i]], responses[i * cfg.num_samples + worst[i]])
        for i, ids in enumerate(prompt_ids) if float(gap[i]) > cfg.min_score_gap
    ]
    stats = {"prompts": len(prompt_ids), "pairs": len(items), "score_mean": float(score.mean()),
             "chosen_score_mean": float(score.max(1).values.mean()), "rejected_score_mean": float(score.min(1).values.mean())}
    return PreferenceDataset.from_ids(items), stats


def make_loss(cfg: DPOConfig):
    """The engine's ``loss_fn``: the DPO loss summed over the pairs of a batch (the engine
    divides by the pairs of the whole optimizer step, :func:`count_pairs`)."""

    def loss_fn(model: MambaLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = sequence_logprobs(model, batch).chunk(2)
        ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
        losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.label_smoothing)
        if cfg.rpo_alpha:
            losses = losses + cfg.rpo_alpha * rpo_nll(chosen, batch["mask"].chunk(2)[0].sum(-1))
        return losses.sum()

    return loss_fn


def make_eval_step(cfg: DPOConfig):
    """The engine's ``eval_step``: per-pair DPO loss and implicit rewards."""

    def eval_step(model: MambaLM, batch: dict[str, torch.Tensor]) -> dict[str, list]:
        chosen, rejected = sequence_logprobs(model, batch).chunk(2)
        ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
        losses, r_chosen, r_rejected = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.label_smoothing)
        return {"loss": losses.tolist(), "chosen": r_chosen.tolist(), "rejected": r_rejected.tolist()}

    return eval_step


def dpo_metrics(outputs: dict[str, list]) -> dict[str, float]:
    """``val_loss`` (DPO), ``val_reward_accuracy`` (share of pairs whose implicit reward
    ranks chosen above rejected; ties count half) and the mean implicit-reward margin."""
    chosen, rejected = torch.tensor(outputs["chosen"]), torch.tensor(outputs["rejected"])
    margin = chosen - rejected
    return {
        "val_loss": float(torch.tensor(outputs["loss"]).mean()),
        "val_reward_accuracy": float(((margin > 0).float() + 0.5 * (margin == 0).float()).mean()),
        "val_reward_margin": float(margin.mean()),
    }


def implicit_reward_accuracy(
    policy: MambaLM, reference: MambaLM, examples: Sequence[PreferenceExample], fmt: PromptFormat, cfg: DPOConfig, batch_size: int = 32
) -> dict[str, float]:
    """:func:`dpo_metrics` of ``policy`` against ``reference`` on ``examples`` (e.g. the test preferences)."""
    pairs = PreferenceDataset(examples, fmt)
    pad_id = fmt.tokenizer.pad_id
    dataset = DPODataset(pairs, reference_logprobs(reference, pairs, pad_id, batch_size))
    outputs = evaluate_in_batches(policy, dataset, lambda items: collate_dpo(items, pad_id), make_eval_step(cfg), batch_size)
    return dpo_metrics(outputs)


def _reference_data(reference, reward_model, train_examples, val_examples, fmt: PromptFormat, cfg: DPOConfig,
                    stage: StageConfig, batch_size: int) -> tuple["DPODataset", "DPODataset", dict[str, Any]]:
    """The train and val :class:`DPODataset` (pairs with their reference log-probs) and the
    sampling statistics of ``pairs: sampled``."""
    sampling: dict[str, Any] = {}
    if cfg.pairs == "sampled":
        if reward_model is None:
            raise ValueError("training.dpo.pairs: sampled needs the reward model")
        train_pairs, sampling["train"] = sampled_pairs(
            reference, reward_model, fmt, [e.prompt for e in train_examples[: cfg.max_train_examples]], cfg, stage.system.seed)
        val_pairs, sampling["val"] = sampled_pairs(
            reference, reward_model, fmt, [e.prompt for e in val_examples[: cfg.max_val_examples]], cfg, stage.system.seed + 1_000_000)
        log.info("DPO pairs sampled from the SFT model (%d per prompt), ranked by the reward model: %s", cfg.num_samples, sampling)
    else:
        train_pairs = PreferenceDataset(train_examples[: cfg.max_train_examples], fmt)
        val_pairs = PreferenceDataset(val_examples[: cfg.max_val_examples], fmt)
    pad_id = fmt.tokenizer.pad_id
    train_set = DPODataset(train_pairs, reference_logprobs(reference, train_pairs, pad_id, batch_size))
    val_set = DPODataset(val_pairs, reference_logprobs(reference, val_pairs, pad_id, batch_size))
    return train_set, val_set, sampling


def train_dpo(
    policy: MambaLM,
    reference: MambaLM | None,
    tokenizer: MambaTokenizer,
    train_examples: Sequence[PreferenceExample],
    val_examples: Sequence[PreferenceExample],
    stage: StageConfig,
    resume: bool = False,
    reward_model=None,
) -> dict[str, Any]:
    """Optimise ``policy`` (a copy of the SFT model) with the DPO loss against the frozen
    ``reference`` (the SFT model). ``stage.training`` is a :class:`DPOConfig`; with
    ``pairs: sampled`` the pairs are the reference's own answers ranked by ``reward_model``
    (:func:`sampled_pairs`) on the prompts of ``train_examples`` / ``val_examples``. Writes the
    engine's checkpoints under ``stage.paths.checkpoint_dir`` and the policy with the lowest
    val DPO loss to ``stage.output_file`` (``dpo_policy.pt``). Returns ``{"metrics", "outputs"}``.
    ``reference=None``: ``policy`` has a LoRA adapter and the reference is the policy with the
    adapter disabled (the SFT model it is trained on; no second copy in memory)."""
    cfg: DPOConfig = stage.training
    seed_everything(stage.system.seed)
    fmt = PromptFormat(tokenizer, stage.model.prompt_template, stage.model.max_prompt_tokens, stage.model.max_response_tokens)
    pad_id = tokenizer.pad_id
    if reference is not None:
        reference = reference.eval().requires_grad_(False)
    batch_size = cfg.eval_batch_size or cfg.batch_size
    # Everything the reference computes happens before training: the frozen copy, or the
    # policy with its adapter disabled.
    with frozen_reference(policy, reference) as reference:
        train_set, val_set, sampling = _reference_data(reference, reward_model, train_examples, val_examples, fmt, cfg, stage, batch_size)
    log.info("DPO: %d train / %d val preference pairs, beta %g, label smoothing %g, rpo_alpha %s",
             len(train_set), len(val_set), cfg.beta, cfg.label_smoothing, cfg.rpo_alpha)

    task = TrainTask(
        name=KIND,
        kind=KIND,
        model=policy,
        train_dataset=train_set,
        val_dataset=val_set,
        collate_fn=lambda items: collate_dpo(items, pad_id),
        loss_fn=make_loss(cfg),
        count_items=count_pairs,
        eval_step=make_eval_step(cfg),
        compute_metrics=dpo_metrics,
        metric_for_best="val_loss",
        extra_state={**lm_extra(policy, tokenizer), "inputs": dict(stage.inputs)},
        check_resume=same_inputs_check(stage, "DPO"),
        example_lengths=train_set.lengths(),
    )
    result, best = fit_best(task, stage, resume, "DPO")
    metrics = {
        "val_loss": float(best["metrics"]["val_loss"]),
        "val_reward_accuracy": float(best["metrics"]["val_reward_accuracy"]),
        "val_reward_margin": float(best["metrics"]["val_reward_margin"]),
        "beta": cfg.beta,
        "label_smoothing": cfg.label_smoothing,
        "rpo_alpha": cfg.rpo_alpha,
        "pairs": cfg.pairs,
        **({"sampled_pairs": sampling} if sampling else {}),
        "best_step": int(best["step"]),
        "global_step": result.global_step,
        "train_examples": len(train_set),
        "val_examples": len(val_set),
    }
    save_lm(stage.output_file, policy, tokenizer, stage, metrics)
    log.info("DPO: val loss %.4f, implicit-reward accuracy %.3f: saved %s", metrics["val_loss"], metrics["val_reward_accuracy"], stage.output_file)
    return {"metrics": metrics, "outputs": {"dpo_policy": str(stage.output_file), "checkpoint_dir": str(stage.paths.checkpoint_dir)}}
