"""A trained classifier, loaded from its checkpoint alone: ``load_classifier(path).predict(texts)``.

A classifier checkpoint (``best_model.pt`` or ``checkpoint_epoch_N.pt``, kind
``transfer``) holds the weights and, under ``extra``, everything else needed to use
them: the Hugging Face model config, the tokenizer's files, the label names and how
documents are windowed. Nothing is read from the hub or the base model's folder.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from src.core.checkpoint import load_checkpoint
from src.core.errors import CheckpointError
from src.core.runtime import resolve_device
from src.classifier.data import WindowedDataset, collate_windows, window_token_ids
from src.classifier.model import document_logits, model_from_config, tokenizer_files, tokenizer_from_files

CHECKPOINT_KIND = "transfer"
BEST_MODEL_FILE = "best_model.pt"
# What extra_state must hold for a checkpoint to load alone.
REQUIRED_EXTRA = ("hf_config", "tokenizer_files", "label_names", "max_length", "long_text", "window_stride", "max_windows")


def classifier_extra_state(model: nn.Module, tokenizer, label_names: list[str], model_cfg) -> dict[str, Any]:
    """What every classifier checkpoint carries besides the weights (see module docstring)."""
    from src.training.adapters import adapter_info, has_adapter

    return {
        **({"adapter": adapter_info(model)} if has_adapter(model) else {}),
        "base_model": model_cfg.base_model,
        "hf_config": model.config.to_dict(),
        "tokenizer_files": tokenizer_files(tokenizer),
        "label_names": list(label_names),
        "max_length": model_cfg.max_length,
        "long_text": model_cfg.long_text,
        "window_stride": model_cfg.window_stride,
        "max_windows": model_cfg.max_windows,
    }


class DocumentClassifier:
    """A fine-tuned encoder that labels documents.

    ``predict(texts)`` returns, per text, ``{"label": name, "probabilities": {name: p}}``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        label_names: list[str],
        max_length: int,
        long_text: str = "truncate",
        window_stride: int = 128,
        max_windows: int = 8,
        device: str | torch.device = "cpu",
    ) -> None:
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.label_names = list(label_names)
        self.max_length = max_length
        self.long_text = long_text
        self.window_stride = window_stride
        self.max_windows = max_windows

    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Class probabilities ``(len(texts), num_labels)`` on the CPU, in the order of ``texts``."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            return torch.zeros(0, len(self.label_names))
        windows = window_token_ids(
            self.tokenizer, texts, self.max_length, self.long_text, self.window_stride, self.max_windows
        )
        dataset = WindowedDataset(windows)
        # Batch documents of similar length together: less padding, same results.
        order = sorted(range(len(texts)), key=lambda i: sum(len(w) for w in windows[i]))
        collate = partial(collate_windows, pad_token_id=self.tokenizer.pad_token_id or 0)
        probabilities = torch.empty(len(texts), len(self.label_names))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batch = {k: v.to(self.device) for k, v in collate([dataset[i] for i in chunk]).items()}
            logits = document_logits(self.model, batch)
            probabilities[chunk] = torch.softmax(logits.float(), dim=-1).cpu()
        return probabilities

    def predict(self, texts: Sequence[str], batch_size: int = 32) -> list[dict[str, Any]]:
        """``[{"label": name, "probabilities": {name: p, ...}}, ...]``, one per text, batched."""
        probabilities = self.predict_proba(texts, batch_size)
        results = []
        for row in probabilities.tolist():
            best = max(range(len(row)), key=row.__getitem__)
            results.append({"label": self.label_names[best], "probabilities": dict(zip(self.label_names, row))})
        return results


def load_classifier(checkpoint: str | Path, device: str = "auto") -> DocumentClassifier:
    """A :class:`DocumentClassifier` from a classifier checkpoint file, or a folder holding ``best_model.pt``.

    ``device`` is ``auto``, ``cpu`` or ``cuda``. A missing, corrupt or foreign checkpoint is a
    one-line ``CheckpointError``.
    """
    path = Path(checkpoint)
    if path.is_dir():
        path = path / BEST_MODEL_FILE
    state = load_checkpoint(path, map_location="cpu", kind=CHECKPOINT_KIND)
    extra = state.get("extra") or {}
    missing = [key for key in REQUIRED_EXTRA if key not in extra]
    if missing or "model" not in state:
        raise CheckpointError(f"{path}: not a complete classifier checkpoint (missing {missing or ['model']})")
    model = model_from_config(extra["hf_config"], state["model"], str(path), extra.get("adapter"))
    tokenizer = tokenizer_from_files(extra["tokenizer_files"], str(path))
    return DocumentClassifier(
        model,
        tokenizer,
        extra["label_names"],
        max_length=int(extra["max_length"]),
        long_text=extra["long_text"],
        window_stride=int(extra["window_stride"]),
        max_windows=int(extra["max_windows"]),
        device=resolve_device(device),
    )
