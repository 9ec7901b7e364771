"""Stage 2, the reward model: a scalar head on the Mamba backbone, trained with the
Bradley-Terry pairwise loss ``-log sigmoid(r(chosen) - r(rejected))`` on ``{prompt, chosen,
rejected}`` pairs (Stiennon et al. 2020; TRL's RewardTrainer).

The score of a sequence is the head applied to the backbone's final hidden state at its last
token (``<|eos|>`` for a finished response): a Mamba reads left to right, so that state has
seen the prompt and the whole response. Trained through the shared engine; the best model by
held-out pairwise loss becomes ``reward_model.pt``, with the mean and spread of its
training scores so that PPO sees a centred, unit-scale reward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from src.core.checkpoint import load_checkpoint, save_checkpoint
from src.core.config import config_to_dict
from src.core.errors import CheckpointError
from src.core.logging import get_logger
from src.core.runtime import seed_everything
from src.data.readers import PreferenceExample
from src.mamba.load import build_lm
from src.mamba.model import MambaLM
from src.mamba.tokenizer import MambaTokenizer
from src.rlhf.checkpoints import fit_best, lm_extra, same_inputs_check, stage_record
from src.rlhf.config import RewardConfig, StageConfig
from src.rlhf.data import PreferenceDataset, PromptFormat, collate_preferences, evaluate_in_batches, pad_right
from src.training.adapters import load_trainable_state, trainable_state_dict
from src.training.engine import TrainTask

KIND = "rlhf_reward"
log = get_logger(KIND)


class RewardModel(nn.Module):
    """A Mamba LM's backbone with a linear scalar head on the last token's hidden state.

    ``score_mean`` / ``score_std`` (buffers, saved with the weights) turn raw scores into
    normalized ones: :meth:`normalized` is ``(score - mean) / std``.
    """

    backbone = "mamba"

    def __init__(self, lm: MambaLM) -> None:
        super().__init__()
        self.lm = lm
        self.head = nn.Linear(lm.args.d_model, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (lm.args.d_model + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("score_mean", torch.zeros(()))
        self.register_buffer("score_std", torch.ones(()))

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Raw scores (B,) of right-padded sequences ``input_ids`` (B, T) of ``lengths`` (B,)."""
        hidden = self.lm(input_ids, compute_logits=False).hidden_states
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), lengths - 1]
        return self.head(last.to(self.head.weight.dtype)).squeeze(-1).float()

    def normalized(self, scores: torch.Tensor) -> torch.Tensor:
        return (scores - self.score_mean) / self.score_std

    @torch.no_grad()
    def score_sequences(self, sequences: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32) -> torch.Tensor:
        """Raw scores of token-id sequences (each ``<|bos|> prompt response [<|eos|>]``), on CPU."""
        device = self.head.weight.device
        was_training = self.training
        self.eval()
        scores = []
        for start in range(0, len(sequences), batch_size):
            ids, lengths = pad_right(sequences[start : start + batch_size], pad_id)
            scores.append(self(ids.to(device), lengths.to(device)).cpu())
        self.train(was_training)
        return torch.cat(scores)


    @torch.no_grad()
    def score_responses(self, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], tokenizer: MambaTokenizer) -> torch.Tensor:
        """Raw scores of responses (token ids) to prompts (``<|bos|> templated prompt`` ids):
        each read as ``prompt + response + <|eos|>`` (the ``<|eos|>`` added to a response cut off)."""
        sequences = [
            list(p) + list(r) + ([] if r and r[-1] == tokenizer.eos_id else [tokenizer.eos_id])
            for p, r in zip(prompt_ids, response_ids)
        ]
        return self.score_sequences(sequences, tokenizer.pad_id)


