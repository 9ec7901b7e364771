"""Training recipe of the Mamba language model, top to bottom:

read documents -> tokenizer (trained, the checkpoint's on --resume, or a pretrained model's)
-> packed windows -> unigram baseline -> model (new, or ``model.pretrained``'s weights) -> shared engine (:func:`src.training.engine.fit`) -> summary.

Everything that can be wrong with the input (empty corpus, a document without text, a
``vocab.json`` or config that does not belong to the checkpoint being resumed) is checked
before the first file is written, so a refused run leaves the output folders as they were.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from src.core.checkpoint import find_latest_checkpoint, load_checkpoint
from src.core.errors import CheckpointError
from src.core.logging import get_logger
from src.core.runtime import seed_everything
from src.data.readers import read_documents
from src.mamba.config import MambaTrainConfig
from src.mamba.data import TokenWindows, collate_windows, pack_documents
from src.mamba.evaluate import kneser_ney_cross_entropy, unigram_cross_entropy
from src.mamba.loss import IGNORE_INDEX
from src.mamba.model import ADAPTER_REFUSED_TARGETS as REFUSED_TARGETS
from src.mamba.model import MambaArgs, MambaLM
from src.mamba.pretrained import load_pretrained, resolve_folder, yaml_overrides
from src.mamba.tokenizer import MambaTokenizer
from src.training.adapters import adapter_info, apply_adapter, count_parameters
from src.training.engine import TrainTask, fit

KIND = "mamba"  # checkpoint kind: load_checkpoint(..., kind="mamba") refuses other models' files
VOCAB_FILE = "vocab.json"
log = get_logger(KIND)


def model_args_from_config(cfg: MambaTrainConfig, vocab_size: int) -> MambaArgs:
    """The architecture for ``cfg.model`` with the tokenizer's real vocabulary size."""
    m = cfg.model
    return MambaArgs(
        vocab_size=vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads,
        state_size=m.state_size, expand=m.expand, n_groups=m.n_groups, conv_kernel=m.conv_kernel,
        chunk_size=m.chunk_size, tie_embeddings=m.tie_embeddings,
    )


def resume_tokenizer(checkpoint_dir: Path) -> tuple[MambaTokenizer, dict, Path] | None:
    """On ``--resume``: the tokenizer of the latest checkpoint, checked against ``vocab.json``.

    Returns (tokenizer, the checkpoint's extra state, its path), or None when there is no
    checkpoint to resume. A ``vocab.json`` that differs from the checkpoint's tokenizer is a
    ``CheckpointError``; a missing one is restored from the checkpoint later.
    """
    latest = find_latest_checkpoint(checkpoint_dir)
    if latest is None:
        return None
    extra = load_checkpoint(latest, kind=KIND).get("extra", {})
    if "tokenizer_json" not in extra:
        raise CheckpointError(f"{latest}: no tokenizer stored in the checkpoint")
    tokenizer = MambaTokenizer.from_str(extra["tokenizer_json"], str(latest))
    vocab_path = checkpoint_dir / VOCAB_FILE
    if vocab_path.is_file():
        on_disk = MambaTokenizer.from_file(vocab_path)
        if on_disk.fingerprint() != extra.get("tokenizer_sha256"):
            raise CheckpointError(
                f"{vocab_path} is not the tokenizer of {latest.name} (sha256 {on_disk.fingerprint()[:12]} != "
                f"{str(extra.get('tokenizer_sha256'))[:12]}): it belongs to another model; restore the vocab.json "
                "written with that checkpoint, or train from scratch without --resume"
            )
    return tokenizer, extra, latest


