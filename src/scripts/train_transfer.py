"""Fine-tune a pretrained BERT-style encoder to label documents, then evaluate it on the test split.

    python -m src.scripts.train_transfer --config configs/transfer_train.yaml [--resume]
        [--device cpu|cuda|auto] [key.sub=value ...]

Writes ``checkpoints/transfer/{checkpoint_epoch_N,best_model}.pt`` and
``logs/transfer/{train.log,metrics.jsonl,test_metrics.json,confusion_matrix.png}``;
the recipe is :mod:`src.classifier.train`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from src.classifier.config import TransferConfig
from src.classifier.train import run
from src.core.cli import add_common_args, overrides_with_device, run_cli
from src.core.config import load_config

DEFAULT_CONFIG = "configs/transfer_train.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.scripts.train_transfer", description=__doc__.split("\n\n")[0])
    add_common_args(parser, DEFAULT_CONFIG)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line, load the config, train and test; returns the run's summary."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, TransferConfig, overrides_with_device(args))
    return run(cfg, resume=args.resume)


__all__ = ["build_parser", "main", "run"]

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
