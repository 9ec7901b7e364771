"""Training runs started by the Board: the real CLI as a detached subprocess, watched through
metrics.jsonl, stopped with SIGTERM (a loadable checkpoint) and resumed; a failing run shows
its error lines."""

import json
import time
from pathlib import Path

import pytest

from src.board.paths import PathGuard
from src.board.runs import OUTPUT_FILE, RunManager, error_lines, parse_progress
from src.core.checkpoint import load_checkpoint
from src.core.errors import ConfigError, MarkError
from tests.board.conftest import write_tiny_mamba_config


def _wait(manager: RunManager, run_id: str, condition, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = manager.status(run_id)
        if condition(status):
            return status
        time.sleep(0.3)
    raise AssertionError(f"timed out; last status: {status['state']} step {status['step']}\n{status['output_tail']}")


def _start_and_watch(manager: RunManager, config: Path) -> tuple[object, dict]:
    run = manager.start("mamba", config, ["training.eval_steps=4"])
    assert run.argv[1:5] == ["-m", "src.training.orchestrator", "train", "--target=mamba"]
    assert run.argv[-1] == "training.eval_steps=4" and run.command.startswith(f"cd {manager.guard.project}")
    # Progress: step/total, tokens/s and curves appear as metrics.jsonl grows.
    status = _wait(manager, run.id, lambda s: s["state"] != "running" or (s["step"] or 0) >= 8 and "eval: val_loss" in s["curves"])
    assert status["state"] == "running", status["output_tail"]
    assert status["total"] == 5000 and status["tokens_per_s"] > 0 and status["eta_s"] is not None
    assert len(status["curves"]["train: loss"]) >= 4
    return run, status


def _stop(manager: RunManager, run_id: str, checkpoints: Path) -> int:
    """Stop a run; returns the step of the resumable checkpoint it wrote."""
    manager.stop(run_id, wait=60)
    stopped = manager.status(run_id)
    assert stopped["state"] == "stopped" and stopped["exit_code"] == 143, stopped["output_tail"]
    assert "stopped by SIGTERM" in stopped["output_tail"]
    latest = json.loads((checkpoints / "latest.json").read_text())
    checkpoint = load_checkpoint(checkpoints / Path(latest["path"]).name, kind="mamba")
    return checkpoint["progress"]["step"]


def test_start_watch_stop_and_a_failing_run(tmp_path: Path, sample_data_dir: Path) -> None:
    config = write_tiny_mamba_config(tmp_path, sample_data_dir, max_steps=5000, num_epochs=1000)
    manager = RunManager(tmp_path / "runs", PathGuard([tmp_path]))
    # A run that fails in the subprocess (a malformed data line is only found when reading it).
    bad = tmp_path / "data" / "bad_train.jsonl"
    bad.write_text('{"id": "a", "text": "fine"}\n{"id": "b", "text": \n')
    failing = manager.start("mamba", config, [f"data.train_file={bad}"])
    run, _ = _start_and_watch(manager, config)

    # A second manager (another Board process / browser tab) sees the same runs.
    other = RunManager(tmp_path / "runs", PathGuard([tmp_path]))
    assert {r.id for r in other.list()} == {run.id, failing.id}

    # Stop: SIGTERM -> the step finishes, a resumable checkpoint is written, exit code 143.
    assert _stop(manager, run.id, tmp_path / "checkpoints" / "tiny_mamba") >= 8

    failed = _wait(manager, failing.id, lambda s: s["state"] != "running")
    assert failed["state"] == "failed" and failed["exit_code"] == 2
    assert "bad_train.jsonl:2" in failed["error"] and failed["error"].splitlines()[-1].startswith("error:")
    with pytest.raises(MarkError, match="already ended"):
        manager.stop(failing.id)


@pytest.mark.slow
def test_resume_continues_from_the_stop_checkpoint(tmp_path: Path, sample_data_dir: Path) -> None:
    config = write_tiny_mamba_config(tmp_path, sample_data_dir, max_steps=5000, num_epochs=1000)
    manager = RunManager(tmp_path / "runs", PathGuard([tmp_path]))
    run, _ = _start_and_watch(manager, config)
    stopped_at = _stop(manager, run.id, tmp_path / "checkpoints" / "tiny_mamba")
    resumed = manager.resume(run.id)
    assert resumed.argv[5:7] == [f"--config={run.config}", "--resume"] and resumed.id == run.id
    assert resumed.history[0]["exit_code"] == 143
    status = _wait(manager, run.id, lambda s: s["state"] != "running" or (s["step"] or 0) >= stopped_at + 4)
    assert status["state"] == "running", status["output_tail"]
    output = (manager.runs_dir / run.id / OUTPUT_FILE).read_text()  # the whole console output: the tail moves on fast
    assert f"at epoch 1, step {stopped_at}" in output  # the engine's "resumed from ... at epoch, step"
    # The curve continues the first attempt's: no step is logged twice.
    steps = [step for step, _ in status["curves"]["train: loss"]]
    assert steps == sorted(set(steps)) and steps[-1] > stopped_at
    assert _stop(manager, run.id, tmp_path / "checkpoints" / "tiny_mamba") > stopped_at


def test_a_bad_config_is_refused_before_any_process_starts(tmp_path: Path, sample_data_dir: Path) -> None:
    config = write_tiny_mamba_config(tmp_path, sample_data_dir)
    manager = RunManager(tmp_path / "runs", PathGuard([tmp_path]))
    with pytest.raises(ConfigError, match="training.learning_rate: Input should be greater than 0"):
        manager.start("mamba", config, ["training.learning_rate=-1"])
    with pytest.raises(MarkError, match="outside the allowed folders"):
        manager.start("mamba", "../../etc/mamba.yaml")
    assert manager.list() == []


def test_progress_and_error_lines_are_read_from_the_console() -> None:
    output = ("train mamba:  40%|####      | 4/10 [00:02<00:03, 1.9it/s]\r"
              "train mamba:  50%|#####     | 5/10 [00:03<01:02, 1.9it/s]\n2026 | INFO | step 6/10 | epoch 1 | loss 2.0\n")
    assert parse_progress(output) == {"step": 6, "total": 10}
    assert parse_progress(output.rsplit("\n", 2)[0]) == {"step": 5, "total": 10, "eta_s": 62.0}
    failed = "log line\nTraceback (most recent call last):\n  File x\nValueError: boom\n"
    assert error_lines(failed, lines=3) == "Traceback (most recent call last):\n  File x\nValueError: boom"
