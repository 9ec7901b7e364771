"""Checkpoint I/O, in one place for every component.

* Writes are atomic: the file is written to a temporary name in the same folder,
  flushed to disk, then renamed over the target. A crash leaves either the old file
  or the new one, never half of one.
* Reads are safe: ``torch.load(weights_only=True)``, so a checkpoint can hold tensors,
  numbers, strings, lists and dicts but no arbitrary pickled objects.
* ``latest.json`` in a checkpoint folder points at the newest resumable checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from src.core.errors import CheckpointError

LATEST_POINTER = "latest.json"


def _atomic_write(path: Path, write: Callable[[Any], None], mode: str = "wb") -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the mode a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return _atomic_write(Path(path), lambda h: h.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return _atomic_write(Path(path), lambda h: h.write(text.encode("utf-8")))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def save_checkpoint(state: dict, path: str | Path) -> Path:
    """Save a state dict (tensors, numbers, strings, lists, dicts) atomically with ``torch.save``."""
    return _atomic_write(Path(path), lambda h: torch.save(state, h))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", kind: str | None = None) -> dict:
    """Load a checkpoint safely (``weights_only=True``).

    ``kind``, when given, must match the checkpoint's ``"kind"`` entry (e.g. ``"mamba"``):
    a checkpoint of another model is refused. Any failure is a one-line ``CheckpointError``
    naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated zip, bad magic, disallowed pickle global, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: cannot read checkpoint (corrupt, truncated or unsafe): {reason[:200]}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a MARK checkpoint (expected a dict, got {type(state).__name__})")
    if kind is not None and state.get("kind") != kind:
        raise CheckpointError(f"{path}: checkpoint is for '{state.get('kind')}', expected '{kind}'")
    return state


def load_state_dict_checked(module: torch.nn.Module, state_dict: dict, path: str | Path) -> None:
    """``module.load_state_dict`` with a one-line error naming the file on any mismatch."""
    try:
        module.load_state_dict(state_dict)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise CheckpointError(f"{path}: weights do not match the model architecture: {detail[:300]}") from None


def write_latest_pointer(checkpoint_dir: str | Path, checkpoint_path: str | Path, step: int) -> None:
    """Record ``checkpoint_path`` as the newest resumable checkpoint of ``checkpoint_dir``."""
    atomic_write_json(Path(checkpoint_dir) / LATEST_POINTER, {"path": Path(checkpoint_path).name, "step": int(step)})


def find_latest_checkpoint(checkpoint_dir: str | Path, pattern: str = "checkpoint_*.pt") -> Path | None:
    """The newest resumable checkpoint in ``checkpoint_dir``, or ``None``.

    Uses ``latest.json`` when it points at an existing file, else the newest file
    matching ``pattern`` by modification time.
    """
    checkpoint_dir = Path(checkpoint_dir)
    pointer = checkpoint_dir / LATEST_POINTER
    if pointer.is_file():
        try:
            target = checkpoint_dir / json.loads(pointer.read_text())["path"]
            if target.is_file():
                return target
        except (ValueError, KeyError, TypeError):
            pass
    candidates = [p for p in checkpoint_dir.glob(pattern) if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns) if candidates else None


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()
