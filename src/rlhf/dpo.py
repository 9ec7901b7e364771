"""Alignment stage ``dpo``: Direct Preference Optimization (Rafailov et al. 2023) of the SFT
model on ``{prompt, chosen, rejected}`` pairs against itself frozen as the reference.

With ``pi`` the policy, ``ref`` the frozen SFT model and ``log p(y|x)`` the summed log-prob of
a response's tokens, the implicit reward of a response is ``beta * (log pi - log ref)`` and
the loss of a pair is (``eps`` = ``label_smoothing``; the conservative DPO of Mitchell 2023)::

    d    = (log pi(chosen) - log ref(chosen)) - (log pi(rejected) - log ref(rejected))
    loss = -(1 - eps) * log sigmoid(beta * d) - eps * log sigmoid(-beta * d)

With ``eps = 0`` this is TRL's ``DPOTrainer`` ``loss_type="sigmoid"`` (TRL 1.16 computes it
inside ``DPOTrainer._compute_loss``, which needs a Hugging Face causal LM; MARK's Mamba is
not one, so the loss is written here and tested on hand-computed values).

Trained through the shared engine: the reference log-probs are computed once before
training (the reference never changes) and ride in the batches; the checkpoint with the
lowest val DPO loss becomes ``dpo_policy.pt`` (a Mamba LM checkpoint, ``load_mamba`` reads it).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from src.core.logging import get_logger
from src.core.runtime import seed_everything
from src.data.readers import PreferenceExample
from src.mamba.model import MambaLM
from src.mamba.tokenizer import MambaTokenizer
from src.rlhf.checkpoints import fit_best, lm_extra, same_inputs_check, save_lm
from src.rlhf.config import DPOConfig, StageConfig
from src.rlhf.data import PreferenceDataset, PromptFormat, evaluate_in_batches
from src.rlhf.ppo import build_response_batch, response_logprobs
from src.rlhf.reward_model import count_pairs
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


def make_loss(cfg: DPOConfig):
    """The engine's ``loss_fn``: the DPO loss summed over the pairs of a batch (the engine
    divides by the pairs of the whole optimizer step, :func:`count_pairs`)."""

    def loss_fn(model: MambaLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        chosen, rejected = sequence_logprobs(model, batch).chunk(2)
        ref_chosen, ref_rejected = batch["ref_logps"].chunk(2)
        losses, _, _ = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, cfg.beta, cfg.label_smoothing)
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


def train_dpo(
    policy: MambaLM,
    reference: MambaLM,
    tokenizer: MambaTokenizer,
    train_examples: Sequence[PreferenceExample],
    val_examples: Sequence[PreferenceExample],
    stage: StageConfig,
    resume: bool = False,
) -> dict[str, Any]:
    """Optimise ``policy`` (a copy of the SFT model) with the DPO loss against the frozen
    ``reference`` (the SFT model). ``stage.training`` is a :class:`DPOConfig`. Writes the
    engine's checkpoints under ``stage.paths.checkpoint_dir`` and the policy with the lowest
    val DPO loss to ``stage.output_file`` (``dpo_policy.pt``). Returns ``{"metrics", "outputs"}``."""
    cfg: DPOConfig = stage.training
    seed_everything(stage.system.seed)
    fmt = PromptFormat(tokenizer, stage.model.prompt_template, stage.model.max_prompt_tokens, stage.model.max_response_tokens)
    pad_id = tokenizer.pad_id
    reference = reference.eval().requires_grad_(False)
    batch_size = cfg.eval_batch_size or cfg.batch_size
    train_pairs = PreferenceDataset(train_examples[: cfg.max_train_examples], fmt)
    val_pairs = PreferenceDataset(val_examples[: cfg.max_val_examples], fmt)
    train_set = DPODataset(train_pairs, reference_logprobs(reference, train_pairs, pad_id, batch_size))
    val_set = DPODataset(val_pairs, reference_logprobs(reference, val_pairs, pad_id, batch_size))
    log.info("DPO: %d train / %d val preference pairs, beta %g, label smoothing %g",
             len(train_set), len(val_set), cfg.beta, cfg.label_smoothing)

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
        "best_step": int(best["step"]),
        "global_step": result.global_step,
        "train_examples": len(train_set),
        "val_examples": len(val_set),
    }
    save_lm(stage.output_file, policy, tokenizer, stage, metrics)
    log.info("DPO: val loss %.4f, implicit-reward accuracy %.3f: saved %s", metrics["val_loss"], metrics["val_reward_accuracy"], stage.output_file)
    return {"metrics": metrics, "outputs": {"dpo_policy": str(stage.output_file), "checkpoint_dir": str(stage.paths.checkpoint_dir)}}