def pairwise_loss(model: RewardModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bradley-Terry loss of a preference batch (chosen rows first, then rejected rows)."""
    scores = model(batch["input_ids"], batch["lengths"])
    chosen, rejected = scores.chunk(2)
    return -F.logsigmoid(chosen - rejected).mean()


def pairwise_loss_sum(model: RewardModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Bradley-Terry loss summed over the pairs of ``batch``; the engine divides by the pairs
    of the whole optimizer step (:func:`count_pairs`)."""
    scores = model(batch["input_ids"], batch["lengths"])
    chosen, rejected = scores.chunk(2)
    return -F.logsigmoid(chosen - rejected).sum()


def count_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Preference pairs in ``batch`` (chosen rows first, then as many rejected rows)."""
    return int(batch["input_ids"].shape[0]) // 2


def _eval_step(model: RewardModel, batch: dict[str, torch.Tensor]) -> dict[str, list]:
    chosen, rejected = model(batch["input_ids"], batch["lengths"]).chunk(2)
    return {"chosen": chosen.tolist(), "rejected": rejected.tolist()}


def pairwise_metrics(outputs: dict[str, list]) -> dict[str, float]:
    """``val_accuracy`` (share of pairs scored chosen > rejected; ties count half),
    ``val_loss`` (Bradley-Terry) and the mean score margin."""
    chosen, rejected = torch.tensor(outputs["chosen"]), torch.tensor(outputs["rejected"])
    margin = chosen - rejected
    accuracy = ((margin > 0).float() + 0.5 * (margin == 0).float()).mean()
    return {
        "val_accuracy": float(accuracy),
        "val_loss": float(-F.logsigmoid(margin).mean()),
        "val_margin": float(margin.mean()),
    }


def evaluate_pairs(model: RewardModel, dataset: PreferenceDataset, pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """:func:`pairwise_metrics` of ``model`` on ``dataset``."""
    outputs = evaluate_in_batches(model, dataset, lambda items: collate_preferences(items, pad_id), _eval_step, batch_size)
    return pairwise_metrics(outputs)


def train_reward_model(
    backbone: MambaLM,
    tokenizer: MambaTokenizer,
    train_examples: Sequence[PreferenceExample],
    val_examples: Sequence[PreferenceExample],
    stage: StageConfig,
    resume: bool = False,
) -> dict[str, Any]:
    """Train a :class:`RewardModel` on ``backbone`` (the SFT or base LM) with the pairwise loss.

    ``stage.training`` is a :class:`RewardConfig`. Writes the engine's checkpoints under
    ``stage.paths.checkpoint_dir`` and the model with the lowest held-out pairwise loss to
    ``stage.output_file`` (``reward_model.pt``). Returns ``{"metrics": ..., "outputs": ...}``.
    """
    cfg: RewardConfig = stage.training
    seed_everything(stage.system.seed)
    model = RewardModel(backbone)
    fmt = PromptFormat(tokenizer, stage.model.prompt_template, stage.model.max_prompt_tokens, stage.model.max_response_tokens)
    train_set = PreferenceDataset(train_examples[: cfg.max_train_examples], fmt)
    val_set = PreferenceDataset(val_examples[: cfg.max_val_examples], fmt)
    pad_id = tokenizer.pad_id
    log.info("reward model: %d train / %d val preference pairs, backbone from %s", len(train_set), len(val_set), cfg.init_from)


    task = TrainTask(
        name=KIND,
        kind=KIND,
        model=model,
        train_dataset=train_set,
        val_dataset=val_set,
        collate_fn=lambda items: collate_preferences(items, pad_id),
        loss_fn=pairwise_loss_sum,
        count_items=count_pairs,
        eval_step=_eval_step,
        compute_metrics=pairwise_metrics,
        # Held-out Bradley-Terry loss picks the best checkpoint: on a few hundred pairs it is a
        # smoother criterion than accuracy (which is reported).
        metric_for_best="val_loss",
        extra_state={**lm_extra(backbone, tokenizer), "inputs": dict(stage.inputs)},
        check_resume=same_inputs_check(stage, "reward-model"),
        example_lengths=train_set.lengths(),
    )
    result, best = fit_best(task, stage, resume, "reward-model")

    # Centre on the human-preferred (chosen) responses and scale by the spread of all scores
    # (Stiennon et al. normalise so that reference summaries score 0): beta then means the same
    # thing whatever scale the head ended up with.
    pairs = [train_set[i] for i in range(min(len(train_set), cfg.normalization_examples))]
    chosen = model.score_sequences([p + c for p, c, _ in pairs], pad_id)
    rejected = model.score_sequences([p + r for p, _, r in pairs], pad_id)
    model.score_mean.fill_(float(chosen.mean()))
    model.score_std.fill_(float(torch.cat([chosen, rejected]).std().clamp_min(1e-6)))

    metrics = {
        "val_accuracy": float(best["metrics"]["val_accuracy"]),
        "val_loss": float(best["metrics"]["val_loss"]),
        "val_margin": float(best["metrics"]["val_margin"]),
        "train_accuracy_sample": float((chosen > rejected).float().mean()),
        "score_mean": float(model.score_mean),
        "score_std": float(model.score_std),
        "best_step": int(best["step"]),
        "global_step": result.global_step,
        "train_examples": len(train_set),
        "val_examples": len(val_set),
    }
    save_reward_model(stage.output_file, model, tokenizer, stage, metrics)
    log.info("reward model: held-out pairwise accuracy %.3f: saved %s", metrics["val_accuracy"], stage.output_file)
    return {
        "metrics": metrics,
        "outputs": {"reward_model": str(stage.output_file), "checkpoint_dir": str(stage.paths.checkpoint_dir)},
    }


def save_reward_model(
    path: Path, model: RewardModel, tokenizer: MambaTokenizer, stage: StageConfig, metrics: dict[str, Any]
) -> Path:
    """Write ``reward_model.pt`` (kind ``rlhf_reward``): weights, architecture, tokenizer, record."""
    return save_checkpoint(
        {
            "kind": KIND,
            "model": {k: v.detach().cpu() for k, v in trainable_state_dict(model).items()},  # adapter: it + head
            "extra": lm_extra(model.lm, tokenizer),
            "config": config_to_dict(stage),
            "rlhf": stage_record(stage, metrics),
        },
        path,
    )


def load_reward_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[RewardModel, MambaTokenizer]:
    """``(reward model, tokenizer)`` from a Mamba-backbone ``reward_model.pt``, in eval mode on
    ``device`` (:func:`src.rlhf.load.load_reward_model` reads either backbone)."""
    state = load_checkpoint(path, map_location="cpu", kind=KIND)
    extra = state.get("extra") or {}
    if extra.get("backbone") == "encoder":
        raise CheckpointError(f"{path}: an encoder reward model; load it with src.rlhf.load.load_reward_model")
    if "model_args" not in extra or "tokenizer_json" not in extra:
        raise CheckpointError(f"{path}: not a complete reward-model checkpoint (architecture or tokenizer missing)")
    model = RewardModel(build_lm(extra, path))
    load_trainable_state(model, state["model"], path)
    tokenizer = MambaTokenizer.from_str(extra["tokenizer_json"], str(path))
    return model.to(device).eval(), tokenizer
