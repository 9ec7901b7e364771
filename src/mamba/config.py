"""Typed config of the Mamba language model (``configs/mamba_train.yaml``).

The spec's keys (``model.vocab_size``, ``d_model``, ``n_heads``, ``n_layers``, ``max_length``;
``training.batch_size``, ``num_epochs``, ``learning_rate``, ``mixed_precision``) plus the
shared engine's training keys and the architecture details of Mamba-2 with their defaults.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional, Union

from pydantic import ConfigDict, Field, field_validator, model_validator

from src.core.config import ExistingFile, PathsConfig, StrictModel, SystemConfig, TrainingConfig
from src.mamba.tokenizer import BYTE_SYMBOLS, MIN_VOCAB_SIZE, SPECIAL_TOKENS
from src.training.adapters import AdapterConfig


class MambaModelConfig(StrictModel):
    """Architecture: ``d_model`` -> hidden size, ``n_heads`` -> SSM heads, ``n_layers`` -> blocks,
    ``vocab_size`` -> BPE size, ``max_length`` -> training context (tokens per window)."""

    vocab_size: int = Field(5000, description="byte-level BPE vocabulary size, special tokens included")
    d_model: int = Field(256, gt=0)
    n_heads: int = Field(8, gt=0, description="SSM heads; head_dim = expand * d_model / n_heads")
    n_layers: int = Field(4, gt=0)
    max_length: int = Field(512, ge=2, description="training context: tokens per window")
    state_size: int = Field(64, gt=0, description="SSM state size per head (N)")
    expand: int = Field(2, gt=0, description="inner width = expand * d_model")
    n_groups: int = Field(1, gt=0, description="groups of heads sharing B and C")
    conv_kernel: int = Field(4, ge=1)
    chunk_size: int = Field(64, gt=0, description="SSD chunk length: speed only, same function")
    tie_embeddings: bool = Field(True, description="LM head shares the input embedding matrix")
    gradient_checkpointing: bool = Field(False, description="recompute blocks in backward: less memory, ~30% slower")
    pretrained: Optional[str] = Field(
        None,
        description="start from this pretrained Mamba-2 (a local folder in the transformers or mamba_ssm layout, "
        "or a hub id): its architecture overrides the keys above (chunk_size and max_length stay)",
    )
    tokenizer: Optional[str] = Field(
        None,
        description="a Hugging Face fast tokenizer (folder with tokenizer.json, or hub id): for a pretrained "
        "checkpoint without tokenizer files, or instead of training MARK's BPE",
    )
    compile: bool = Field(False, description="torch.compile each block (training): the first step compiles")
    adapter: Optional[AdapterConfig] = Field(
        None, description="train a LoRA adapter on model.pretrained's frozen weights instead of every weight"
    )

    @field_validator("vocab_size")
    @classmethod
    def _vocab_holds_specials_and_bytes(cls, value: int) -> int:
        if value < MIN_VOCAB_SIZE:
            raise ValueError(
                f"must be at least {MIN_VOCAB_SIZE}: {len(SPECIAL_TOKENS)} special tokens "
                f"({' '.join(SPECIAL_TOKENS)}) + {BYTE_SYMBOLS} byte symbols"
            )
        return value

    @model_validator(mode="after")
    def _shapes_divide(self) -> "MambaModelConfig":
        if (self.expand * self.d_model) % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide expand * d_model ({self.expand * self.d_model})")
        if self.n_heads % self.n_groups:
            raise ValueError(f"n_groups ({self.n_groups}) must divide n_heads ({self.n_heads})")
        if self.adapter is not None and not self.pretrained:
            raise ValueError("adapter: needs model.pretrained (a LoRA adapter adapts pretrained weights, not random ones)")
        return self


class MambaTrainingConfig(TrainingConfig):
    """The engine's keys with the spec's defaults for the Mamba model."""

    batch_size: int = Field(8, gt=0)
    num_epochs: int = Field(10, gt=0)
    learning_rate: float = Field(1e-4, gt=0)
    mixed_precision: Union[bool, Literal["no", "auto", "bf16", "fp16"]] = True
    torch_threads: int = Field(0, ge=0, description="CPU threads for torch (0: leave torch's default)")


class MambaDataConfig(StrictModel):
    # Check the default paths too: a config that leaves them out still needs the files.
    model_config = ConfigDict(**StrictModel.model_config, validate_default=True)

    train_file: ExistingFile = Path("data/lm_train.jsonl")
    val_file: ExistingFile = Path("data/lm_val.jsonl")
    tokenizer_min_frequency: int = Field(2, ge=1, description="BPE merges need at least this many occurrences")


class MambaPathsConfig(PathsConfig):
    checkpoint_dir: Path = Path("checkpoints/mamba")
    log_dir: Path = Path("logs/mamba")


class MambaTrainConfig(StrictModel):
    """``configs/mamba_train.yaml``."""

    model: MambaModelConfig = MambaModelConfig()
    training: MambaTrainingConfig = MambaTrainingConfig()
    data: MambaDataConfig
    paths: MambaPathsConfig = MambaPathsConfig()
    system: SystemConfig = SystemConfig()
