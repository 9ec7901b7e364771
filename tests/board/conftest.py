"""Fixtures of the Board tests: a Board workspace over the tiny serving models (built once per
session by ``tests/api/fixtures.py``), with its own copy of the RAG index so tests may change it,
and a tiny Mamba training config for runs started as real subprocesses."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from tests.api.fixtures import tiny_checkpoints  # noqa: F401  (the session fixture, shared with tests/api)

from src.board.workspace import BoardSettings, Workspace


def tiny_mamba_overrides(work: Path, max_steps: int = 400, num_epochs: int = 1) -> dict:
    """A Mamba config small enough to train a step in a few milliseconds on one thread."""
    return {
        "model": {"vocab_size": 300, "d_model": 32, "n_heads": 2, "n_layers": 1, "state_size": 16, "max_length": 64, "chunk_size": 16},
        "training": {"max_steps": max_steps, "num_epochs": num_epochs, "batch_size": 4, "log_steps": 2, "eval_steps": 10, "eval_batch_size": 8,
                     "mixed_precision": False, "torch_threads": 1, "warmup_steps": 0, "learning_rate": 0.005},
        "paths": {"checkpoint_dir": str(work / "checkpoints" / "tiny_mamba"), "log_dir": str(work / "logs" / "tiny_mamba")},
        "system": {"device": "cpu", "seed": 0},
    }


def write_tiny_mamba_config(work: Path, sample_data_dir: Path, max_steps: int = 400, num_epochs: int = 1) -> Path:
    """``work/tiny_mamba.yaml``: the tiny model on 8 short documents of the sample corpus."""
    import json

    docs = [json.loads(line) for line in (sample_data_dir / "lm_train.jsonl").read_text().splitlines()[:10]]
    data = work / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "lm_train.jsonl").write_text("".join(json.dumps({**d, "text": d["text"][:4000]}) + "\n" for d in docs[:8]))
    (data / "lm_val.jsonl").write_text("".join(json.dumps({**d, "text": d["text"][:1500]}) + "\n" for d in docs[8:]))
    config = tiny_mamba_overrides(work, max_steps, num_epochs)
    config["data"] = {"train_file": str(data / "lm_train.jsonl"), "val_file": str(data / "lm_val.jsonl")}
    path = work / "tiny_mamba.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture
def board_project(tmp_path: Path, tiny_checkpoints: Path) -> Path:  # noqa: F811
    """A folder with ``checkpoints/`` holding the tiny mamba (linked) and a copy of the tiny RAG index."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "mamba").symlink_to(tiny_checkpoints / "mamba", target_is_directory=True)
    shutil.copytree(tiny_checkpoints / "rag", checkpoints / "rag")
    return tmp_path


@pytest.fixture
def workspace(board_project: Path):
    """A Board workspace whose data root is ``board_project`` (models load on first use, on the CPU)."""
    settings = BoardSettings(
        data_roots=[board_project], checkpoints_dir=board_project / "checkpoints", logs_dir=board_project / "logs",
        runs_dir=board_project / "runs", preferences_file=board_project / "prefs" / "preferences.jsonl",
        uploads_dir=board_project / "uploads", reports_dir=board_project / "reports", exports_dir=board_project / "exports",
        device="cpu", max_upload_bytes=4096,
    )
    ws = Workspace(settings)
    yield ws
    ws.close()
