"""The classifier recipe: fine-tune a pretrained BERT-style encoder to label documents, then test it.

Top to bottom: resolve the label names (config, labels.json or the data) and check them
against ``model.num_labels``; read the splits; load ``model.base_model`` with a fresh
classification head; window the documents (truncation or sliding windows); train through
the shared engine (best model by validation macro-F1); reload ``best_model.pt`` on its own
with :func:`load_classifier` and score it on the test split next to the majority-class
baseline. Writes ``checkpoints/transfer/{checkpoint_epoch_N,best_model}.pt`` and
``logs/transfer/{train.log,metrics.jsonl,test_metrics.json,confusion_matrix.png}``.
Run it with ``python -m src.scripts.train_transfer``.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

from src.core.checkpoint import atomic_write_json, load_checkpoint, save_checkpoint
from src.core.config import config_to_dict
from src.core.errors import CheckpointError
from src.core.logging import MetricsLogger, setup_logging
from src.core.runtime import seed_everything
from src.classifier.config import TransferConfig
from src.classifier.data import build_dataset, collate_windows, read_labelled_texts, resolve_label_names
from src.classifier.evaluate import classification_metrics, evaluate_on_test, format_report, plot_confusion_matrix
from src.classifier.model import add_adapter, build_model_and_tokenizer, document_logits
from src.classifier.load import BEST_MODEL_FILE, CHECKPOINT_KIND, classifier_extra_state
from src.training.engine import TrainTask, fit

TEST_METRICS_FILE = "test_metrics.json"
CONFUSION_PLOT_FILE = "confusion_matrix.png"


def build_task(cfg: TransferConfig) -> tuple[TrainTask, dict]:
    """The engine's task for ``cfg``, and the splits it was built from (``train``/``val``/``test``)."""
    label_names, label_source = resolve_label_names(cfg.data.train_file, cfg.data.label_names, cfg.model.num_labels)
    splits = {"train": read_labelled_texts(cfg.data.train_file, label_names, cfg.data.max_train_examples)}
    for split, path in (("val", cfg.data.val_file), ("test", cfg.data.test_file)):
        if path is not None:  # read now: a bad label fails before training, not after
            splits[split] = read_labelled_texts(path, label_names, cfg.data.max_eval_examples)

    seed_everything(cfg.system.seed)
    model, tokenizer = build_model_and_tokenizer(cfg.model, label_names)
    if cfg.model.adapter is not None:
        add_adapter(model, cfg.model.adapter, cfg.model.base_model, seed=cfg.system.seed)
    train_set = build_dataset(tokenizer, splits["train"], cfg.model)
    val_set = build_dataset(tokenizer, splits["val"], cfg.model) if "val" in splits else None
    cross_entropy = nn.CrossEntropyLoss(reduction="sum")

    def loss_fn(model: nn.Module, batch: dict) -> torch.Tensor:
        # Summed over documents; the engine divides by the documents of the whole step
        # (a short last micro-batch then weighs per document, as in one big batch).
        return cross_entropy(document_logits(model, batch), batch["labels"])

    def eval_step(model: nn.Module, batch: dict) -> dict[str, list]:
        logits = document_logits(model, batch)
        losses = nn.functional.cross_entropy(logits, batch["labels"], reduction="none")
        return {"loss": losses.tolist(), "pred": logits.argmax(-1).tolist(), "label": batch["labels"].tolist()}

    def compute_metrics(outputs: dict[str, list]) -> dict[str, float]:
        scores = classification_metrics(outputs["label"], outputs["pred"], label_names)
        return {
            "val_loss": sum(outputs["loss"]) / len(outputs["loss"]),
            "accuracy": scores["accuracy"],
            "macro_f1": scores["macro_f1"],
        }

    extra_state = classifier_extra_state(model, tokenizer, label_names, cfg.model)
    extra_state["label_source"] = label_source

    def check_resume(saved: dict) -> None:
        for key in ("label_names", "base_model"):
            if saved.get(key) != extra_state[key]:
                raise CheckpointError(
                    f"{cfg.paths.checkpoint_dir}: its checkpoints have {key} {saved.get(key)!r}, the config {extra_state[key]!r}; "
                    "use another paths.checkpoint_dir or drop --resume"
                )

    task = TrainTask(
        name="transfer",
        kind=CHECKPOINT_KIND,
        model=model,
        train_dataset=train_set,
        val_dataset=val_set,
        collate_fn=partial(collate_windows, pad_token_id=tokenizer.pad_token_id or 0),
        loss_fn=loss_fn,
        eval_step=eval_step,
        compute_metrics=compute_metrics,
        metric_for_best="macro_f1",
        greater_is_better=True,
        extra_state=extra_state,
        check_resume=check_resume,
        count_tokens=lambda batch: int(batch["attention_mask"].sum()),
        count_items=lambda batch: int(batch["labels"].shape[0]),
        # Batches of documents of similar length: far less padding than random batches.
        example_lengths=[sum(len(w) for w in windows) for windows in train_set.windows],
    )
    return task, splits


