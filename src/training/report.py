"""``mark report``: loss and metric curves of every component, and one Markdown summary.

    python -m src.training.orchestrator report [--logs-dir logs] [--output-dir reports]
    python -m src.training.report [--logs-dir logs] [--output-dir reports] [--checkpoints-dir checkpoints]

Reads every ``<logs-dir>/<component>/**/metrics.jsonl`` (the shared ``MetricsLogger``'s
records: ``{"time", "kind", "step", ...metrics}``) and the evaluation reports the
components write: ``test_metrics.json`` (classifier, in its log folder),
``eval_metrics.json`` (RAG retrieval by mode, RL policy vs baselines, beside their
checkpoints) and ``evaluation.json`` (RLHF), looked up in the component's log folder and in
``<checkpoints-dir>/<component>``. Writes one ``<component>_curves.png`` per component with
curves and ``report.md`` with every evaluation table.

A ``metrics.jsonl`` is appended to by every run: the report shows the latest run (a resumed
run continues the one it resumed).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from src.core.checkpoint import atomic_write_text
from src.core.cli import run_cli
from src.core.errors import MarkError
from src.core.logging import get_logger

METRICS_FILE = "metrics.jsonl"
EVAL_FILES = ("test_metrics.json", "eval_metrics.json", "evaluation.json")
REPORT_FILE = "report.md"
# Bookkeeping, not curves worth a panel.
NOT_CURVES = {
    "time", "step", "epoch", "lr", "learning_rate", "grad_norm", "tokens_per_s", "timesteps", "episodes",
    "steps_per_second", "clip_range", "seconds",
}
MAX_PANELS = 9
# Training curves shown before the others (substrings of metric names): rewards and quality first.
FIRST_TRAIN_CURVES = ("reward", "ndcg", "score", "accuracy", "kl", "entropy", "value_loss")

log = get_logger("report")


@dataclass
class ComponentLogs:
    """One component's logs: ``log_dir`` (``metrics.jsonl`` below it) and folders that may
    hold its evaluation reports."""

    name: str
    log_dir: Path
    eval_dirs: list[Path] = field(default_factory=list)


# ---------------------------------------------------------------- reading


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl``; malformed lines (e.g. a run killed mid-write) are skipped."""
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
                records.append(record)
    return records


def latest_run(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of the last run in an appended ``metrics.jsonl``.

    A step lower than the one before starts a new run, unless it is still above the first
    step of the current run: that is a resume from an earlier checkpoint, which replaces the
    records from that step on."""
    run: list[dict[str, Any]] = []
    for record in records:
        step = record["step"]
        if run and step < run[-1]["step"]:
            if step > run[0]["step"]:
                run = [r for r in run if r["step"] < step]
            else:
                run = []
        run.append(record)
    return run


def _first_time(path: Path) -> float:
    with open(path, encoding="utf-8") as handle:
        try:
            return float(json.loads(handle.readline()).get("time", 0.0))
        except (ValueError, AttributeError):
            return 0.0


def find_eval_reports(component: ComponentLogs) -> dict[str, Path]:
    """``{file name: path}`` of the evaluation reports of ``component`` (newest of each name)."""
    found: dict[str, Path] = {}
    for folder in [component.log_dir, *component.eval_dirs]:
        if not folder.is_dir():
            continue
        for name in EVAL_FILES:
            for path in folder.rglob(name):
                if name not in found or path.stat().st_mtime > found[name].stat().st_mtime:
                    found[name] = path
    return found


def discover_components(logs_dir: Path, checkpoints_dir: Path) -> list[ComponentLogs]:
    """One :class:`ComponentLogs` per folder of ``logs_dir`` with a ``metrics.jsonl`` below it."""
    return [
        ComponentLogs(folder.name, folder, [checkpoints_dir / folder.name])
        for folder in sorted(p for p in Path(logs_dir).iterdir() if p.is_dir())
        if any(folder.rglob(METRICS_FILE))
    ] if Path(logs_dir).is_dir() else []


# ---------------------------------------------------------------- curves


def curve_series(records: Sequence[dict[str, Any]]) -> dict[str, list[tuple[float, float]]]:
    """``{"<kind>: <metric>": [(step, value), ...]}`` of every numeric metric that changes over
    two steps or more: training loss first, then evaluation metrics, then training metrics
    (rewards and quality before the rest)."""
    series: dict[str, dict[float, float]] = {}
    for record in records:
        kind = record.get("kind", "train")
        for key, value in record.items():
            if key in NOT_CURVES or key == "kind" or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            series.setdefault(f"{kind}: {key}", {})[float(record["step"])] = float(value)
    # A constant series (a clip fraction of 0, episodes of length 1) is not worth a panel.
    curves = {name: sorted(points.items()) for name, points in series.items()
              if len(points) >= 2 and len(set(points.values())) > 1}

    def order(name: str) -> tuple[int, int, str]:
        kind, key = name.split(": ", 1)
        if kind == "train" and key == "loss":
            return (0, 0, name)
        if kind != "train":
            return (1, 0, name)
        rank = next((i for i, word in enumerate(FIRST_TRAIN_CURVES) if word in key), len(FIRST_TRAIN_CURVES))
        return (2, rank, name)

    return {name: curves[name] for name in sorted(curves, key=order)}


def plot_curves(component: str, curves: dict[str, list[tuple[float, float]]], path: Path) -> Path | None:
    """One PNG with a panel per curve (at most ``MAX_PANELS``); ``None`` when there is no curve."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)[:MAX_PANELS]
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names):
        steps, values = zip(*curves[name])
        ax.plot(steps, values, marker="o" if len(steps) <= 20 else None, markersize=3, linewidth=1.4,
                color="tab:blue" if name.startswith("train") else "tab:orange")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(f"{component}: latest run", fontsize=12)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=90)
    plt.close(fig)
    tmp.replace(path)
    return path


