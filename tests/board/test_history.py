"""The Runs tab's reading of logs: runs found, final/best metrics with baselines, curves, comparison."""

import json
from pathlib import Path

from src.board.history import compare_plot, find_runs, metrics_table, run_details, shared_metrics
from src.board.paths import PathGuard


def _write_run(logs: Path, name: str, losses: list[float], val: list[float]) -> None:
    folder = logs / name
    folder.mkdir(parents=True)
    rows = [{"time": 100.0 + i, "kind": "train", "step": 2 * (i + 1), "loss": loss, "lr": 0.001} for i, loss in enumerate(losses)]
    rows += [{"time": 200.0 + i, "kind": "eval", "step": 10 * (i + 1), "val_loss": v, "kn3_val_loss": 2.3} for i, v in enumerate(val)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_runs_metrics_and_comparison(tmp_path: Path) -> None:
    logs, checkpoints = tmp_path / "logs", tmp_path / "checkpoints"
    _write_run(logs, "mamba", [5.0, 4.0, 3.5], [4.5, 3.9, 4.1])
    _write_run(logs, "rlhf/sft", [3.0, 2.0], [2.5, 2.2])
    (checkpoints / "mamba").mkdir(parents=True)
    (checkpoints / "mamba" / "config.yaml").write_text("model:\n  d_model: 32\n")
    runs = find_runs([(logs, checkpoints)], PathGuard([tmp_path]))
    assert [r.label for r in runs] == ["logs/mamba", "logs/rlhf/sft"]
    assert runs[0].checkpoint_dir == checkpoints / "mamba" and runs[1].checkpoint_dir is None

    details = run_details(runs[0])
    assert "d_model: 32" in details["config"]
    assert details["curves"]["train: loss"] == [(2.0, 5.0), (4.0, 4.0), (6.0, 3.5)]
    assert details["last_step"] == 30
    table = details["metrics"]
    # final and best (lowest loss) of each metric, the Kneser-Ney baseline beside them
    assert "| eval | val_loss | 4.1000 | 3.9000 | 20 |" in table
    assert "| eval | kn3_val_loss | 2.3000 | 2.3000 | 10 |" in table
    assert "| train | loss | 3.5000 | 3.5000 | 6 |" in table
    assert metrics_table([]) == "(no metrics yet)"

    assert shared_metrics(runs) == ["train: loss", "eval: val_loss"]
    png = compare_plot(runs, "eval: val_loss", tmp_path / "compare.png")
    assert png is not None and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert compare_plot(runs, "eval: nothing", tmp_path / "none.png") is None
