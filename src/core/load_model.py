"""Every trained MARK model by name, from its checkpoints or from an export directory.

    from src.core import load_model
    model, tokenizer, device = load_model("mamba")                          # checkpoints/mamba
    model, tokenizer, device = load_model("rag", "pipeline_output/export")  # an exported copy
    model, tokenizer, device = load_model("rl", "checkpoints/rl/final_model.pt", device="cpu")

======================  ==========================================  =====================
name                    model                                       tokenizer
======================  ==========================================  =====================
``mamba``               ``MambaLM`` (eval mode)                     ``MambaTokenizer``
``transformer``         ``DocumentClassifier`` (``.predict(texts)``)  its Hugging Face tokenizer
``rag``                 ``Retriever`` (``.search(query)``)          the embedding model's tokenizer
``rl``                  ``RLPolicy`` (``.act(obs)``)                ``None``
``rlhf``                ``MambaLM`` fine-tuned by RLHF (eval mode)  ``MambaTokenizer``
======================  ==========================================  =====================

``source`` is a checkpoint file, a checkpoint folder, or an export directory written by the
full pipeline's ``export_models`` stage (it holds ``manifest.json`` and one folder per model).
A model that has not been trained is a one-line :class:`NotTrainedError` naming the command
that trains it; a damaged checkpoint is a one-line ``CheckpointError``.

This module imports no torch and no component at import time (``src.core`` is imported by
every command, including the data preparation, which must not load torch): each model's
loader is imported when that model is asked for.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from src.core.errors import ConfigError, NotTrainedError

if TYPE_CHECKING:
    import torch

EXPORT_MANIFEST = "manifest.json"
EXPORT_FORMAT = "mark-export"


@dataclass(frozen=True)
class ModelSpec:
    """Where a trained model lives and which command makes it.

    ``model_files``: names (or glob patterns) of the file that holds the model in its
    checkpoint folder, preferred first; ``target``: the orchestrator target that trains it.
    """

    name: str
    description: str
    default_dir: str
    model_files: tuple[str, ...]
    target: str

    @property
    def train_command(self) -> str:
        return f"python -m src.training.orchestrator train --target={self.target}"


MODELS: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("mamba", "Mamba language model", "checkpoints/mamba", ("best_model.pt", "checkpoint_*.pt"), "mamba"),
        ModelSpec("transformer", "document classifier", "checkpoints/transfer", ("best_model.pt", "checkpoint_*.pt"), "transformer"),
        ModelSpec("rag", "RAG index", "checkpoints/rag", ("faiss.index",), "rag"),
        ModelSpec("rl", "RL retrieval policy", "checkpoints/rl", ("final_model.pt", "checkpoint_step_*.pt"), "rl"),
        ModelSpec("rlhf", "RLHF language model", "checkpoints/rlhf", ("rlhf_final_model.pt",), "rlhf"),
    )
}
MODEL_NAMES = tuple(MODELS)


def model_spec(name: str) -> ModelSpec:
    """The :class:`ModelSpec` of ``name``; an unknown name is a ``ConfigError`` listing the valid ones."""
    try:
        return MODELS[name]
    except KeyError:
        raise ConfigError(f"unknown model '{name}'; valid names: {', '.join(MODEL_NAMES)}") from None


def not_trained(spec: ModelSpec, where: Path | str, detail: str = "") -> NotTrainedError:
    """The one-line error for a model that is not there, naming the command that trains it."""
    found = f" ({detail})" if detail else ""
    return NotTrainedError(
        f"the {spec.name} model ({spec.description}) is not trained: nothing in {where}{found}; "
        f"train it with `{spec.train_command}` (or `make demo` for every model)"
    )


def is_export_dir(path: str | Path) -> bool:
    """Whether ``path`` is an export directory (its ``manifest.json`` says ``format: mark-export``)."""
    manifest = Path(path) / EXPORT_MANIFEST
    if not manifest.is_file():
        return False
    try:
        return json.loads(manifest.read_text(encoding="utf-8")).get("format") == EXPORT_FORMAT
    except (ValueError, AttributeError, OSError):
        return False


def find_model_file(spec: ModelSpec, folder: Path) -> Path | None:
    """The file holding ``spec``'s model in ``folder`` (preferred name first, else the newest
    match of a pattern), or ``None``."""
    for pattern in spec.model_files:
        matches = [p for p in folder.glob(pattern) if p.is_file()]
        if matches:
            return max(matches, key=lambda p: p.stat().st_mtime_ns)
    return None


def resolve_source(name: str, source: str | Path | None = None) -> Path:
    """The checkpoint file (or, for ``rag``, folder) that :func:`load_model` reads.

    ``source``: ``None`` (the standard checkpoint folder), a checkpoint file, a checkpoint
    folder, or an export directory. Nothing there is a :class:`NotTrainedError`.
    """
    spec = model_spec(name)
    path = Path(source if source is not None else spec.default_dir)
    if path.is_dir() and is_export_dir(path):
        exported = path / spec.name
        if not exported.is_dir():
            raise not_trained(spec, path, "the export holds no such model")
        path = exported
    if not path.exists():
        raise not_trained(spec, path, "no such file or folder")
    if path.is_file():
        return path
    model_file = find_model_file(spec, path)
    if model_file is None:
        raise not_trained(spec, path, f"no {' or '.join(spec.model_files)}")
    # The RAG index is a folder (index + metadata + config); every other model is one file.
    return path if spec.name == "rag" else model_file


def load_model(name: str, source: str | Path | None = None, device: str = "auto") -> tuple[Any, Any, "torch.device"]:
    """``(model, tokenizer, device)`` of the trained model ``name``, ready for inference.

    ``name``: ``mamba``, ``transformer``, ``rag``, ``rl`` or ``rlhf``. ``source``: a
    checkpoint file or folder, or an export directory (default: the standard
    ``checkpoints/<model>`` folder). ``device``: ``auto`` (CUDA when available), ``cpu`` or
    ``cuda``. Returns the model (see the table in the module docstring), its tokenizer or
    ``None``, and the ``torch.device`` it is on. Raises ``NotTrainedError`` (one line,
    naming the training command) when there is nothing to load, ``CheckpointError`` when a
    checkpoint is damaged or belongs to another model.
    """
    from src.core.runtime import resolve_device

    path = resolve_source(name, source)
    torch_device = resolve_device(device)
    loader = _LOADERS[name]
    model, tokenizer = loader(path, str(torch_device))
    return model, tokenizer, torch_device


def _load_mamba(path: Path, device: str) -> tuple[Any, Any]:
    from src.mamba.load import load_mamba

    return load_mamba(path, device)


def _load_transformer(path: Path, device: str) -> tuple[Any, Any]:
    from src.classifier.load import load_classifier

    classifier = load_classifier(path, device)
    return classifier, classifier.tokenizer


def _load_rag(path: Path, device: str) -> tuple[Any, Any]:
    from src.rag.load import load_rag_index

    retriever = load_rag_index(path, device=device)
    return retriever, retriever.index.encoder.tokenizer


def _load_rl(path: Path, device: str) -> tuple[Any, Any]:
    from src.rl.load import load_rl_policy

    return load_rl_policy(path, device=device), None


def _load_rlhf(path: Path, device: str) -> tuple[Any, Any]:
    from src.rlhf.load import load_rlhf_model

    return load_rlhf_model(path, device)


_LOADERS = {
    "mamba": _load_mamba,
    "transformer": _load_transformer,
    "rag": _load_rag,
    "rl": _load_rl,
    "rlhf": _load_rlhf,
}


__all__ = ["MODELS", "MODEL_NAMES", "ModelSpec", "NotTrainedError", "find_model_file", "is_export_dir", "load_model", "model_spec", "resolve_source"]
