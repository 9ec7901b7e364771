"""Logging for every component: console + ``logs/<component>/train.log`` + ``metrics.jsonl``.

``MetricsLogger`` appends one JSON object per logged step and per evaluation, and
forwards to TensorBoard and WandB when they are switched on in ``system``. They are
off by default; a missing package is a one-line warning, never a crash or a prompt.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def get_logger(name: str = "mark") -> logging.Logger:
    """The logger for ``name`` under MARK's root logger."""
    return logging.getLogger(name if name.startswith("mark") else f"mark.{name}")


def setup_logging(component: str, log_dir: str | Path | None = None, main_process: bool = True) -> logging.Logger:
    """Console (stderr) handler with timestamps and, if ``log_dir``, ``<log_dir>/train.log``.

    Returns the component's logger. Calling again replaces the handlers, so a process
    that trains several components logs each to its own file.
    """
    root = logging.getLogger("mark")
    root.setLevel(logging.INFO if main_process else logging.WARNING)
    root.propagate = False
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    formatter = logging.Formatter(LOG_FORMAT, DATE_FORMAT)
    console = _TqdmConsoleHandler()
    console.setFormatter(formatter)
    root.addHandler(console)
    if log_dir is not None and main_process:
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_dir / "train.log")
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    return get_logger(component)


class _TqdmConsoleHandler(logging.StreamHandler):
    """Writes log lines above any active progress bar instead of through it."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # never let logging break training
            self.handleError(record)


class MetricsLogger:
    """Appends metrics to ``<log_dir>/metrics.jsonl``; optionally to TensorBoard / WandB."""

    def __init__(
        self,
        log_dir: str | Path,
        component: str,
        enabled: bool = True,
        use_tensorboard: bool = False,
        use_wandb: bool = False,
        wandb_project: str = "mark-training",
        config: dict | None = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(log_dir) / "metrics.jsonl"
        self.log = get_logger(component)
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if use_tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(log_dir) / "tensorboard"))
            except ImportError:
                self.log.warning("use_tensorboard is on but tensorboard is not installed (pip install tensorboard); skipping")
        if use_wandb:
            try:
                import wandb

                # Never prompt for a login: without an API key, log offline.
                mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
                self._wandb = wandb.init(project=wandb_project, name=component, config=config, mode=mode, dir=str(log_dir))
            except ImportError:
                self.log.warning("use_wandb is on but wandb is not installed (pip install wandb); skipping")

    def log_metrics(self, metrics: dict[str, Any], step: int, kind: str = "train") -> None:
        """Record ``metrics`` at ``step``; ``kind`` is e.g. ``train`` or ``eval``."""
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), "kind": kind, "step": int(step)}
        record.update({k: _plain(v) for k, v in metrics.items()})
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        numeric = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k not in ("time", "step")}
        if self._tb is not None:
            for key, value in numeric.items():
                self._tb.add_scalar(f"{kind}/{key}", value, step)
        if self._wandb is not None:
            self._wandb.log({f"{kind}/{k}": v for k, v in numeric.items()}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def _plain(value: Any) -> Any:
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    if isinstance(value, float):
        return round(value, 6)
    return value
