"""A target's typed config as form fields, and a filled form back as the CLI's overrides.

The fields come from the pydantic classes themselves (``MambaTrainConfig``, ``RLHFConfig``,
...): one per leaf key, with its type, bounds (``gt``/``ge``/``lt``/``le``), choices
(``Literal``) and description. A form is a table of rows ``[key, value, error, type,
allowed, description]`` (``error``: the one-line message when that key is wrong); values are written and read as the command line writes them (YAML
scalars: ``0.001``, ``true``, ``null``, ``[1, 3]``). The values that differ from the config
file become ``key=value`` overrides, and the config is loaded by the target's own loader
with them, so a bad value is the very one-line ``ConfigError`` the CLI prints.
"""

from __future__ import annotations

import json
import re
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, Union

import annotated_types
from pydantic import BaseModel

from src.board.paths import PathGuard, PathRefusedError
from src.core.config import config_to_dict, load_config, parse_overrides
from src.core.errors import ConfigError, MarkError

FORM_COLUMNS = ["key", "value", "error", "type", "allowed", "description"]


@dataclass(frozen=True)
class TargetConfig:
    """How ``mark train --target=<name>`` reads its config: the default file, the schema and
    the loader (``load(path, overrides) -> config``). ``schema`` None: no single config (the
    full pipeline reads a folder of them)."""

    default_config: str
    schema: type[BaseModel] | None
    load: Callable[[str | Path, list[str]], BaseModel] | None


def target_configs() -> dict[str, TargetConfig]:
    """Every training target's config, from the entry points' own constants and schemas."""
    from src.classifier.config import TransferConfig
    from src.mamba.config import MambaTrainConfig
    from src.rag.config import RagConfig
    from src.rl.config import RLConfig
    from src.rlhf.config import RLHFConfig, load_rlhf_config
    from src.scripts import train_mamba, train_rag_indexer, train_rl, train_transfer
    from src.training import rlhf_pipeline

    def loader(schema):
        return lambda path, overrides: load_config(path, schema, overrides)

    return {
        "mamba": TargetConfig(train_mamba.DEFAULT_CONFIG, MambaTrainConfig, loader(MambaTrainConfig)),
        "transformer": TargetConfig(train_transfer.DEFAULT_CONFIG, TransferConfig, loader(TransferConfig)),
        "rag": TargetConfig(train_rag_indexer.DEFAULT_CONFIG, RagConfig, loader(RagConfig)),
        "rl": TargetConfig(train_rl.DEFAULT_CONFIG, RLConfig, loader(RLConfig)),
        "rlhf": TargetConfig(rlhf_pipeline.DEFAULT_CONFIG, RLHFConfig, load_rlhf_config),
        "full-pipeline": TargetConfig("configs", None, None),
    }


@dataclass(frozen=True)
class FieldSpec:
    """One leaf key of a config: ``kind`` is bool | int | float | str | path | choice | list | any."""

    key: str
    kind: str
    nullable: bool = False
    choices: tuple = ()
    bounds: tuple[tuple[str, Any], ...] = ()
    description: str = ""

    def allowed(self) -> str:
        """The bounds or choices as the form shows them (``> 0``, ``cosine | linear``)."""
        parts = [" | ".join(format_value(c) for c in self.choices)] if self.choices else []
        symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
        parts += [f"{symbols[name]} {format_value(value)}" for name, value in self.bounds]
        if self.nullable:
            parts.append("or null")
        return ", ".join(parts)


def _strip_optional(annotation) -> tuple[Any, bool]:
    origin = typing.get_origin(annotation)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = len(args) < len(typing.get_args(annotation))
        if len(args) == 1:
            return args[0], nullable
        return Union[tuple(args)], nullable
    return annotation, False


