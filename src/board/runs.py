"""Training runs started from the Board: the real CLI in a detached subprocess, state on disk.

A run is ``python -m src.training.orchestrator train --target=T --config=F [--resume]
[key=value ...]`` started in the project folder in its own session, so it keeps running
when the browser (or the Board) goes away. Its record, ``<runs_dir>/<id>/run.json``, holds
the exact command line, the pid, the folders it writes and, once it has ended, its exit
code; its console output goes to ``<runs_dir>/<id>/output.log``. Every Board process (and
every browser tab) reads the same records, so they all see the same runs.

Stop sends SIGTERM: the training engine finishes the step in progress, writes a resumable
checkpoint and exits with code 143 (see ``src.training.engine``); Resume starts the same
command with ``--resume``. Progress (step/total, tokens/s, ETA) and the curves come from the
run's ``metrics.jsonl`` and its console output.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

from src.board.forms import check_config_paths, load_target_config, resolve_config_path, target_configs
from src.board.paths import PathGuard
from src.core.checkpoint import atomic_write_json
from src.core.config import REPO_ROOT
from src.core.errors import MarkError
from src.training.report import METRICS_FILE, curve_series, latest_run, read_metrics

RUN_FILE = "run.json"
OUTPUT_FILE = "output.log"
STOPPED_EXIT_CODE = 143  # src.core.errors.TrainingStopped: SIGTERM honoured, checkpoint written
# "train mamba:  40%|####      | 4/10 [00:02<00:03, 1.9it/s]" (tqdm) and the engine's "step 4/10 |" log line
_TQDM = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
_STEP = re.compile(r"step (\d+)/(\d+)")
_ERROR_LINE = re.compile(r"^(error:|Traceback|\w*Error\b|\w*Exception\b)")


@dataclass
class RunRecord:
    """What ``run.json`` holds about one run."""

    id: str
    target: str
    config: str
    overrides: list[str]
    resume: bool
    argv: list[str]
    cwd: str
    pid: int
    started: float
    log_dir: str | None = None
    checkpoint_dir: str | None = None
    ended: float | None = None
    exit_code: int | None = None
    stop_requested: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)  # earlier attempts (before a resume)

    @property
    def command(self) -> str:
        """The command line to paste in a terminal (from the project folder)."""
        return f"cd {shlex.quote(self.cwd)} && {shlex.join(self.argv)}"


def _pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not reaped, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def _clock(text: str) -> float | None:
    """``"01:02"`` / ``"1:02:03"`` (tqdm) -> seconds."""
    if "?" in text:
        return None
    seconds = 0.0
    for part in text.split(":"):
        seconds = seconds * 60 + float(part)
    return seconds


def tail(path: Path, lines: int = 40, max_bytes: int = 200_000) -> str:
    """The last ``lines`` lines of ``path`` (progress-bar redraws kept to their last state)."""
    if not path.is_file():
        return ""
    with open(path, "rb") as handle:
        handle.seek(0, os.SEEK_END)
        size = handle.tell()
        handle.seek(max(0, size - max_bytes))
        text = handle.read().decode("utf-8", errors="replace")
    rows = [row.rsplit("\r", 1)[-1] for row in text.replace("\r\n", "\n").split("\n")]
    return "\n".join([row for row in rows if row.strip()][-lines:])


def error_lines(output: str, lines: int = 8) -> str:
    """The last ``lines`` lines of a failed run's output up to its last error line (the
    CLI's ``error: ...`` line or a traceback's exception line)."""
    rows = output.splitlines()
    for index in range(len(rows) - 1, -1, -1):
        if _ERROR_LINE.match(rows[index]):
            return "\n".join(rows[max(0, index - lines + 1) : index + 1])
    return "\n".join(rows[-lines:])


class RunManager:
    """Starts, stops, resumes and lists the Board's runs (see the module docstring)."""

    def __init__(self, runs_dir: str | Path, guard: PathGuard, python: str = sys.executable) -> None:
        self.guard = guard
        self.runs_dir = guard.resolve(runs_dir, what="runs folder")
        self.python = python
        self._processes: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ records
    def _record_path(self, run_id: str) -> Path:
        if not re.fullmatch(r"[\w-]+", run_id or ""):
            raise MarkError(f"run id '{run_id}': not a run")
        return self.runs_dir / run_id / RUN_FILE

    def get(self, run_id: str) -> RunRecord:
        """The record of ``run_id`` (refreshed: a run whose process is gone is marked ended)."""
        path = self._record_path(run_id)
        if not path.is_file():
            raise MarkError(f"run '{run_id}': no such run in {self.runs_dir}")
        record = RunRecord(**json.loads(path.read_text(encoding="utf-8")))
        if record.ended is None and not self._running(record):
            self._reap(record)
            record = RunRecord(**json.loads(path.read_text(encoding="utf-8")))
        return record

    def _save(self, record: RunRecord) -> None:
        atomic_write_json(self._record_path(record.id), asdict(record))

    def list(self) -> list[RunRecord]:
        """Every run, newest first."""
        if not self.runs_dir.is_dir():
            return []
        records = []
        for path in self.runs_dir.glob(f"*/{RUN_FILE}"):
            try:
                records.append(self.get(path.parent.name))
            except (MarkError, ValueError, TypeError):
                continue  # a half-written or foreign file is not a run
        return sorted(records, key=lambda r: -r.started)

    def _running(self, record: RunRecord) -> bool:
        process = self._processes.get(record.id)
        if process is not None and process.pid == record.pid:
            return process.poll() is None
        return _pid_alive(record.pid)

    def _reap(self, record: RunRecord) -> None:
        """Write the end of a run whose process has gone (exit code when this process started it)."""
        with self._lock:
            current = RunRecord(**json.loads(self._record_path(record.id).read_text(encoding="utf-8")))
            if current.ended is not None:
                return
            process = self._processes.pop(record.id, None)
            if process is not None and process.pid == current.pid:
                current.exit_code = process.wait()
            current.ended = time.time()
            self._save(current)

    # ------------------------------------------------------------------ start / stop / resume
    def command(self, target: str, config: str | Path, overrides: Sequence[str] = (), resume: bool = False) -> list[str]:
        """The CLI command of a run (what ``mark train`` would be given)."""
        if target == "full-pipeline":
            argv = [self.python, "-m", "src.training.orchestrator", "train", f"--target={target}", f"--config-dir={config}"]
        else:
            argv = [self.python, "-m", "src.training.orchestrator", "train", f"--target={target}", f"--config={config}"]
        return argv + (["--resume"] if resume else []) + list(overrides)

    def start(self, target: str, config: str | Path | None = None, overrides: Sequence[str] = (), resume: bool = False) -> RunRecord:
        """Validate the config as the CLI would (a ``ConfigError`` is raised here, before any
        process starts), then start the run detached; returns its record."""
        if target not in target_configs():
            raise MarkError(f"unknown target '{target}'; valid targets: {', '.join(target_configs())}")
        config_path = resolve_config_path(target, config, self.guard)
        log_dir = checkpoint_dir = None
        if target != "full-pipeline":
            cfg = load_target_config(target, config_path, overrides)
            check_config_paths(cfg, self.guard)
            log_dir, checkpoint_dir = str(cfg.paths.log_dir), str(cfg.paths.checkpoint_dir)
        run_id = time.strftime("%Y%m%d-%H%M%S") + f"-{target}-{uuid.uuid4().hex[:6]}"
        record = RunRecord(
            id=run_id, target=target, config=self.guard.relative(config_path), overrides=list(overrides), resume=resume,
            argv=[], cwd=str(self.guard.project), pid=0, started=0.0, log_dir=log_dir, checkpoint_dir=checkpoint_dir,
        )
        record.argv = self.command(target, record.config, record.overrides, resume)
        return self._launch(record)

    def _launch(self, record: RunRecord) -> RunRecord:
        folder = self.runs_dir / record.id
        folder.mkdir(parents=True, exist_ok=True)
        # The Board's own ``src`` runs the command, whatever folder the project is.
        python_path = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": python_path}
        with open(folder / OUTPUT_FILE, "ab") as output:
            output.write(f"$ {record.command}\n".encode())
            output.flush()
            # start_new_session: its own process group, untouched by the Board's end or a closed terminal.
            process = subprocess.Popen(
                record.argv, cwd=record.cwd, env=env, stdout=output, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        record.pid, record.started = process.pid, time.time()
        record.ended = record.exit_code = None
        record.stop_requested = False
        with self._lock:
            self._processes[record.id] = process
            self._save(record)
        # Reaped by a waiting thread, so an ended run never stays a zombie of the Board.
        threading.Thread(target=self._wait, args=(record.id, process), daemon=True, name=f"run-{record.id}").start()
        return record

    def _wait(self, run_id: str, process: subprocess.Popen) -> None:
        process.wait()
        try:
            self._reap(self.get_raw(run_id))
        except (MarkError, OSError, ValueError):
            pass

    def get_raw(self, run_id: str) -> RunRecord:
        return RunRecord(**json.loads(self._record_path(run_id).read_text(encoding="utf-8")))

    def stop(self, run_id: str, wait: float = 0.0) -> RunRecord:
        """Ask a running run to stop (SIGTERM to its process group); with ``wait`` seconds,
        wait for it to end. The engine writes a resumable checkpoint before it exits."""
        record = self.get(run_id)
        if record.ended is not None:
            raise MarkError(f"run '{run_id}' has already ended")
        with self._lock:
            record.stop_requested = True
            self._save(record)
        try:
            os.killpg(record.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + wait
        while wait and time.monotonic() < deadline:
            record = self.get(run_id)
            if record.ended is not None:
                break
            time.sleep(0.2)
        return self.get(run_id)

    def resume(self, run_id: str) -> RunRecord:
        """Start an ended run again with ``--resume`` (same id, same folders, same output file)."""
        record = self.get(run_id)
        if record.ended is None:
            raise MarkError(f"run '{run_id}' is still running")
        record.history.append({"argv": record.argv, "started": record.started, "ended": record.ended, "exit_code": record.exit_code})
        record.resume = True
        record.argv = self.command(record.target, record.config, record.overrides, resume=True)
        return self._launch(record)

    # ------------------------------------------------------------------ progress
    def status(self, run_id: str) -> dict[str, Any]:
        """What the Train tab shows of a run: state, step/total, tokens/s, ETA, the curves
        since the run (or its first attempt) started, the output's tail and, for a failed
        run, its last error lines."""
        record = self.get(run_id)
        output = tail(self.runs_dir / record.id / OUTPUT_FILE, lines=400)
        progress = parse_progress(output)
        started = record.history[0]["started"] if record.history else record.started
        records = run_metrics(record.log_dir, since=started - 1.0, cwd=record.cwd)
        train = [r for r in records if r.get("kind") == "train"]
        tokens = next((r["tokens_per_s"] for r in reversed(train) if isinstance(r.get("tokens_per_s"), (int, float))), None)
        if record.ended is None:
            state = "stopping" if record.stop_requested else "running"
        elif record.exit_code == 0:
            state = "finished"
        elif record.exit_code == STOPPED_EXIT_CODE or (record.stop_requested and record.exit_code in (None, -signal.SIGTERM)):
            state = "stopped"
        elif record.exit_code is None:
            state = "ended"  # started by another Board process that has gone: exit code unknown
        else:
            state = "failed"
        step, total = progress.get("step"), progress.get("total")
        if train and (step is None or train[-1]["step"] > step):
            step = int(train[-1]["step"])
        return {
            "id": record.id, "state": state, "exit_code": record.exit_code, "command": record.command,
            "step": step, "total": total, "tokens_per_s": tokens, "eta_s": progress.get("eta_s") if record.ended is None else 0.0,
            "curves": curve_series(records), "records": len(records),
            "output_tail": "\n".join(output.splitlines()[-40:]),
            "error": error_lines(output) if state == "failed" else "",
        }


def parse_progress(output: str) -> dict[str, float]:
    """The latest ``step``, ``total`` and ``eta_s`` in a run's console output: the last
    progress bar (tqdm) or the engine's ``step N/T`` log line, whichever comes last."""
    found: dict[str, float] = {}
    best = -1
    for match in _TQDM.finditer(output):
        if match.start() > best:
            best = match.start()
            found = {"step": int(match.group(1)), "total": int(match.group(2))}
            eta = _clock(match.group(4))
            if eta is not None:
                found["eta_s"] = eta
    for match in _STEP.finditer(output):
        if match.start() > best:
            best = match.start()
            found = {"step": int(match.group(1)), "total": int(match.group(2))}
    return found


def run_metrics(log_dir: str | Path | None, since: float = 0.0, cwd: str | Path | None = None) -> list[dict[str, Any]]:
    """The ``metrics.jsonl`` records written at or after ``since`` under ``log_dir``
    (the newest file when a run has several, e.g. the RLHF stages): the latest run's."""
    if not log_dir:
        return []
    folder = Path(log_dir)
    if not folder.is_absolute() and cwd is not None:
        folder = Path(cwd) / folder
    files = [p for p in folder.rglob(METRICS_FILE) if p.stat().st_mtime >= since] if folder.is_dir() else []
    if not files:
        return []
    newest = max(files, key=lambda p: p.stat().st_mtime)
    return latest_run([r for r in read_metrics(newest) if float(r.get("time", 0.0)) >= since])
