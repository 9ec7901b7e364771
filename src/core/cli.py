"""What every command-line entry point shares: common options and one-line errors."""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Sequence

from src.core.errors import MarkError, TrainingStopped


def add_common_args(parser: argparse.ArgumentParser, default_config: str, evaluate: bool = False) -> None:
    """``--config``, ``--device``, ``--resume`` (and ``--evaluate``) plus ``key.sub=value`` overrides."""
    parser.add_argument("--config", default=default_config, help=f"YAML config (default: {default_config})")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None, help="overrides system.device")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    if evaluate:
        parser.add_argument("--evaluate", action="store_true", help="run evaluation after training")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides, e.g. training.num_epochs=1")


def overrides_with_device(args: argparse.Namespace) -> list[str]:
    """The command line's overrides, with ``--device`` turned into ``system.device=...``."""
    overrides = list(getattr(args, "overrides", None) or [])
    if getattr(args, "device", None):
        overrides.append(f"system.device={args.device}")
    return overrides


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> int:
    """Run ``main(argv)``; a ``MarkError`` becomes one line on stderr and its exit code."""
    try:
        main(argv)
    except MarkError as err:
        print(f"{'stopped' if isinstance(err, TrainingStopped) else 'error'}: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