def _kind(annotation) -> tuple[str, tuple]:
    """``(kind, choices)`` of a (non-optional) annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _kind(typing.get_args(annotation)[0])
    if origin is Literal:
        return "choice", tuple(typing.get_args(annotation))
    if origin in (Union, types.UnionType):  # e.g. mixed_precision: bool or "no" / "bf16" / "fp16"
        choices: list = []
        for arg in typing.get_args(annotation):
            kind, sub = _kind(arg)
            if kind == "bool":
                choices += [True, False]
            elif kind == "choice":
                choices += list(sub)
            else:
                return "any", ()
        return "choice", tuple(choices)
    if origin in (list, tuple, Sequence):
        return "list", ()
    if annotation is bool:
        return "bool", (True, False)
    for kind, cls in (("int", int), ("float", float), ("str", str), ("path", Path)):
        if annotation is cls:
            return kind, ()
    return "any", ()


def _bounds(metadata: Sequence[Any]) -> tuple[tuple[str, Any], ...]:
    found = []
    for item in metadata:
        for name in ("gt", "ge", "lt", "le"):
            cls = getattr(annotated_types, name.capitalize())
            if isinstance(item, cls):
                found.append((name, getattr(item, name)))
    return tuple(found)


def _is_section(annotation) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def form_fields(schema: type[BaseModel], prefix: str = "") -> list[FieldSpec]:
    """The leaf keys of ``schema`` in declaration order (sections recursed into)."""
    specs: list[FieldSpec] = []
    for name, info in schema.model_fields.items():
        annotation, nullable = _strip_optional(info.annotation)
        key = f"{prefix}{name}"
        if _is_section(annotation):
            specs += form_fields(annotation, f"{key}.")
            continue
        kind, choices = _kind(annotation)
        specs.append(FieldSpec(key, kind, nullable, choices, _bounds(info.metadata), info.description or ""))
    return specs


def format_value(value: Any) -> str:
    """A value as the command line writes it (the inverse of the YAML scalar parsing)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def resolve_config_path(target: str, config: str | Path | None, guard: PathGuard) -> Path:
    """The config file of a run (the target's default when empty), inside the allowed roots."""
    spec = target_configs().get(target)
    if spec is None:
        raise ConfigError(f"unknown target '{target}'; valid targets: {', '.join(target_configs())}")
    return guard.resolve(config or spec.default_config, must_exist=True, what="config file")


def load_target_config(target: str, config_path: str | Path, overrides: Sequence[str] = ()) -> BaseModel:
    """The validated config of ``target`` as its CLI loads it (``ConfigError``: the CLI's one line)."""
    spec = target_configs()[target]
    if spec.load is None:
        raise ConfigError(f"{target}: reads a folder of configs ({config_path}), not one config file")
    return spec.load(config_path, list(overrides))


def form_rows(target: str, config_path: str | Path) -> list[list[str]]:
    """The form of ``config_path``: one row ``[key, value, error, type, allowed, description]`` per
    leaf key of the target's schema, valued from the loaded config (defaults included)."""
    spec = target_configs()[target]
    if spec.schema is None:
        return []
    values = _flatten(config_to_dict(load_target_config(target, config_path)))
    rows = []
    for field in form_fields(spec.schema):
        kind = field.kind + (" or null" if field.nullable else "")
        rows.append([field.key, format_value(values.get(field.key)), "", kind, field.allowed(), field.description])
    return rows


def form_overrides(target: str, config_path: str | Path, rows: Sequence[Sequence[Any]]) -> list[str]:
    """The ``key=value`` overrides of the rows whose value differs from the config file's."""
    current = {row[0]: row[1] for row in form_rows(target, config_path)}
    overrides = []
    for row in rows:
        key, value = str(row[0]), "" if row[1] is None else str(row[1]).strip()
        if key not in current:
            raise ConfigError(f"{config_path}: {key}: unknown key")
        if _parsed(value) != _parsed(current[key]):
            overrides.append(f"{key}={value}")
    return overrides


def _parsed(text: str) -> Any:
    return parse_overrides([f"x={text}"])[0][1]


def check_config_paths(cfg: BaseModel, guard: PathGuard, prefix: str = "") -> None:
    """Every ``Path`` value of ``cfg`` must lie inside the allowed roots (``PathRefusedError``)."""
    for name in type(cfg).model_fields:
        value = getattr(cfg, name)
        if isinstance(value, BaseModel):
            check_config_paths(value, guard, f"{prefix}{name}.")
        elif isinstance(value, Path):
            guard.resolve(value, what=f"{prefix}{name}")


def validate_form(target: str, config_path: str | Path, rows: Sequence[Sequence[Any]], guard: PathGuard) -> tuple[BaseModel, list[str]]:
    """``(config, overrides)`` of a filled form, loaded exactly as the CLI would load
    ``--config config_path overrides...``; raises its one-line ``ConfigError`` (or a
    ``PathRefusedError`` for a path outside the allowed roots)."""
    overrides = form_overrides(target, config_path, rows)
    cfg = load_target_config(target, config_path, overrides)
    check_config_paths(cfg, guard)
    return cfg, overrides


def error_field(err: MarkError) -> str | None:
    """The config key a one-line ``ConfigError`` names (``file: key: message``), if any."""
    parts = str(err).split(": ", 2)
    return parts[1] if len(parts) == 3 and re.fullmatch(r"[A-Za-z_][\w.]*", parts[1]) else None


def mark_error(rows: Sequence[Sequence[Any]], err: MarkError) -> list[list[Any]]:
    """The rows with ``err``'s message in the ``error`` cell of the key it names (all other
    error cells cleared)."""
    key = error_field(err)
    if key is None and isinstance(err, PathRefusedError):
        key = str(err).split(" ", 1)[0]
    return [[row[0], row[1], str(err) if row[0] == key else "", *row[3:]] for row in rows]


def clear_errors(rows: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """The rows with every ``error`` cell empty."""
    return [[row[0], row[1], "", *row[3:]] for row in rows]