def build_task(cfg: MambaTrainConfig, resume: bool = False) -> tuple[TrainTask, dict[str, Any]]:
    """Everything :func:`fit` needs, plus facts for the summary (token counts, baseline).

    Reads and checks all inputs; writes nothing.
    """
    ckpt_dir = Path(cfg.paths.checkpoint_dir)
    train_docs = read_documents(cfg.data.train_file)
    val_docs = read_documents(cfg.data.val_file)

    resumed = resume_tokenizer(ckpt_dir) if resume else None
    pretrained_model = None
    if cfg.model.pretrained:
        pretrained_model, pretrained_tokenizer, pretrained = load_pretrained(
            cfg.model.pretrained, cfg.model.tokenizer, cfg.model.chunk_size, cfg.model.gradient_checkpointing
        )
        overrides = yaml_overrides(cfg.model, pretrained.args)
        if overrides:
            log.info("model.pretrained overrides the config: %s",
                     ", ".join(f"{k} {yaml} -> {ckpt}" for k, (yaml, ckpt) in overrides.items()))
    if resumed is not None:
        tokenizer, extra, latest = resumed
        log.info("resuming with the tokenizer of %s (%d tokens)", latest, tokenizer.vocab_size)
    elif pretrained_model is not None:
        tokenizer = pretrained_tokenizer
    elif cfg.model.tokenizer:
        tokenizer = MambaTokenizer.from_pretrained(resolve_folder(cfg.model.tokenizer, "model.tokenizer"), "model.tokenizer")
        log.info("tokenizer from %s (%d tokens)", cfg.model.tokenizer, tokenizer.vocab_size)
    else:
        tokenizer = MambaTokenizer.train((d.text for d in train_docs), cfg.model.vocab_size, cfg.data.tokenizer_min_frequency)
        log.info("trained a byte-level BPE of %d tokens on %d documents", tokenizer.vocab_size, len(train_docs))

    if pretrained_model is not None:
        args = pretrained_model.args
    else:
        args = model_args_from_config(cfg, tokenizer.vocab_size)
    if resumed is not None and extra.get("model_args") != args.to_dict():
        raise CheckpointError(
            f"{latest}: the checkpoint's architecture {extra.get('model_args')} differs from the config's "
            f"{args.to_dict()}; resume with the config it was trained with"
        )

    train_stream = pack_documents(train_docs, tokenizer, str(cfg.data.train_file))
    val_stream = pack_documents(val_docs, tokenizer, str(cfg.data.val_file))
    train_set = TokenWindows(train_stream, cfg.model.max_length, tokenizer.pad_id)
    val_set = TokenWindows(val_stream, cfg.model.max_length, tokenizer.pad_id)
    unigram_loss = unigram_cross_entropy(train_stream, val_stream[1:], tokenizer.vocab_size)
    kn3_loss = kneser_ney_cross_entropy(train_stream, val_stream, tokenizer.vocab_size)
    log.info(
        "train: %d documents, %d tokens, %d windows of %d | val: %d documents, %d tokens | unigram val loss %.4f (ppl %.1f)"
        " | Kneser-Ney 3-gram val loss %.4f (ppl %.1f)",
        len(train_docs), train_stream.numel(), len(train_set), cfg.model.max_length, len(val_docs),
        val_stream.numel(), unigram_loss, math.exp(unigram_loss), kn3_loss, math.exp(kn3_loss),
    )

    seed_everything(cfg.system.seed)
    if pretrained_model is not None:
        model = pretrained_model
        if cfg.model.compile:
            model.compile_blocks()
    else:
        model = MambaLM(args, gradient_checkpointing=cfg.model.gradient_checkpointing, compile=cfg.model.compile)
    adapter = None
    if cfg.model.adapter is not None:
        base = {"pretrained": str(pretrained.folder.resolve()), "layout": pretrained.layout}
        adapter = adapter_info(apply_adapter(model, cfg.model.adapter, "model.adapter", REFUSED_TARGETS, base, seed=cfg.system.seed))
    fingerprint = tokenizer.fingerprint()

    def check_resume(checkpoint_extra: dict) -> None:
        if checkpoint_extra.get("tokenizer_sha256") != fingerprint:
            raise CheckpointError("the checkpoint was trained with another tokenizer than vocab.json")
        if checkpoint_extra.get("model_args") != args.to_dict():
            raise CheckpointError("the checkpoint's architecture differs from the config's")
        if checkpoint_extra.get("adapter") != adapter:
            raise CheckpointError("the checkpoint's adapter (model.adapter, model.pretrained) differs from the config's")

    def count_labels(batch) -> int:
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def loss_fn(m, batch):
        # The model's loss is the mean over the batch's labels; the engine wants the sum (it
        # divides by the labels of the whole optimizer step: a padded last window weighs per token).
        labels = batch["labels"]
        return m(batch["input_ids"], labels=labels).loss * (labels != IGNORE_INDEX).sum()

    def eval_step(m, batch):
        # Through the (possibly wrapped) model's forward, never a weight read off the unwrapped
        # model: under FSDP the LM head is sharded outside forward.
        labels = batch["labels"]
        tokens = count_labels(batch)
        loss = m(batch["input_ids"], labels=labels).loss
        return {"loss_sum": [float(loss) * tokens], "tokens": [tokens]}

    def compute_metrics(outputs: dict[str, list]) -> dict[str, float]:
        val_loss = sum(outputs["loss_sum"]) / max(1, sum(outputs["tokens"]))
        return {
            "val_loss": val_loss,
            "val_perplexity": math.exp(min(val_loss, 50.0)),
            "unigram_val_loss": unigram_loss,
            "unigram_val_perplexity": math.exp(unigram_loss),
            "kn3_val_loss": kn3_loss,
            "kn3_val_perplexity": math.exp(kn3_loss),
        }

    task = TrainTask(
        name=KIND,
        model=model,
        train_dataset=train_set,
        val_dataset=val_set,
        collate_fn=collate_windows,
        loss_fn=loss_fn,
        eval_step=eval_step,
        compute_metrics=compute_metrics,
        extra_state={
            "model_args": args.to_dict(),
            "tokenizer_json": tokenizer.to_str(),
            "tokenizer_sha256": fingerprint,
            "max_length": cfg.model.max_length,
            **({"adapter": adapter} if adapter is not None else {}),
        },
        check_resume=check_resume,
        count_tokens=count_labels,
        count_items=count_labels,
    )
    facts = {
        "tokenizer": tokenizer,
        "train_tokens": int(train_stream.numel()),
        "val_tokens": int(val_stream.numel()),
        "train_windows": len(train_set),
        "parameters": model.num_parameters(),
        "trainable_parameters": count_parameters(model)[0],
        "unigram_val_loss": unigram_loss,
        "kn3_val_loss": kn3_loss,
    }
    return task, facts


