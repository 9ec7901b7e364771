"""Typed configs: one-line errors naming the file and key, exit code 2, overrides."""

import subprocess
import sys
from pathlib import Path

import pytest

from src.core.config import PathsConfig, StrictModel, TrainingConfig, load_config, parse_overrides
from src.core.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "tests" / "training" / "char_lm_script.py"


class _Cfg(StrictModel):
    training: TrainingConfig
    paths: PathsConfig


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


GOOD = "training:\n  batch_size: 4\npaths:\n  checkpoint_dir: c\n  log_dir: l\n"


def test_loads_and_applies_overrides(tmp_path):
    cfg = load_config(_write(tmp_path, GOOD), _Cfg, ["training.num_epochs=3", "training.learning_rate=0.5", "paths.log_dir=/tmp/x"])
    assert cfg.training.batch_size == 4
    assert cfg.training.num_epochs == 3
    assert cfg.training.learning_rate == 0.5
    assert str(cfg.paths.log_dir) == "/tmp/x"


def test_override_values_are_yaml_typed():
    assert parse_overrides(["a.b=1", "a.c=true", "a.d=[1, 2]", "a.e=text"]) == [
        ("a.b", 1), ("a.c", True), ("a.d", [1, 2]), ("a.e", "text")
    ]


@pytest.mark.parametrize(
    "text, overrides, key, words",
    [
        (GOOD + "training_typo: 1\n", [], "training_typo", "unknown key"),
        (GOOD.replace("batch_size: 4", "batch_size: 4\n  bacth_size: 3"), [], "training.bacth_size", "unknown key"),
        (GOOD.replace("batch_size: 4", "batch_size: four"), [], "training.batch_size", "integer"),
        (GOOD, ["training.learning_rate=-1"], "training.learning_rate", "greater than 0"),
        ("training: {}\n", [], "paths", "missing"),
    ],
)
def test_bad_config_is_one_line_naming_file_and_key(tmp_path, text, overrides, key, words):
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        load_config(path, _Cfg, overrides)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}:")
    assert words in message


def test_bad_yaml_names_the_line(tmp_path):
    path = _write(tmp_path, "training:\n  batch_size: [1,\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml:\d+: invalid YAML"):
        load_config(path, _Cfg)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml", _Cfg)


def test_cli_exit_code_2_and_no_traceback(tmp_path):
    path = _write(tmp_path, GOOD + "system:\n  device: cpu\n  sed: 3\n")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--config", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip() == f"error: {path}: system.sed: unknown key"
