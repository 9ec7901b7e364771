"""Fixtures of the RLHF tests: a tiny trained Mamba base model (once per session) and tiny
RLHF configs that run every stage in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from src.scripts import train_mamba


@pytest.fixture(scope="session")
def tiny_base_model(sample_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``best_model.pt`` of a 1-layer, 32-wide Mamba trained for a few steps on the sample corpus."""
    work = tmp_path_factory.mktemp("rlhf_base")
    train_mamba.main([
        "--config", "configs/mamba_train.yaml", "--device", "cpu",
        f"data.train_file={sample_data_dir / 'lm_train.jsonl'}", f"data.val_file={sample_data_dir / 'lm_val.jsonl'}",
        "model.vocab_size=400", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.state_size=16",
        "model.chunk_size=16", "model.max_length=64", "training.batch_size=16", "training.max_steps=25",
        "training.learning_rate=0.005", "training.warmup_steps=2", "training.log_steps=5", "training.torch_threads=1",
        "training.mixed_precision=false", f"paths.checkpoint_dir={work / 'mamba'}", f"paths.log_dir={work / 'logs'}",
        "system.seed=0",
    ])
    return work / "mamba" / "best_model.pt"


def tiny_rlhf_config(base_model: Path, data_dir: Path, work: Path, **sections) -> dict:
    """An RLHF config that runs every stage at test size (a few seconds each)."""
    config = {
        "model": {"base_checkpoint": str(base_model), "max_prompt_tokens": 24, "max_response_tokens": 16},
        "training": {
            "sft": {"batch_size": 8, "num_epochs": 1, "max_train_examples": 48, "max_val_examples": 16,
                    "learning_rate": 0.003, "log_steps": 2},
            "reward": {"batch_size": 8, "num_epochs": 1, "max_train_examples": 48, "max_val_examples": 16,
                       "learning_rate": 0.001, "normalization_examples": 16, "log_steps": 2},
            "ppo": {"num_steps": 3, "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2,
                    "learning_rate": 0.0003, "max_new_tokens": 8, "save_steps": 1},
            "torch_threads": 1,
        },
        "evaluation": {"num_prompts": 8, "max_new_tokens": 8, "batch_size": 8, "samples_in_report": 2},
        "data": {
            "sft_train_file": str(data_dir / "sft_train.jsonl"), "sft_val_file": str(data_dir / "sft_val.jsonl"),
            "preferences_train_file": str(data_dir / "preferences_train.jsonl"),
            "preferences_val_file": str(data_dir / "preferences_val.jsonl"),
        },
        "paths": {"checkpoint_dir": str(work / "rlhf"), "log_dir": str(work / "logs")},
        "system": {"device": "cpu", "seed": 0},
    }
    for name, values in sections.items():
        config[name] = {**config.get(name, {}), **values}
    return config


def write_yaml(path: Path, content: dict) -> Path:
    path.write_text(yaml.safe_dump(content, sort_keys=False))
    return path


@pytest.fixture
def rlhf_config_file(tiny_base_model: Path, sample_data_dir: Path, tmp_path: Path) -> Path:
    """A tiny ``rlhf.yaml`` in ``tmp_path`` whose outputs go to ``tmp_path/rlhf``."""
    return write_yaml(tmp_path / "rlhf.yaml", tiny_rlhf_config(tiny_base_model, sample_data_dir, tmp_path))
