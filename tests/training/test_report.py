"""``mark report``: curves and evaluation tables from the logs the components write."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from src.core.errors import MarkError
from src.training import orchestrator
from src.training.report import ComponentLogs, build_report, curve_series, latest_run, read_metrics
from tests.pipelines.fixtures import tiny_data_dir, tiny_pipeline  # noqa: F401

PNG = b"\x89PNG\r\n\x1a\n"


def _records(*steps, kind="train", **values):
    return [{"time": float(i), "kind": kind, "step": step, **{k: v[i] for k, v in values.items()}} for i, step in enumerate(steps)]


def test_latest_run_starts_at_a_restart_and_continues_a_resume():
    first = _records(10, 20, 30, loss=[3.0, 2.5, 2.0])
    second = _records(10, 20, loss=[3.1, 2.6])
    assert [r["loss"] for r in latest_run(first + second)] == [3.1, 2.6]
    resumed = first + _records(20, 30, 40, loss=[2.4, 1.9, 1.5])  # killed after step 30, resumed from step 10's checkpoint
    assert [(r["step"], r["loss"]) for r in latest_run(resumed)] == [(10, 3.0), (20, 2.4), (30, 1.9), (40, 1.5)]
    build_and_eval = [{"kind": "build", "step": 0}, {"kind": "eval", "step": 0, "mode": "dense"}]
    assert len(latest_run(build_and_eval * 2)) == 4  # one-step components keep every record; tables take the latest


def test_curve_series_puts_the_loss_first_and_drops_constants():
    records = _records(1, 2, 3, loss=[3.0, 2.0, 1.0], lr=[1e-3, 1e-3, 1e-3], clip_fraction=[0.0, 0.0, 0.0],
                       episode_reward_mean=[0.1, 0.2, 0.3], approx_kl=[0.01, 0.02, 0.01])
    records += _records(3, kind="eval", val_loss=[1.5]) + [{"kind": "eval", "step": 6, "val_loss": 1.2}]
    curves = curve_series(records)
    assert list(curves) == ["train: loss", "eval: val_loss", "train: episode_reward_mean", "train: approx_kl"]
    assert curves["eval: val_loss"] == [(3.0, 1.5), (6.0, 1.2)]


def test_malformed_lines_are_skipped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 2.0}\n{"kind": "train", "st\n{"kind": "train", "step": 2, "loss": 1.0}\n')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]


def test_report_of_the_tiny_pipeline_has_curves_and_every_evaluation_table(tiny_pipeline, tmp_path):
    work = tiny_pipeline["work"]
    components = [ComponentLogs(name, work / "logs" / folder, [work / "checkpoints" / folder])
                  for name, folder in (("mamba", "mamba"), ("transformer", "transfer"), ("rag", "rag"), ("rl", "rl"), ("rlhf", "rlhf"))]
    report = build_report(components, tmp_path / "report")
    text = report.read_text()
    for name in ("mamba", "transformer", "rl", "rlhf_sft", "rlhf_reward", "rlhf_ppo"):
        png = tmp_path / "report" / f"{name}_curves.png"
        assert png.read_bytes()[:8] == PNG, name
        assert f"]({png.name})" in text
    assert "| fine-tuned classifier |" in text and "majority baseline" in text         # classifier test_metrics.json
    assert "| TF-IDF 1-2-grams + logistic regression |" in text                      # ... and its strong baseline
    assert "| mode | recall@1 | recall@5 |" in text and "| bm25 |" in text            # RAG eval_metrics.json by mode
    assert "| strategy | mean_reward |" in text and "| trained |" in text              # RL eval_metrics.json
    assert "| ppo_win_rate_vs_sft |" in text                                          # RLHF evaluation.json
    assert "| eval | 6 |" in text or "| eval | 4 |" in text                          # Mamba's validation from metrics.jsonl
    assert text.index("### rlhf/sft") < text.index("### rlhf/reward") < text.index("### rlhf/ppo")  # the order they ran in
    rl_eval = json.loads((work / "checkpoints" / "rl" / "eval_metrics.json").read_text())
    trained = rl_eval["strategies"]["trained"]["mean_reward"]
    assert f"| trained | {trained:.4f} |" in text


def test_mark_report_command_reads_a_logs_folder(tiny_pipeline, tmp_path):
    logs = tmp_path / "logs"
    shutil.copytree(tiny_pipeline["work"] / "logs", logs)
    result = orchestrator.main(["report", "--logs-dir", str(logs), "--output-dir", str(tmp_path / "reports")])
    assert result["outputs"]["report"] == str(tmp_path / "reports" / "report.md")
    assert result["metrics"]["components"] == 5 and result["metrics"]["plots"] >= 5
    text = Path(result["outputs"]["report"]).read_text()
    assert "## transfer" in text and "| fine-tuned classifier |" in text  # test_metrics.json sits in the log folder


def test_no_logs_is_a_one_line_error(tmp_path):
    with pytest.raises(MarkError, match=r"no metrics.jsonl in any component folder; train something first"):
        orchestrator.main(["report", "--logs-dir", str(tmp_path), "--output-dir", str(tmp_path / "r")])
