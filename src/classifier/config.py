"""The typed config of the document classifier (``configs/transfer_train.yaml``).

Sections: ``model`` (pretrained encoder, labels, how long documents are read),
``training`` (the shared engine's keys with fine-tuning defaults), ``data`` (JSONL
splits of ``{text, label}`` and the label names), ``paths``, ``system``. Unknown keys and
bad values are one-line ``ConfigError``s (see :func:`src.core.config.load_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import Field, model_validator

from src.core.config import BaseConfig, ExistingFile, PathsConfig, StrictModel, SystemConfig, TrainingConfig
from src.training.adapters import AdapterConfig


class ClassifierModelConfig(StrictModel):
    base_model: str = Field(
        "bert-base-uncased",
        description="hub id, local folder, or 'minilm-local' (all-MiniLM-L6-v2 shipped in a PyPI package)",
    )
    num_labels: int = Field(3, ge=2, description="must equal the number of label names")
    max_length: int = Field(256, ge=8, description="word-pieces per window, special tokens included")
    long_text: Literal["truncate", "sliding_window"] = Field(
        "truncate", description="truncate: read the first max_length word-pieces; sliding_window: mean of window logits"
    )
    window_stride: int = Field(128, gt=0, description="sliding_window: word-pieces between the starts of two windows")
    max_windows: int = Field(8, gt=0, description="sliding_window: windows read per document at most")
    classifier_dropout: Optional[float] = Field(None, ge=0, lt=1, description="None: the encoder's hidden dropout")
    adapter: Optional[AdapterConfig] = Field(
        None, description="a LoRA adapter on the frozen encoder (name its linear layers, e.g. target_modules: "
        "[query, value] for BERT); the new classification head trains fully beside it",
    )


class ClassifierTrainingConfig(TrainingConfig):
    """The engine's keys, with the spec's fine-tuning defaults."""

    batch_size: int = Field(16, gt=0)
    num_epochs: int = Field(5, gt=0)
    learning_rate: float = Field(5e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = "linear"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)


class ClassifierDataConfig(StrictModel):
    train_file: ExistingFile = Field(Path("data/classification_train.jsonl"), validate_default=True)
    val_file: Optional[ExistingFile] = Field(Path("data/classification_val.jsonl"), validate_default=True)
    test_file: Optional[ExistingFile] = Field(Path("data/classification_test.jsonl"), validate_default=True)
    label_names: Optional[list[str]] = Field(
        None, description="label names in index order; default: labels.json beside train_file, else the sorted names in the data"
    )
    max_train_examples: Optional[int] = Field(None, gt=0, description="use only the first N training examples")
    max_eval_examples: Optional[int] = Field(None, gt=0, description="use only the first N validation / test examples")

    @model_validator(mode="after")
    def _distinct_label_names(self) -> "ClassifierDataConfig":
        names = self.label_names
        if names is not None and (len(set(names)) != len(names) or not all(names)):
            raise ValueError(f"label_names must be distinct, non-empty names (got {names})")
        return self


class ClassifierPathsConfig(PathsConfig):
    checkpoint_dir: Path = Path("checkpoints/transfer")
    log_dir: Path = Path("logs/transfer")


class TransferConfig(BaseConfig):
    model: ClassifierModelConfig = ClassifierModelConfig()
    training: ClassifierTrainingConfig = ClassifierTrainingConfig()
    data: ClassifierDataConfig = Field(default_factory=ClassifierDataConfig)
    paths: ClassifierPathsConfig = ClassifierPathsConfig()
    system: SystemConfig = SystemConfig()
