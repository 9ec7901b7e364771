"""Typed configs: schemas shared by every component, YAML loading and overrides.

A component declares its config as a pydantic model built from the sections here
(``model``, ``training``, ``data``, ``paths``, ``system``) and loads it with
:func:`load_config`. Unknown keys, wrong types, bad values and missing data files
become a one-line :class:`ConfigError` naming the file and the key.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from src.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"


class StrictModel(BaseModel):
    """A config section: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


class PathsConfig(StrictModel):
    checkpoint_dir: Path
    log_dir: Path


class SystemConfig(StrictModel):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 42
    num_workers: int = Field(0, ge=0)
    use_wandb: bool = False
    wandb_project: str = "mark-training"
    use_tensorboard: bool = False


class TrainingConfig(StrictModel):
    """Settings of the shared gradient-training engine (``src/training/engine.py``)."""

    batch_size: int = Field(8, gt=0)
    eval_batch_size: Optional[int] = Field(None, gt=0)
    num_epochs: int = Field(1, gt=0)
    max_steps: Optional[int] = Field(None, gt=0, description="stop after this many optimizer steps")
    learning_rate: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "cosine"
    warmup_steps: int = Field(0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    max_grad_norm: float = Field(1.0, ge=0, description="0 disables clipping")
    gradient_accumulation_steps: int = Field(1, gt=0)
    mixed_precision: Union[bool, Literal["no", "auto", "bf16", "fp16"]] = False
    eval_steps: int = Field(0, ge=0, description="validate every N optimizer steps (0: only at epoch end)")
    save_steps: int = Field(0, ge=0, description="checkpoint every N optimizer steps (0: only at epoch end)")
    save_total_limit: int = Field(2, ge=1, description="step checkpoints kept")
    log_steps: int = Field(10, gt=0)
    early_stopping_patience: Optional[int] = Field(
        None, ge=0,
        description="stop after this many validations in a row without improving the task's metric; the best "
        "weights (best_model.pt) are restored at the end (0 / null: off)",
    )
    early_stopping_min_delta: float = Field(
        0.0, ge=0, description="early stopping: an improvement smaller than this counts as none"
    )


class BaseConfig(StrictModel):
    """Every component config has these five sections; components narrow their types."""

    model: StrictModel
    training: StrictModel
    data: StrictModel
    paths: PathsConfig
    system: SystemConfig = SystemConfig()


ConfigT = TypeVar("ConfigT", bound=BaseModel)


def _set_dotted(tree: dict, dotted: str, value: Any, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{source}: cannot set '{dotted}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, Any]]:
    """``["training.num_epochs=1", "paths.checkpoint_dir=/tmp/x"]`` -> ``[(key, value)]``.

    Values are parsed as YAML scalars, so ``1`` is an int, ``true`` a bool, ``[1,2]`` a list.
    """
    parsed = []
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        key = key.strip().lstrip("-")
        if not sep or not key:
            raise ConfigError(f"override '{item}': expected key.sub=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def apply_overrides(raw: dict, overrides: list[str] | None, source: str = "<config>") -> dict:
    """Apply ``key.sub=value`` overrides to a raw config dict in place and return it."""
    for key, value in parse_overrides(overrides):
        _set_dotted(raw, key, value, source)
    return raw


def _format_validation_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "<root>"
    kind = first["type"]
    if kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "missing required key"
    else:
        msg = first["msg"]
        if "input" in first and not isinstance(first["input"], (dict, list)):
            msg += f" (got {first['input']!r})"
    more = len(err.errors()) - 1
    tail = f" (+{more} more)" if more > 0 else ""
    return f"{source}: {key}: {msg}{tail}"


def validate_config(raw: dict, schema: type[ConfigT], source: str = "<config>") -> ConfigT:
    """Validate a plain dict against ``schema``; errors are one-line ``ConfigError``."""
    try:
        return schema.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(source, err)) from None


def read_config_file(path: str | Path) -> dict:
    """The raw mapping of a YAML config file; a missing file, bad YAML or a top level that is
    not a mapping is a one-line ``ConfigError`` (with the line number for bad YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return raw


def load_config(
    path: str | Path,
    schema: type[ConfigT],
    overrides: list[str] | None = None,
) -> ConfigT:
    """Read a YAML config, apply ``key.sub=value`` overrides and validate it.

    Returns an instance of ``schema``. Raises ``ConfigError`` (one line, naming the
    file and the key) for a missing file, bad YAML, unknown key, wrong type or bad value.
    """
    path = Path(path)
    raw = read_config_file(path)
    apply_overrides(raw, overrides, str(path))
    return validate_config(raw, schema, str(path))


def config_to_dict(cfg: BaseModel) -> dict:
    """A JSON/YAML-safe dict of the config (paths as strings)."""
    return json.loads(cfg.model_dump_json())


def config_hash(cfg: BaseModel) -> str:
    """Stable short hash of a config's content: used to tell whether outputs are current."""
    blob = json.dumps(config_to_dict(cfg), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def save_config(cfg: BaseModel, path: str | Path) -> Path:
    """Write the effective config as YAML (atomically) and return its path."""
    from src.core.checkpoint import atomic_write_text

    path = Path(path)
    atomic_write_text(path, yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return path


def _existing_file(path: Path) -> Path:
    if not Path(path).is_file():
        raise ValueError(f"file not found: {path} (the sample data is made by `python -m src.data.prepare`)")
    return path


# A path that must name an existing file when the config is loaded.
ExistingFile = Annotated[Path, AfterValidator(_existing_file)]


__all__ = [
    "apply_overrides",
    "BaseConfig",
    "ConfigError",
    "ExistingFile",
    "PathsConfig",
    "StrictModel",
    "SystemConfig",
    "TrainingConfig",
    "config_hash",
    "config_to_dict",
    "load_config",
    "parse_overrides",
    "read_config_file",
    "save_config",
    "validate_config",
]
