"""Whether a stage's outputs are current: the pipeline's state file.

A stage is *current* when the state file (``<output-dir>/pipeline_state.json``) says it
finished with

* the same config (``config_hash`` of the validated config, ``--device`` included),
* the same inputs: the sha256 of every existing file or folder its config names outside
  ``paths`` (data files, and upstream models such as the RAG index the RL stage reads or
  the Mamba checkpoint RLHF starts from, so retraining an upstream model reruns the stages
  that use it),
* and every output it reported still there, byte for byte (sha256; append-only logs only
  need to exist).

A rerun skips current stages unless ``--force``.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from src.core.checkpoint import atomic_write_json, file_sha256
from src.core.config import config_hash

STATE_FILE = "pipeline_state.json"
STATE_FORMAT = "mark-pipeline-state"
# Files that are appended to by design: their existence is checked, not their content.
APPEND_ONLY_SUFFIXES = (".log", ".jsonl")


def path_sha256(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and contents, sorted; hidden
    temporary files of atomic writes left out)."""
    if path.is_file():
        return file_sha256(path)
    digest = hashlib.sha256()
    for child in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        digest.update(f"{child.relative_to(path).as_posix()}\0{file_sha256(child)}\n".encode())
    return digest.hexdigest()


def _paths_in(value: Any) -> Iterator[Path]:
    if isinstance(value, Path):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from _paths_in(getattr(value, name))
    elif isinstance(value, dict):
        for item in value.values():
            yield from _paths_in(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _paths_in(item)


def config_inputs(cfg: BaseModel) -> dict[str, str]:
    """sha256 of every existing file or folder named by a path in ``cfg`` outside its
    ``paths`` section (which holds the stage's own outputs)."""
    inputs: dict[str, str] = {}
    for name in type(cfg).model_fields:
        if name == "paths":
            continue
        for path in _paths_in(getattr(cfg, name)):
            if path.exists() and str(path) not in inputs:
                inputs[str(path)] = path_sha256(path)
    return dict(sorted(inputs.items()))


def fingerprint(cfg: BaseModel, inputs: dict[str, str] | None = None) -> dict[str, Any]:
    """What a stage's outputs depend on: its config's hash and its inputs' checksums."""
    return {"config_hash": config_hash(cfg), "inputs": config_inputs(cfg) if inputs is None else inputs}


def output_records(outputs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{name: {"path", "sha256"}}`` of a component's reported outputs that exist.

    Folders and append-only logs get ``sha256: None`` (checked for existence only)."""
    records: dict[str, dict[str, Any]] = {}
    for name, value in outputs.items():
        if not isinstance(value, (str, Path)) or not str(value):
            continue
        path = Path(value)
        if not path.exists():
            continue
        checksum = file_sha256(path) if path.is_file() and not path.name.endswith(APPEND_ONLY_SUFFIXES) else None
        records[name] = {"path": str(path), "sha256": checksum}
    return records


def why_not_current(entry: dict[str, Any] | None, expected: dict[str, Any]) -> str | None:
    """``None`` when ``entry`` (a stage's state) is current for ``expected`` (its fingerprint
    now), else the reason it is not, in a few words."""
    if not entry:
        return "not run yet"
    recorded = entry.get("fingerprint") or {}
    if recorded.get("config_hash") != expected["config_hash"]:
        return "config changed"
    old_inputs, new_inputs = recorded.get("inputs") or {}, expected["inputs"]
    changed = sorted(k for k in set(old_inputs) | set(new_inputs) if old_inputs.get(k) != new_inputs.get(k))
    if changed:
        return f"inputs changed ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''})"
    outputs = entry.get("outputs") or {}
    if not outputs:
        return "no outputs recorded"
    for name, record in outputs.items():
        path = Path(record["path"])
        if not path.exists():
            return f"output missing ({path})"
        if record.get("sha256") and (not path.is_file() or file_sha256(path) != record["sha256"]):
            return f"output changed since ({path})"
    return None


class PipelineState:
    """The state file: per stage, its fingerprint, outputs (with checksums) and metrics."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text(encoding="utf-8"))
                if isinstance(data, dict) and data.get("format") == STATE_FORMAT:
                    self.stages = dict(data.get("stages") or {})
            except (ValueError, OSError):
                self.stages = {}  # unreadable state: every stage simply runs again

    def get(self, stage: str) -> dict[str, Any] | None:
        return self.stages.get(stage)

    def record(self, stage: str, fingerprint_: dict[str, Any], outputs: dict[str, Any], metrics: dict[str, Any],
               seconds: float, config_path: str | None = None) -> dict[str, Any]:
        """Remember that ``stage`` finished; returns the entry written."""
        entry = {
            "fingerprint": fingerprint_,
            "outputs": output_records(outputs),
            "metrics": json_safe(metrics),
            "seconds": round(seconds, 2),
            "config": config_path,
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        self.stages[stage] = entry
        self.save()
        return entry

    def forget(self, stage: str) -> None:
        """A stage failed or was interrupted: its previous outputs may be half overwritten."""
        if self.stages.pop(stage, None) is not None:
            self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {"format": STATE_FORMAT, "version": 1, "stages": self.stages})


def json_safe(value: Any) -> Any:
    """``value`` with only JSON types (NaN -> None, tensors/numpy scalars -> numbers, else str)."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return json_safe(value.item())
    return str(value)