# ---------------------------------------------------------------- tables


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table; floats shown with 4 significant digits."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:,.1f}"
    if value is None:
        return ""
    return str(value).replace("|", "\\|")


def _numeric_items(metrics: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flattened ``(key, value)`` of numbers, booleans and short strings (nested dicts joined by '/')."""
    items = []
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            items.extend(_numeric_items(value, f"{name}/"))
        elif isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) < 80):
            items.append((name, value))
    return items


def classifier_tables(report: dict[str, Any]) -> str:
    """``test_metrics.json``: headline numbers vs the TF-IDF and majority baselines, then per class."""
    base = report.get("majority_baseline") or {}
    lines = [
        f"Test set: {report.get('num_examples', '?')} documents ({report.get('test_file', '')}).",
        "",
        markdown_table(
            ["model", "accuracy", "macro-F1"],
            [["fine-tuned classifier", report.get("accuracy"), report.get("macro_f1")],
             *([["TF-IDF 1-2-grams + logistic regression", report["tfidf_baseline"].get("accuracy"),
                 report["tfidf_baseline"].get("macro_f1")]] if report.get("tfidf_baseline") else []),
             [f"majority baseline ({base.get('label', '')})", base.get("accuracy"), base.get("macro_f1")]],
        ),
    ]
    per_class = report.get("per_class") or {}
    if per_class:
        lines += ["", markdown_table(
            ["label", "precision", "recall", "F1", "support"],
            [[name, s.get("precision"), s.get("recall"), s.get("f1"), s.get("support")] for name, s in per_class.items()],
        )]
    return "\n".join(lines)


def retrieval_tables(report: dict[str, Any]) -> str:
    """RAG ``eval_metrics.json``: one row per search mode."""
    modes: dict[str, dict[str, Any]] = report["modes"]
    ks = report.get("top_k_values") or []
    columns = [f"{name}@{k}" for name in ("recall", "precision", "hit_rate", "ndcg") for k in ks] + ["mrr"]
    columns = [c for c in columns if any(c in m for m in modes.values())]
    first = next(iter(modes.values()), {})
    head = (f"{first.get('num_queries', '?')} queries ({report.get('eval_file', '')}), embedding model "
            f"{report.get('embedding_model', '?')}, {report.get('index_type', '?')} index.")
    if report.get("hybrid_selected"):
        split = report.get("split") or {}
        head += (f" Test split ({split.get('test_queries')} queries); the hybrid fusion was chosen on the val split "
                 f"({split.get('val_queries')} queries, {split.get('selected_by')}): {report['hybrid_selected']}.")
    return head + "\n\n" + markdown_table(["mode", *columns], [[mode, *(m.get(c) for c in columns)] for mode, m in modes.items()])


def strategy_tables(report: dict[str, Any]) -> str:
    """RL ``eval_metrics.json``: the trained policy next to random and fixed strategies."""
    results: dict[str, dict[str, Any]] = report["strategies"]
    columns = [c for c in ("mean_reward", "std_reward", "mean_ndcg", "mean_k", "mean_docs", "mean_length")
               if any(c in r for r in results.values())]
    order = [n for n in ("trained", "random") if n in results]
    order += sorted((n for n in results if n not in order), key=lambda n: -float(results[n].get("mean_reward", 0)))
    head = f"{report.get('env', '')}: {report.get('evaluated_on', '')}, after {report.get('timesteps', '?')} timesteps."
    table = markdown_table(["strategy", *columns], [[n, *(results[n].get(c) for c in columns)] for n in order])
    summary = report.get("summary") or {}
    if "best_fixed" in summary:
        verdict = "matches or beats" if summary.get("trained_beats_best_fixed") else "is below"
        table += (f"\n\nThe trained policy {verdict} the best fixed strategy ({summary['best_fixed']}) by "
                  f"{_cell(float(summary.get('trained_minus_best_fixed', 0.0)))} mean reward.")
    return head + "\n\n" + table


def generic_tables(report: dict[str, Any]) -> str:
    """Any other evaluation JSON (e.g. RLHF's ``evaluation.json``): its numbers as key / value."""
    metrics = report.get("metrics") if isinstance(report.get("metrics"), dict) else report
    items = _numeric_items(metrics)
    return markdown_table(["metric", "value"], items) if items else "(no numbers in this report)"


def eval_report_section(name: str, path: Path) -> str:
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:
        return f"### {name}\n\n`{path}` could not be read: {err}"
    if not isinstance(report, dict):
        return f"### {name}\n\n`{path}` is not a JSON object."
    if name == "test_metrics.json" and "per_class" in report:
        body = classifier_tables(report)
    elif isinstance(report.get("modes"), dict):
        body = retrieval_tables(report)
    elif isinstance(report.get("strategies"), dict):
        body = strategy_tables(report)
    else:
        body = generic_tables(report)
    return f"### Evaluation (`{path}`)\n\n{body}"


def last_records_table(records: Sequence[dict[str, Any]], skip_kinds: Iterable[str] = ()) -> str | None:
    """The latest record of each non-training kind (and mode) as one row, metrics as columns
    (at most 10); ``skip_kinds``: kinds an evaluation report already shows."""
    skip = set(skip_kinds) | {"train"}
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        kind = record.get("kind", "train")
        if kind in skip:
            continue
        label = kind + (f" ({record['mode']})" if isinstance(record.get("mode"), str) else "")
        latest[label] = record
    rows = {label: dict(_numeric_items({k: v for k, v in r.items() if k not in ("time", "kind", "mode")}))
            for label, r in latest.items()}
    columns = list(dict.fromkeys(key for values in rows.values() for key in values))[:10]
    if not columns:
        return None
    return markdown_table(["record", *columns], [[label, *(values.get(c) for c in columns)] for label, values in rows.items()])


# ---------------------------------------------------------------- the report


def component_section(component: ComponentLogs, output_dir: Path) -> tuple[str, dict[str, Any]]:
    """The Markdown section of one component and a row of the overview table."""
    metric_files = sorted(component.log_dir.rglob(METRICS_FILE)) if component.log_dir.is_dir() else []
    # Sub-stages (RLHF's sft, reward, ppo) in the order they ran.
    metric_files.sort(key=lambda p: (p.parent != component.log_dir, _first_time(p)))
    parts = [f"## {component.name}", ""]
    overview: dict[str, Any] = {"component": component.name}
    reports = find_eval_reports(component)
    for metrics_path in metric_files:
        relative = metrics_path.parent.relative_to(component.log_dir).as_posix()
        label = component.name if relative == "." else f"{component.name}/{relative}"
        records = latest_run(read_metrics(metrics_path))
        if not records:
            continue
        if label != component.name:
            parts += [f"### {label}", ""]
        train = [r for r in records if r.get("kind") == "train"]
        finished = time.strftime("%Y-%m-%d %H:%M", time.localtime(records[-1].get("time", 0)))
        parts.append(f"Latest run: {len(records)} records, last step {records[-1]['step']}, last entry {finished} (`{metrics_path}`).")
        if train and "loss" in train[-1]:
            parts.append(f"Training loss: {_cell(float(train[0]['loss']))} at step {train[0]['step']} -> "
                         f"{_cell(float(train[-1]['loss']))} at step {train[-1]['step']}.")
            overview.setdefault("final train loss", float(train[-1]["loss"]))
        overview["last step"] = max(overview.get("last step", 0), records[-1]["step"])
        plot = plot_curves(label, curve_series(records), output_dir / f"{label.replace('/', '_')}_curves.png")
        if plot is not None:
            overview.setdefault("plots", []).append(plot)
            parts += ["", f"![{label} curves]({plot.name})"]
        # Evaluation numbers that a report file holds are shown from that file, below.
        table = last_records_table(records, skip_kinds=("eval", "test") if reports else ())
        if table:
            parts += ["", table]
        parts.append("")
    for name, path in reports.items():
        parts += [eval_report_section(name, path), ""]
        overview.setdefault("evaluation", []).append(str(path))
    for path in reports.values():
        if path.with_suffix(".md").is_file():  # RLHF writes a readable report beside its JSON
            parts += [f"Full evaluation report: `{path.with_suffix('.md')}`", ""]
    if len(parts) == 2:
        parts += ["(no metrics logged yet)", ""]
    return "\n".join(parts), overview


def build_report(components: Sequence[ComponentLogs], output_dir: str | Path) -> Path:
    """Write ``<output_dir>/<component>_curves.png`` and ``<output_dir>/report.md`` for
    ``components``; returns the Markdown file's path."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    for stale in output_dir.glob("*_curves.png"):  # a component may have no curve this time
        stale.unlink()
    sections, overview = [], []
    for component in components:
        text, row = component_section(component, output_dir)
        sections.append(text)
        overview.append(row)
    header = [
        "# MARK training report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} from the logs of {len(components)} component(s). "
        "Curves show each component's latest run; tables come from the evaluation reports the components write.",
        "",
        markdown_table(
            ["component", "last step", "final train loss", "curves", "evaluation reports"],
            [[r["component"], r.get("last step"), r.get("final train loss"), len(r.get("plots", [])), len(r.get("evaluation", []))]
             for r in overview],
        ),
        "",
    ]
    path = output_dir / REPORT_FILE
    atomic_write_text(path, "\n".join(header + sections).rstrip() + "\n")
    log.info("report: %s (%d plots)", path, sum(len(r.get("plots", [])) for r in overview))
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m src.training.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--logs-dir", type=Path, default=Path("logs"), help="folder of the component log folders (default: logs)")
    parser.add_argument("--output-dir", type=Path, default=Path("reports"), help="where the PNGs and report.md go (default: reports)")
    parser.add_argument("--checkpoints-dir", type=Path, default=Path("checkpoints"),
                        help="where eval reports beside checkpoints are looked up, as <dir>/<component> (default: checkpoints)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Write the report; returns ``{"metrics": {"components", "plots"}, "outputs": {"report", "plots"}}``."""
    from src.core.logging import setup_logging

    args = build_parser().parse_args(argv)
    setup_logging("report")
    components = discover_components(args.logs_dir, args.checkpoints_dir)
    if not components:
        raise MarkError(f"{args.logs_dir}: no {METRICS_FILE} in any component folder; train something first (e.g. `make demo`)")
    path = build_report(components, args.output_dir)
    plots = sorted(str(p) for p in Path(args.output_dir).glob("*_curves.png"))
    print(f"report: {path}")
    for plot in plots:
        print(f"plot:   {plot}")
    return {"metrics": {"components": len(components), "plots": len(plots)}, "outputs": {"report": str(path), "plots": plots}}


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
