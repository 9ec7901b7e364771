"""Typed configs as Board forms: fields from the schema, the form back as the CLI's overrides,
and the CLI's one-line error next to the field."""

import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from src.board.forms import (
    FORM_COLUMNS,
    form_fields,
    form_overrides,
    form_rows,
    mark_error,
    target_configs,
    validate_form,
)
from src.board.paths import PathGuard, PathRefusedError
from src.core.config import REPO_ROOT
from src.core.errors import ConfigError
from src.mamba.config import MambaTrainConfig
from src.training import orchestrator
from tests.board.conftest import write_tiny_mamba_config


def test_fields_come_from_the_config_classes() -> None:
    fields = {f.key: f for f in form_fields(MambaTrainConfig)}
    assert fields["training.learning_rate"].kind == "float" and fields["training.learning_rate"].allowed() == "> 0"
    assert fields["training.lr_scheduler"].choices == ("constant", "linear", "cosine")
    assert fields["training.mixed_precision"].choices == (True, False, "no", "auto", "bf16", "fp16")
    assert fields["training.max_steps"].nullable and fields["training.max_steps"].allowed() == "> 0, or null"
    assert fields["model.tie_embeddings"].kind == "bool"
    assert fields["data.train_file"].kind == "path"
    assert "SSM heads" in fields["model.n_heads"].description
    # one field per key of every section, nothing hand-written
    assert len(fields) == _leaf_keys(MambaTrainConfig) >= 43
    assert {"model.adapter.r", "training.early_stopping_patience"} <= set(fields)  # nested sections are flattened


def _leaf_keys(model) -> int:
    """How many leaf keys a config class has, nested sections (``model.adapter``) flattened."""
    count = 0
    for info in model.model_fields.values():
        nested = [a for a in (typing.get_args(info.annotation) or (info.annotation,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        count += _leaf_keys(nested[0]) if nested else 1
    return count


@pytest.mark.parametrize("target", ["mamba", "transformer", "rag", "rl", "rlhf"])
def test_every_target_config_round_trips(target: str, sample_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "data").symlink_to(sample_data_dir, target_is_directory=True)
    monkeypatch.chdir(tmp_path)  # the configs' data/... paths, as in a checkout after `make data`
    config = REPO_ROOT / target_configs()[target].default_config
    rows = form_rows(target, config)
    assert rows and all(len(row) == len(FORM_COLUMNS) for row in rows)
    assert form_overrides(target, config, rows) == []  # an untouched form is the file


def test_edited_fields_become_the_cli_overrides(tmp_path: Path, sample_data_dir: Path) -> None:
    config = write_tiny_mamba_config(tmp_path, sample_data_dir)
    rows = form_rows("mamba", config)
    values = {row[0]: row for row in rows}
    assert values["model.d_model"][1] == "32" and values["training.max_steps"][1] == "400"
    values["training.learning_rate"][1] = "0.002"
    values["training.lr_scheduler"][1] = "linear"
    values["training.max_steps"][1] = "null"
    cfg, overrides = validate_form("mamba", config, rows, PathGuard([tmp_path]))
    assert overrides == ["training.max_steps=null", "training.learning_rate=0.002", "training.lr_scheduler=linear"]  # schema order
    assert cfg.training.learning_rate == 0.002 and cfg.training.lr_scheduler == "linear" and cfg.training.max_steps is None
    again = {row[0]: row[1] for row in form_rows("mamba", config)}
    assert again["training.learning_rate"] == "0.005"  # the file is not changed: the run gets overrides


@pytest.mark.parametrize("key,value", [("training.learning_rate", "-1"), ("training.lr_scheduler", "step"),
                                       ("model.d_model", "wide"), ("training.batch_size", "0")])
def test_a_bad_value_is_the_clis_one_line_error_next_to_its_field(tmp_path: Path, sample_data_dir: Path, key: str, value: str) -> None:
    config = write_tiny_mamba_config(tmp_path, sample_data_dir)
    rows = form_rows("mamba", config)
    for row in rows:
        if row[0] == key:
            row[1] = value
    with pytest.raises(ConfigError) as from_form:
        validate_form("mamba", config, rows, PathGuard([tmp_path]))
    with pytest.raises(ConfigError) as from_cli:
        orchestrator.main(["train", "--target=mamba", f"--config={config}", f"{key}={value}"])
    assert str(from_form.value) == str(from_cli.value)
    assert "\n" not in str(from_form.value) and f": {key}: " in str(from_form.value)
    marked = {row[0]: row[2] for row in mark_error(rows, from_form.value)}
    assert marked[key] == str(from_cli.value)
    assert all(not message for name, message in marked.items() if name != key)


def test_a_path_outside_the_roots_is_refused_next_to_its_field(tmp_path: Path, sample_data_dir: Path) -> None:
    config = write_tiny_mamba_config(tmp_path, sample_data_dir)
    rows = form_rows("mamba", config)
    for row in rows:
        if row[0] == "paths.checkpoint_dir":
            row[1] = "../../elsewhere"
    with pytest.raises(PathRefusedError) as refused:
        validate_form("mamba", config, rows, PathGuard([tmp_path]))
    assert {row[0]: row[2] for row in mark_error(rows, refused.value)}["paths.checkpoint_dir"].startswith("paths.checkpoint_dir")