def run(cfg: TransferConfig, resume: bool = False, evaluate: bool = False) -> dict:
    """Train (or, with ``resume``, continue training) and evaluate on the test split.

    ``evaluate`` is accepted for the common entry-point signature: the test split is scored
    whenever ``data.test_file`` is set. Returns ``{"metrics": {...}, "outputs": {...}}`` with
    test accuracy / macro-F1, the majority baseline's, the best validation macro-F1 and the
    training time.
    """
    checkpoint_dir, log_dir = Path(cfg.paths.checkpoint_dir), Path(cfg.paths.log_dir)
    log = setup_logging("transfer", log_dir)
    task, splits = build_task(cfg)
    log.info("labels (%s): %s", task.extra_state["label_source"], ", ".join(task.extra_state["label_names"]))

    started = time.perf_counter()
    result = fit(task, cfg, resume=resume)
    train_seconds = time.perf_counter() - started

    from accelerate.state import PartialState

    best_path = checkpoint_dir / BEST_MODEL_FILE
    outputs = {"checkpoint_dir": str(checkpoint_dir), "train_log": str(log_dir / "train.log")}
    if result.last_checkpoint is not None:
        outputs["last_checkpoint"] = str(result.last_checkpoint)
    if not PartialState().is_main_process:
        return {"metrics": {}, "outputs": outputs}
    if task.val_dataset is None:
        # No validation set: the last weights are the best model there is (and replace
        # any best_model.pt an earlier run left in this folder).
        # The engine's last checkpoint holds the full state dict (gathered under FSDP), which
        # task.model, the unwrapped module, need not (its parameters may be shards).
        final = load_checkpoint(result.last_checkpoint, kind=CHECKPOINT_KIND)["model"] if result.last_checkpoint else None
        if final is None:
            raise CheckpointError(f"{checkpoint_dir}: training wrote no checkpoint to take the final weights from")
        save_checkpoint(
            {"kind": CHECKPOINT_KIND, "model": final, "config": config_to_dict(cfg),
             "extra": task.extra_state, "metrics": {}, "step": result.global_step, "epoch": result.epochs_completed},
            best_path,
        )
        log.info("no validation set: saved the final weights as %s", best_path)
    outputs["best_model"] = str(best_path)

    metrics: dict = {"train_seconds": round(train_seconds, 1), "global_step": result.global_step}
    if result.best_metric is not None:
        metrics["best_val_macro_f1"] = result.best_metric
    if "test" in splits:
        report = evaluate_on_test(best_path, splits["train"].labels, splits["test"], task.extra_state["label_names"], cfg,
                                  train=splits["train"], val=splits.get("val"))
        outputs["test_metrics"] = str(atomic_write_json(log_dir / TEST_METRICS_FILE, report))
        outputs["confusion_matrix"] = str(
            plot_confusion_matrix(
                report["confusion_matrix"], report["label_names"], log_dir / CONFUSION_PLOT_FILE,
                f"test: accuracy {report['accuracy']:.3f}, macro-F1 {report['macro_f1']:.3f}",
            )
        )
        metrics.update({
            "test_accuracy": report["accuracy"],
            "test_macro_f1": report["macro_f1"],
            "majority_accuracy": report["majority_baseline"]["accuracy"],
            "majority_macro_f1": report["majority_baseline"]["macro_f1"],
            "tfidf_accuracy": report["tfidf_baseline"]["accuracy"],
            "tfidf_macro_f1": report["tfidf_baseline"]["macro_f1"],
            "margin_over_tfidf_macro_f1": report["margin_over_tfidf"]["macro_f1"],
        })
        metrics_logger = MetricsLogger(log_dir, "transfer", use_tensorboard=cfg.system.use_tensorboard,
                                       use_wandb=cfg.system.use_wandb, wandb_project=cfg.system.wandb_project)
        metrics_logger.log_metrics({k: v for k, v in metrics.items() if k != "global_step"}, result.global_step, kind="test")
        metrics_logger.close()
        log.info("test (%d documents):\n%s", report["num_examples"], format_report(report))
    return {"metrics": metrics, "outputs": outputs}
