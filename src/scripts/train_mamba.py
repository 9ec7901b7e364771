"""Train MARK's Mamba long-document language model.

    python -m src.scripts.train_mamba --config configs/mamba_train.yaml [--resume] [--device cpu] [key.sub=value ...]

Writes ``checkpoints/mamba/checkpoint_epoch_*.pt``, ``best_model.pt``, ``vocab.json`` and
``logs/mamba/train.log``; the recipe is :mod:`src.mamba.train`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from src.core.cli import add_common_args, overrides_with_device, run_cli
from src.core.config import load_config
from src.mamba.config import MambaTrainConfig
from src.mamba.train import run

DEFAULT_CONFIG = "configs/mamba_train.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m src.scripts.train_mamba",
        description="Train the Mamba-2 language model on the document corpus.",
    )
    add_common_args(parser, DEFAULT_CONFIG)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line, load the config and train; returns the run's summary."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, MambaTrainConfig, overrides_with_device(args))
    return run(cfg, resume=args.resume)


__all__ = ["build_parser", "main", "run"]

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
