"""The trained models a server (or the LangChain integration) uses: where each one is, loaded once.

Models come from :func:`src.core.load_model`, either from a checkpoints folder
(``<checkpoints_dir>/mamba``, ``/transfer``, ``/rag``, ``/rlhf``) or from an export
directory written by the full pipeline. Each is loaded on first use (or by ``preload``)
under its own lock, so concurrent first requests load it once. A model that is not
trained raises :class:`NotTrainedError` naming the command that trains it; nothing is
cached for it, so a model trained while the server runs is picked up by the next request.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from src.core.errors import CheckpointError, MarkError, NotTrainedError
from src.core.load_model import MODELS, resolve_source
from src.core.logging import get_logger

log = get_logger("api")

# The models the server exposes (``rl`` is a retrieval policy, not served over HTTP).
SERVED_MODELS = ("mamba", "rlhf", "transformer", "rag")
LANGUAGE_MODELS = ("mamba", "rlhf")


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, tz=timezone.utc).isoformat(timespec="seconds")


@dataclass
class LoadedModel:
    """A model ready for inference: what :func:`load_model` returned, and where it came from.

    ``trained_at`` is the modification time of the model file (UTC, ISO 8601).
    """

    name: str
    model: Any
    tokenizer: Any
    device: str
    source: Path
    trained_at: str
    loaded_at: str
    load_seconds: float
    details: dict[str, Any] = field(default_factory=dict)


def describe(name: str, model: Any, tokenizer: Any) -> dict[str, Any]:
    """A few facts about a loaded model for ``GET /models``."""
    if name in LANGUAGE_MODELS:
        args = model.args
        facts = {
            "parameters": model.num_parameters(),
            "vocab_size": tokenizer.vocab_size,
            "d_model": args.d_model,
            "n_layers": args.n_layers,
        }
        if getattr(model, "trained_prompt_tokens", None):  # an RLHF model: the prompt length it was trained on
            facts["max_prompt_tokens"] = model.trained_prompt_tokens
        return facts
    if name == "transformer":
        return {"labels": list(model.label_names), "max_length": model.max_length}
    if name == "rag":
        index = model.index
        return {
            "documents": len(index.documents),
            "chunks": index.num_chunks,
            "embedding_model": index.encoder.name,
            "embedding_dim": index.dim,
            "search_mode": model.config.mode,
        }
    return {}


class ModelRegistry:
    """Finds and loads MARK's trained models, each once, thread-safely.

    ``checkpoints_dir``: the folder holding ``mamba/``, ``transfer/``, ``rag/``, ``rlhf/``
    (default ``checkpoints``). ``export_dir``, when given, is used instead (a full-pipeline
    export: ``manifest.json`` + one folder per model).
    """

    def __init__(self, checkpoints_dir: str | Path = "checkpoints", export_dir: str | Path | None = None, device: str = "auto") -> None:
        self.checkpoints_dir = Path(checkpoints_dir)
        self.export_dir = Path(export_dir) if export_dir is not None else None
        self.device = device
        self._loaded: dict[str, LoadedModel] = {}
        self._locks = {name: threading.Lock() for name in SERVED_MODELS}
        self._errors: dict[str, str] = {}

    def source(self, name: str) -> Path:
        """Where ``name`` is loaded from (a folder or an export directory; may not exist)."""
        if self.export_dir is not None:
            return self.export_dir
        return self.checkpoints_dir / Path(MODELS[name].default_dir).name

    def model_path(self, name: str) -> Path:
        """The model file (or the RAG folder) that would be loaded; ``NotTrainedError`` if none."""
        return resolve_source(name, self.source(name))

    def get(self, name: str) -> LoadedModel:
        """The loaded model ``name`` (loading it on first use). Raises ``NotTrainedError`` or
        ``CheckpointError`` (one line each) when it cannot be loaded."""
        loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        if name not in self._locks:
            raise KeyError(name)
        with self._locks[name]:
            if name in self._loaded:
                return self._loaded[name]
            from src.core import load_model

            path = self.model_path(name)
            start = time.perf_counter()
            try:
                model, tokenizer, device = load_model(name, self.source(name), self.device)
            except MarkError as err:
                self._errors[name] = str(err)
                raise
            except ImportError as err:  # a component that is not installed in this checkout
                message = f"the {name} model in {path} cannot be loaded: {err}"
                self._errors[name] = message
                raise CheckpointError(message) from None
            seconds = time.perf_counter() - start
            stamp_file = path / "faiss.index" if path.is_dir() else path
            loaded = LoadedModel(
                name=name,
                model=model,
                tokenizer=tokenizer,
                device=str(device),
                source=path,
                trained_at=_iso(stamp_file.stat().st_mtime),
                loaded_at=_iso(time.time()),
                load_seconds=round(seconds, 3),
                details=describe(name, model, tokenizer),
            )
            self._loaded[name] = loaded
            self._errors.pop(name, None)
            log.info("loaded %s from %s in %.1fs", name, path, seconds)
            return loaded

    def answer_model(self, requested: str | None = None) -> str:
        """The language model that answers grounded questions: ``requested`` when given (not
        ``None``/``"auto"``); else the aligned model (``rlhf``, trained on the server's grounded
        template) when one is trained, else the base ``mamba``."""
        if requested not in (None, "auto"):
            return requested
        try:
            self.model_path("rlhf")
        except MarkError:
            return "mamba"
        return "rlhf"

    def is_loaded(self, name: str) -> bool:
        return name in self._loaded

    def status(self, name: str) -> dict[str, Any]:
        """What ``GET /models`` says about ``name``, without loading it."""
        loaded = self._loaded.get(name)
        if loaded is not None:
            return {
                "name": name,
                "status": "loaded",
                "source": str(loaded.source),
                "trained_at": loaded.trained_at,
                "loaded_at": loaded.loaded_at,
                "load_seconds": loaded.load_seconds,
                "device": loaded.device,
                "details": loaded.details,
            }
        try:
            path = self.model_path(name)
        except NotTrainedError as err:
            return {"name": name, "status": "not_trained", "source": str(self.source(name)), "error": str(err)}
        stamp_file = path / "faiss.index" if path.is_dir() else path
        info = {"name": name, "status": "available", "source": str(path), "trained_at": _iso(stamp_file.stat().st_mtime)}
        if name in self._errors:
            info.update(status="error", error=self._errors[name])
        return info

    def preload(self, names: tuple[str, ...] = SERVED_MODELS) -> None:
        """Load every trained model of ``names`` now; untrained or broken ones are logged and skipped."""
        for name in names:
            try:
                self.get(name)
            except MarkError as err:
                log.warning("%s not loaded: %s", name, err)
