"""Fixtures of the RLHF tests: a tiny trained Mamba base model (once per session), a tiny
BERT-style encoder for the encoder reward model, and tiny RLHF configs that run every stage in seconds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
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


@pytest.fixture(scope="session")
def tiny_encoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding a 2-layer, 32-wide BERT (random weights) with MiniLM's word-piece
    tokenizer: the encoder reward model's code path at test size (MiniLM itself is 22M parameters)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from src.core.hub import minilm_local_path

    folder = tmp_path_factory.mktemp("tiny_encoder")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_local_path()))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=128)
    BertModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_rlhf_config(base_model: Path, data_dir: Path, work: Path, encoder: Path | None = None, **sections) -> dict:
    """An RLHF config that runs every stage at test size (a few seconds each); the reward
    model is the Mamba one, or the encoder one on ``encoder`` (a folder) when given."""
    reward_backbone = {"backbone": "mamba"} if encoder is None else {
        "backbone": "encoder", "encoder_model": str(encoder), "max_length": 64, "learning_rate": 0.0005}
    config = {
        "model": {"base_checkpoint": str(base_model), "max_prompt_tokens": 24, "max_response_tokens": 16},
        "training": {
            "sft": {"batch_size": 8, "num_epochs": 1, "max_train_examples": 48, "max_val_examples": 16,
                    "learning_rate": 0.003, "log_steps": 2},
            "reward": {"batch_size": 8, "num_epochs": 1, "max_train_examples": 48, "max_val_examples": 16,
                       "learning_rate": 0.001, "normalization_examples": 16, "log_steps": 2, **reward_backbone},
            "dpo": {"batch_size": 8, "num_epochs": 1, "max_train_examples": 32, "max_val_examples": 8,
                    "learning_rate": 0.001, "beta": 0.1, "log_steps": 2},
            "ppo": {"num_steps": 3, "rollout_batch_size": 8, "mini_batch_size": 4, "ppo_epochs": 2,
                    "learning_rate": 0.0003, "max_new_tokens": 8, "save_steps": 1},
            "torch_threads": 1,
        },
        "evaluation": {"num_prompts": 8, "num_pairs": 24, "max_new_tokens": 8, "batch_size": 8, "samples_in_report": 2},
        "data": {
            **{f"sft_{s}_file": str(data_dir / f"sft_{s}.jsonl") for s in ("train", "val", "test")},
            **{f"preferences_{s}_file": str(data_dir / f"preferences_{s}.jsonl") for s in ("train", "val", "test")},
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
