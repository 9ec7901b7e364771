"""Stage 1, supervised fine-tuning: the base Mamba LM learns to answer ``{prompt, response}``
pairs, with the loss on the response tokens only (the prompt is context, not a target).

Trained through the shared engine (:func:`src.training.engine.fit`), so resume, checkpoints,
best model, progress bar and logs work as for every component. Delivers ``sft_model.pt``, a
Mamba LM checkpoint (``load_mamba`` reads it).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from src.core.logging import get_logger
from src.core.runtime import seed_everything
from src.data.readers import SFTExample
from src.mamba.data import IGNORE_INDEX
from src.mamba.model import MambaLM
from src.mamba.tokenizer import MambaTokenizer
from src.rlhf.checkpoints import fit_best, lm_extra, same_inputs_check, save_lm
from src.rlhf.config import SFTConfig, StageConfig
from src.rlhf.data import PromptFormat, SFTDataset, collate_sft, evaluate_in_batches
from src.training.engine import TrainTask

KIND = "rlhf_sft"  # the engine's checkpoints of this stage
log = get_logger(KIND)


def response_loss(model: MambaLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over the response tokens of ``batch`` (labels of prompt
    and padding positions are ``IGNORE_INDEX`` and left out)."""
    logits = model(batch["input_ids"]).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX)


def response_loss_sum(model: MambaLM, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the response tokens of ``batch``: the engine
    divides by the response tokens of the whole optimizer step (:func:`count_response_tokens`),
    so responses of different lengths weigh per token, however they fall into micro-batches."""
    logits = model(batch["input_ids"]).logits
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )


def count_response_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The items :func:`response_loss_sum` sums over: labelled (response) tokens."""
    return int((batch["labels"] != IGNORE_INDEX).sum())


def _eval_step(model: MambaLM, batch: dict[str, torch.Tensor]) -> dict[str, list]:
    logits = model(batch["input_ids"]).logits
    labels = batch["labels"]
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    return {"loss_sum": losses.sum(1).tolist(), "tokens": (labels != IGNORE_INDEX).sum(1).tolist()}


def _metrics(outputs: dict[str, list]) -> dict[str, float]:
    val_loss = sum(outputs["loss_sum"]) / max(1, sum(outputs["tokens"]))
    return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0))}


def evaluate_response_loss(model: MambaLM, dataset: SFTDataset, pad_id: int, batch_size: int = 32) -> dict[str, float]:
    """``{"val_loss", "val_perplexity"}`` of ``model`` on the response tokens of ``dataset``."""
    outputs = evaluate_in_batches(model, dataset, lambda items: collate_sft(items, pad_id), _eval_step, batch_size)
    return _metrics(outputs)


def train_sft(
    model: MambaLM,
    tokenizer: MambaTokenizer,
    train_examples: Sequence[SFTExample],
    val_examples: Sequence[SFTExample],
    stage: StageConfig,
    resume: bool = False,
) -> dict[str, Any]:
    """Fine-tune ``model`` (the base LM) on the response tokens of ``train_examples``.

    ``stage.training`` is an :class:`SFTConfig`. Writes the engine's checkpoints under
    ``stage.paths.checkpoint_dir`` and the best model by response val loss to
    ``stage.output_file`` (``sft_model.pt``). Returns ``{"metrics": ..., "outputs": ...}``
    with the val loss before (base model) and after fine-tuning.
    """
    cfg: SFTConfig = stage.training
    seed_everything(stage.system.seed)
    fmt = PromptFormat(tokenizer, stage.model.prompt_template, stage.model.max_prompt_tokens, stage.model.max_response_tokens)
    train_set = SFTDataset(train_examples[: cfg.max_train_examples], fmt)
    val_set = SFTDataset(val_examples[: cfg.max_val_examples], fmt)
    pad_id = tokenizer.pad_id

    before = evaluate_response_loss(model, val_set, pad_id, cfg.eval_batch_size or cfg.batch_size)
    log.info("SFT: %d train / %d val pairs; base model response val loss %.4f", len(train_set), len(val_set), before["val_loss"])


    task = TrainTask(
        name=KIND,
        kind=KIND,
        model=model,
        train_dataset=train_set,
        val_dataset=val_set,
        collate_fn=lambda items: collate_sft(items, pad_id),
        loss_fn=response_loss_sum,
        count_items=count_response_tokens,
        eval_step=_eval_step,
        compute_metrics=_metrics,
        extra_state={**lm_extra(model, tokenizer), "inputs": dict(stage.inputs)},
        check_resume=same_inputs_check(stage, "SFT"),
        count_tokens=count_response_tokens,
        example_lengths=train_set.lengths(),
    )
    result, best = fit_best(task, stage, resume, "SFT")
    metrics = {
        "val_loss": float(best["metrics"]["val_loss"]),
        "val_perplexity": float(best["metrics"]["val_perplexity"]),
        "base_val_loss": before["val_loss"],
        "base_val_perplexity": before["val_perplexity"],
        "best_step": int(best["step"]),
        "global_step": result.global_step,
        "train_examples": len(train_set),
        "val_examples": len(val_set),
    }
    save_lm(stage.output_file, model, tokenizer, stage, metrics)
    log.info("SFT response val loss %.4f (base %.4f): saved %s", metrics["val_loss"], before["val_loss"], stage.output_file)
    return {
        "metrics": metrics,
        "outputs": {"sft_model": str(stage.output_file), "checkpoint_dir": str(stage.paths.checkpoint_dir)},
    }
