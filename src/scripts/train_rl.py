"""Train a PPO policy (stable-baselines3) on MARK's retrieval-policy environment or any Gymnasium env.

    python -m src.scripts.train_rl --config configs/rl_train.yaml [--resume]
        [--device cpu|cuda|auto] [key.sub=value ...]

Writes ``checkpoints/rl/{checkpoint_step_N,final_model}.pt``, ``eval_metrics.json`` and
``eval_metrics.png`` beside them, and ``logs/rl/{train.log,metrics.jsonl}``; the recipe is
:mod:`src.rl.train`.
"""

from __future__ import annotations

import argparse
from typing import Sequence

from src.core.cli import add_common_args, overrides_with_device, run_cli
from src.core.config import load_config
from src.rl.config import RLConfig
from src.rl.train import run

DEFAULT_CONFIG = "configs/rl_train.yaml"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.scripts.train_rl", description=__doc__.split("\n\n")[0])
    # --evaluate is accepted for the orchestrator's common options; evaluation always runs.
    add_common_args(parser, DEFAULT_CONFIG, evaluate=True)
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Parse the command line, load the config, train and evaluate; returns the run's summary."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args.config, RLConfig, overrides_with_device(args))
    return run(cfg, resume=args.resume, evaluate=args.evaluate)


__all__ = ["build_parser", "main", "run"]

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
