"""The export stage: copy every trained model into one folder, check it loads, describe it.

    <export_dir>/manifest.json          format "mark-export": package versions, and per model
                                        its files (sha256, bytes), config hash, metrics, load check
    <export_dir>/<model>/...            the model file and what belongs with it (tokenizer,
                                        config, evaluation report)
    <export_dir>/<model>/hf/            the Hugging Face form of the models that have one
                                        (mamba, rlhf: Mamba2ForCausalLM; transformer:
                                        AutoModelForSequenceClassification), checked to load
                                        in transformers with MARK's outputs

:func:`export_model` writes one model in one format (``hf`` or ``gguf``): what
``mark export --model M --format F --output DIR`` runs.

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
# the log folder). The RAG index needs its store and manifest (and its vector segment or
# on-disk inverted lists, when it has them); the rest documents the model.
COMPANION_FILES: dict[str, tuple[str, ...]] = {
    "mamba": ("vocab.json", "config.yaml"),
    "transformer": ("config.yaml", "test_metrics.json", "confusion_matrix.png"),
    "rag": ("metadata.json", "store.sqlite", "segment.ids", "segment.f32", "faiss.ivfdata", "config.yaml", "eval_metrics.json", "eval_metrics.png"),
    "rl": ("config.yaml", "eval_metrics.json", "eval_metrics.png"),
    "rlhf": ("config.yaml", "evaluation.json", "evaluation.md", "evaluation.png"),
}
REQUIRED_COMPANIONS: dict[str, tuple[str, ...]] = {"rag": ("metadata.json", "store.sqlite")}

HF_DIR = "hf"
HF_MODELS = ("mamba", "rlhf", "transformer")  # the models with a Hugging Face form
FORMATS = ("hf", "gguf")
GGUF_MODELS = ("mamba", "rlhf")
HF_CHECK_TEXTS = ("def load(path):\n    return json.loads(open(path).read())", "Open a TCP connection to the host.")

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
        hf = None
        if name in HF_MODELS:
            hf = write_hf_form(name, model, tokenizer, target / HF_DIR)
            outputs[f"{name}/{HF_DIR}"] = str(target / HF_DIR)
            log.info("export: %s -> %s (transformers loads it, max |logit difference| %.2e)", name, target / HF_DIR, hf["max_abs_diff"])
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
        if hf is not None:
            models[name]["hf"] = hf
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


def check_hf_form(name: str, model: Any, tokenizer: Any, folder: Path) -> float:
    """Load ``folder`` with transformers and return the largest difference from MARK's outputs
    on :data:`HF_CHECK_TEXTS` (logits for the LM, probabilities for the classifier). Over 1e-4 is
    a ``CheckpointError``: an export that computes something else is not written as done."""
    import torch

    worst = 0.0
    if name == "transformer":
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        hf_model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        hf_tok = AutoTokenizer.from_pretrained(folder)
        batch = hf_tok(list(HF_CHECK_TEXTS), truncation=True, padding=True, return_tensors="pt")
        with torch.no_grad():
            theirs = torch.softmax(hf_model(**batch).logits.float(), -1)
        mark = model.predict_proba(list(HF_CHECK_TEXTS))
        if model.long_text == "truncate":
            worst = (theirs - mark).abs().max().item()
    else:
        from transformers import Mamba2ForCausalLM

        hf_model = Mamba2ForCausalLM.from_pretrained(folder).eval()
        for text in HF_CHECK_TEXTS:
            ids = torch.tensor([[tokenizer.bos_id] + tokenizer.encode(text)])
            with torch.no_grad():
                diff = (hf_model(ids, use_cache=False).logits - model.to("cpu")(ids).logits).abs().max().item()
            worst = max(worst, diff)
    if worst > 1e-4:
        raise CheckpointError(f"{folder}: transformers computes other outputs than MARK (max difference {worst:.2e})")
    return worst


def write_hf_form(name: str, model: Any, tokenizer: Any, folder: Path) -> dict[str, Any]:
    """Write the Hugging Face form of a loaded model to ``folder``, check it, describe it."""
    if name == "transformer":
        from src.classifier.export import export_hf as export_classifier_hf

        export_classifier_hf(model, folder)
    else:
        from src.mamba.export import export_hf as export_mamba_hf

        export_mamba_hf(model, tokenizer, folder)
    worst = check_hf_form(name, model, tokenizer, folder)
    files = {p.name: {"sha256": file_sha256(p), "bytes": p.stat().st_size} for p in sorted(folder.iterdir()) if p.is_file()}
    loads_with = "AutoModelForSequenceClassification" if name == "transformer" else "Mamba2ForCausalLM"
    return {"path": f"{name}/{HF_DIR}", "loads_with": loads_with, "max_abs_diff": worst, "files": files}


def export_model(name: str, fmt: str, output: str | Path, source: str | Path | None = None, dtype: str = "f32") -> dict[str, Any]:
    """Write the trained model ``name`` (from ``source``: a checkpoint file or folder, or an
    export directory; default its checkpoint folder) in ``fmt`` to ``output``.

    ``hf``: ``output`` is the folder. ``gguf``: ``output`` is the ``.gguf`` file, or a folder
    that gets ``<name>-<dtype>.gguf``. Returns ``{"outputs": {...}, "metrics": {...}}``.
    """
    from src.core.errors import ConfigError

    if fmt not in FORMATS:
        raise ConfigError(f"--format '{fmt}': choose one of {', '.join(FORMATS)}")
    if name not in HF_MODELS:
        raise ConfigError(f"--model '{name}': only {', '.join(HF_MODELS)} have an ecosystem format")
    if fmt == "gguf" and name not in GGUF_MODELS:
        raise ConfigError(f"--model {name}: the classifier has no GGUF form (llama.cpp runs language models); use --format hf")
    output = Path(output)
    model, tokenizer, _ = load_model(name, source, device="cpu")
    if fmt == "hf":
        info = write_hf_form(name, model, tokenizer, output)
        log.info("export: %s -> %s (loads with %s; max |difference| from MARK %.2e)", name, output, info["loads_with"], info["max_abs_diff"])
        return {"outputs": {"hf": str(output)}, "metrics": {"max_abs_diff": info["max_abs_diff"], "files": len(info["files"])}}
    from src.mamba.export import export_gguf

    path = output if output.suffix == ".gguf" else output / f"{name}-{dtype}.gguf"
    export_gguf(model, tokenizer, path, dtype, name=f"mark-{name}")
    log.info("export: %s -> %s (%s, %.1f MB)", name, path, dtype, path.stat().st_size / 1e6)
    return {"outputs": {"gguf": str(path)}, "metrics": {"bytes": path.stat().st_size}}
