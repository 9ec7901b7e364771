"""The export stage: copy every trained model into one folder, check it loads, describe it.

    <export_dir>/manifest.json          format "mark-export": package versions, and per model
                                        its files (sha256, bytes), config hash, metrics, load check
    <export_dir>/<model>/...            the model file and what belongs with it (tokenizer,
                                        config, evaluation report)

``load_model(name, "<export_dir>")`` reads a model from here exactly as from its checkpoint
folder: every copy is loaded back through :func:`src.core.load_model` before the manifest
is written, so a manifest only lists models that load.
"""

from __future__ import annotations

import gc
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from src.core.checkpoint import atomic_write_json, file_sha256
from src.core.errors import CheckpointError
from src.core.load_model import EXPORT_FORMAT, EXPORT_MANIFEST, MODEL_NAMES, find_model_file, load_model, model_spec
from src.core.logging import get_logger

log = get_logger("pipeline")

# What is copied beside each model's file, when it exists (in the checkpoint folder, then
# the log folder). The RAG index needs its metadata; the rest documents the model.
COMPANION_FILES: dict[str, tuple[str, ...]] = {
    "mamba": ("vocab.json", "config.yaml"),
    "transformer": ("config.yaml", "test_metrics.json", "confusion_matrix.png"),
    "rag": ("metadata.json", "config.yaml", "eval_metrics.json", "eval_metrics.png"),
    "rl": ("config.yaml", "eval_metrics.json", "eval_metrics.png"),
    "rlhf": ("config.yaml", "evaluation.json", "evaluation.md", "evaluation.png"),
}
REQUIRED_COMPANIONS: dict[str, tuple[str, ...]] = {"rag": ("metadata.json",)}

PACKAGES = (
    "mark", "torch", "transformers", "tokenizers", "accelerate", "sentence-transformers", "faiss-cpu", "bm25s",
    "stable-baselines3", "gymnasium", "numpy", "pydantic",
)


@dataclass
class ModelSource:
    """Where a trained model is: its checkpoint folder and log folder, and what trained it."""

    name: str
    checkpoint_dir: Path
    log_dir: Path | None = None
    stage: str | None = None
    config_hash: str | None = None
    config_path: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    required: bool = False  # trained in this run: missing is an error, not "not trained"

    def files(self) -> dict[str, Path]:
        """``{exported name: source file}``: the model file and its companions that exist.

        Raises ``CheckpointError`` for a missing required companion; returns ``{}`` when
        there is no model file."""
        spec = model_spec(self.name)
        model_file = find_model_file(spec, self.checkpoint_dir) if self.checkpoint_dir.is_dir() else None
        if model_file is None:
            return {}
        files = {model_file.name: model_file}
        for name in COMPANION_FILES.get(self.name, ()):
            for folder in (self.checkpoint_dir, self.log_dir):
                if folder is not None and (folder / name).is_file():
                    files.setdefault(name, folder / name)
                    break
            else:
                if name in REQUIRED_COMPANIONS.get(self.name, ()):
                    raise CheckpointError(f"{self.checkpoint_dir / name}: missing, the {self.name} model cannot be exported without it")
        return files


def package_versions() -> dict[str, str | None]:
    """Installed versions of Python and the packages the models depend on (``None``: not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def export_inputs(sources: dict[str, ModelSource]) -> dict[str, str]:
    """sha256 of every file the export would copy (the export stage's inputs)."""
    return {
        str(path): file_sha256(path)
        for source in sources.values()
        for path in source.files().values()
    }


def describe_model(model: Any) -> dict[str, Any]:
    """Class name and parameter count of a loaded model (for the manifest)."""
    described: dict[str, Any] = {"class": type(model).__name__}
    module = model if hasattr(model, "parameters") else getattr(model, "model", None)
    if module is not None and hasattr(module, "parameters"):
        described["parameters"] = sum(p.numel() for p in {id(p): p for p in module.parameters()}.values())
    index = getattr(model, "index", None)
    if index is not None and hasattr(index, "num_chunks"):
        described["documents"] = len(index.documents)
        described["chunks"] = index.num_chunks
    return described


def export_models(sources: dict[str, ModelSource], export_dir: str | Path) -> dict[str, Any]:
    """Copy each trained model of ``sources`` to ``<export_dir>/<name>/``, load every copy
    back with :func:`load_model` (on CPU), and write ``<export_dir>/manifest.json``.

    A model without a checkpoint is listed as not trained (an error when ``required``).
    Returns ``{"metrics": {"models_exported", "models_not_trained"}, "outputs": {...},
    "manifest": {...}}``. A model that does not load is a ``CheckpointError``.
    """
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    # The old manifest goes first: a half-finished export must not claim to be complete.
    (export_dir / EXPORT_MANIFEST).unlink(missing_ok=True)
    models: dict[str, Any] = {}
    not_trained: list[str] = []
    outputs: dict[str, str] = {}
    for name, source in sources.items():
        files = source.files()
        target = export_dir / name
        if target.is_dir():
            shutil.rmtree(target)  # no stale files of an earlier export
        if not files:
            if source.required:
                raise CheckpointError(f"{source.checkpoint_dir}: the {name} stage finished but left no model to export")
            not_trained.append(name)
            log.info("export: %s is not trained (nothing in %s), left out", name, source.checkpoint_dir)
            continue
        target.mkdir(parents=True)
        copied = {}
        for exported_name, path in files.items():
            destination = target / exported_name
            shutil.copy2(path, destination)
            checksum = file_sha256(destination)
            if checksum != file_sha256(path):
                raise CheckpointError(f"{destination}: copy differs from {path} (disk full or file changing?)")
            copied[exported_name] = {"source": str(path), "sha256": checksum, "bytes": destination.stat().st_size}
            outputs[f"{name}/{exported_name}"] = str(destination)

        started = time.perf_counter()
        model, tokenizer, _ = load_model(name, target, device="cpu")
        load_seconds = time.perf_counter() - started
        described = describe_model(model)
        del model, tokenizer
        gc.collect()
        log.info("export: %s -> %s (%d files, loads as %s in %.1fs)", name, target, len(copied), described["class"], load_seconds)
        models[name] = {
            "path": name,
            "model_file": next(iter(files)),
            "source": str(source.checkpoint_dir),
            "trained_by": source.stage,
            "config": source.config_path,
            "config_hash": source.config_hash,
            "metrics": source.metrics,
            "files": copied,
            "load_check": {"ok": True, **described, "seconds": round(load_seconds, 2)},
        }
    for stale in MODEL_NAMES:
        if stale not in sources and (export_dir / stale).is_dir():
            shutil.rmtree(export_dir / stale)
    if not models:
        raise CheckpointError(
            f"nothing to export: no trained model in {', '.join(str(s.checkpoint_dir) for s in sources.values())}"
        )
    manifest = {
        "format": EXPORT_FORMAT,
        "version": 1,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "platform": {"system": platform.platform(), "machine": platform.machine(), "python_executable": sys.executable},
        "packages": package_versions(),
        "models": models,
        "not_trained": not_trained,
        "load": "from src.core import load_model; model, tokenizer, device = load_model('<name>', '<this folder>')",
    }
    outputs["manifest"] = str(atomic_write_json(export_dir / EXPORT_MANIFEST, manifest))
    metrics = {"models_exported": len(models), "models_not_trained": len(not_trained)}
    return {"metrics": metrics, "outputs": outputs, "manifest": manifest}