def train_mamba(cfg: MambaTrainConfig, resume: bool = False) -> dict[str, Any]:
    """Train (or resume) the Mamba model of ``cfg``; returns ``{"metrics": ..., "outputs": ...}``.

    Outputs: ``<checkpoint_dir>/checkpoint_epoch_N.pt``, ``best_model.pt`` (lowest val loss;
    loads alone with :func:`src.mamba.load_mamba`), ``vocab.json``, ``config.yaml``;
    ``<log_dir>/train.log`` and ``metrics.jsonl``.
    """
    if cfg.training.torch_threads:
        torch.set_num_threads(cfg.training.torch_threads)
    task, facts = build_task(cfg, resume)
    ckpt_dir = Path(cfg.paths.checkpoint_dir)
    vocab_path = ckpt_dir / VOCAB_FILE
    facts["tokenizer"].save(vocab_path)  # all inputs checked: from here on files are written
    log.info("model: %s parameters; tokenizer saved to %s", f"{facts['parameters']:,}", vocab_path)

    result = fit(task, cfg, resume=resume)

    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics.update(
        best_val_loss=result.best_metric if result.best_metric is not None else float("nan"),
        global_step=result.global_step,
        epochs_completed=result.epochs_completed,
        train_tokens=facts["train_tokens"],
        val_tokens=facts["val_tokens"],
        parameters=facts["parameters"],
        trainable_parameters=facts["trainable_parameters"],
        vocab_size=facts["tokenizer"].vocab_size,
    )
    if result.best_metric is not None:
        metrics["best_val_perplexity"] = math.exp(min(result.best_metric, 50.0))
    outputs = {
        "checkpoint_dir": str(ckpt_dir),
        "best_model": str(result.best_model_path) if result.best_model_path else None,
        "last_checkpoint": str(result.last_checkpoint) if result.last_checkpoint else None,
        "vocab": str(vocab_path),
        "config": str(ckpt_dir / "config.yaml"),
        "train_log": str(Path(cfg.paths.log_dir) / "train.log"),
        "metrics_log": str(Path(cfg.paths.log_dir) / "metrics.jsonl"),
    }
    return {"metrics": metrics, "outputs": outputs}


def run(cfg: MambaTrainConfig, resume: bool = False, evaluate: bool = False) -> dict[str, Any]:
    """The common entry point of every recipe; ``evaluate`` is accepted for its signature
    (validation runs anyway)."""
    return train_mamba(cfg, resume=resume)
