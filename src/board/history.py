"""Finished and running runs as the Runs tab shows them: every ``metrics.jsonl`` under the log
folders, its config, final and best metrics next to the baselines MARK computes, its
curves, the Markdown report with its PNGs, and two runs' curves on one plot.

Reading, curves, evaluation tables and the report are :mod:`src.training.report`'s (what
``mark report`` uses); this module only finds the runs and puts two of them side by side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from src.board.paths import PathGuard
from src.training.report import (
    METRICS_FILE,
    ComponentLogs,
    build_report,
    curve_series,
    discover_components,
    eval_report_section,
    find_eval_reports,
    latest_run,
    markdown_table,
    read_metrics,
)

# Lower is better for these metric names (everything else: higher is better).
_LOWER_IS_BETTER = ("loss", "perplexity", "kl", "error", "seconds")


@dataclass
class RunLogs:
    """One run's folder: ``label`` (its log folder relative to the project), the folders."""

    label: str
    log_dir: Path
    checkpoint_dir: Path | None

    @property
    def metrics_file(self) -> Path:
        return self.log_dir / METRICS_FILE


def find_runs(folders: Iterable[tuple[Path, Path]], guard: PathGuard) -> list[RunLogs]:
    """Every folder holding a ``metrics.jsonl`` below each ``(log folder, checkpoint folder)``
    pair (sub-stages such as ``logs/rlhf/sft`` are runs of their own); a run's checkpoint
    folder is the same path below the checkpoint folder, when it exists."""
    runs: dict[str, RunLogs] = {}
    for log_root, checkpoint_root in folders:
        log_root = Path(log_root)
        if not log_root.is_dir():
            continue
        for metrics in sorted(log_root.rglob(METRICS_FILE)):
            folder = metrics.parent
            checkpoint = Path(checkpoint_root) / folder.relative_to(log_root)
            label = guard.relative(folder)
            runs.setdefault(label, RunLogs(label, folder, checkpoint if checkpoint.is_dir() else None))
    return sorted(runs.values(), key=lambda r: r.label)


def _lower_is_better(name: str) -> bool:
    return any(word in name for word in _LOWER_IS_BETTER)


def metrics_table(records: list[dict[str, Any]]) -> str:
    """Final and best value of every numeric metric of each record kind (``train``, ``eval``,
    ...). Baselines that the components log beside their metrics (Kneser-Ney 3-gram and
    unigram perplexity of the Mamba LM, ...) are rows of the same table."""
    rows = []
    kinds = list(dict.fromkeys(r.get("kind", "train") for r in records))
    for kind in kinds:
        of_kind = [r for r in records if r.get("kind", "train") == kind]
        keys = list(dict.fromkeys(k for r in of_kind for k, v in r.items()
                                  if k not in ("time", "step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool)))
        for key in keys:
            points = [(r["step"], float(r[key])) for r in of_kind if isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))]
            if not points:
                continue
            pick = min if _lower_is_better(key) else max
            best_step, best = pick(points, key=lambda p: p[1])
            rows.append([kind, key, points[-1][1], best, best_step])
    return markdown_table(["kind", "metric", "final", "best", "best at step"], rows) if rows else "(no metrics yet)"


def run_details(run: RunLogs) -> dict[str, Any]:
    """What the Runs tab shows of one run: ``config`` (YAML text), ``metrics`` (Markdown
    table), ``evaluation`` (Markdown: the evaluation reports with their baselines),
    ``curves`` (``{name: [(step, value)]}``), ``last_step``."""
    records = latest_run(read_metrics(run.metrics_file)) if run.metrics_file.is_file() else []
    config_file = (run.checkpoint_dir / "config.yaml") if run.checkpoint_dir else None
    config = config_file.read_text(encoding="utf-8") if config_file and config_file.is_file() else "(no config.yaml beside the checkpoints)"
    component = ComponentLogs(run.label, run.log_dir, [run.checkpoint_dir] if run.checkpoint_dir else [])
    sections = [eval_report_section(name, path) for name, path in find_eval_reports(component).items()]
    return {
        "config": config,
        "metrics": metrics_table(records),
        "evaluation": "\n\n".join(sections) or "(no evaluation report for this run)",
        "curves": curve_series(records),
        "last_step": records[-1]["step"] if records else None,
    }


def write_report(logs_dir: Path, checkpoints_dir: Path, output_dir: Path) -> tuple[str, list[Path]]:
    """``mark report``'s Markdown and PNGs for ``logs_dir`` (written to ``output_dir``)."""
    components = discover_components(logs_dir, checkpoints_dir)
    if not components:
        return f"(no {METRICS_FILE} under {logs_dir}: train something first)", []
    path = build_report(components, output_dir)
    return path.read_text(encoding="utf-8"), sorted(output_dir.glob("*_curves.png"))


def compare_plot(runs: list[RunLogs], metric: str, path: Path) -> Path | None:
    """One PNG with curve ``metric`` (``"train: loss"``, ``"eval: val_loss"``) of each run;
    ``None`` when no run has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = 0
    for run in runs:
        points = run_details(run)["curves"].get(metric)
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, label=run.label)
            drawn += 1
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(metric)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def shared_metrics(runs: list[RunLogs]) -> list[str]:
    """The curve names every run of ``runs`` has (the ones they can be compared on)."""
    names = None
    for run in runs:
        curves = list(run_details(run)["curves"])
        names = curves if names is None else [n for n in names if n in curves]
    return names or []
