"""Does every model the pipeline trains beat its cheap baseline? The targets table.

Each stage's component already measures a strong cheap baseline the same way as its model
(the Kneser-Ney 3-gram in ``src.mamba.evaluate``, TF-IDF + logistic regression in
``src.classifier.evaluate``, each retrieval mode in ``src.rag.eval``, the fixed strategies in
``src.rl.evaluate``, zero-shot cosine and SFT itself in ``src.rlhf.evaluate``) and returns it
in its metrics. :data:`TARGETS` says, per stage, which metric to compare with which baseline,
on which split, and what counts as beating it (issue 23's targets); :func:`check_targets`
reads both numbers from the stage's metrics (never a constant) and :func:`format_targets`
prints one row per check: stage, split, metric, value, baseline, target, ✓ / ✗.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

from src.pipelines.stages import lookup_metric

RAG_SINGLE_MODES = ("dense", "bm25")


@dataclass(frozen=True)
class Check:
    """One row: ``value`` of the stage's model against ``baseline`` on ``split``; ``passed``
    None when the stage's metrics lack either number (the stage did not measure it)."""

    stage: str
    split: str
    metric: str
    value: float | None
    baseline_name: str
    baseline: float | None
    target: str
    passed: bool | None


@dataclass(frozen=True)
class Target:
    """How to read one check from a stage's metrics. ``value`` / ``baseline``: metric keys
    (``a/b`` = nested) or functions of the metrics; ``split``: a string, or a function of
    the metrics; ``passes(value, baseline)``: the target."""

    stage: str
    metric: str
    value: str | Callable[[dict], float | None]
    baseline_name: str
    baseline: str | Callable[[dict], float | None]
    split: str | Callable[[dict], str]
    target: str
    passes: Callable[[float, float], bool]
    only_if: Callable[[dict], bool] = lambda metrics: True


def rag_mode_metric(metrics: dict[str, Any], mode: str, name: str = "recall@5") -> float | None:
    """``name`` of retrieval ``mode`` from ``build_rag``'s metrics: the configured mode's
    metrics are unprefixed, the other modes' are ``<mode>/<name>``."""
    if f"{mode}/{name}" in metrics:
        return metrics[f"{mode}/{name}"]
    prefixed = {key.split("/", 1)[0] for key in metrics if "/" in key and key.endswith(f"/{name}")}
    unprefixed_mode = [m for m in ("dense", "bm25", "hybrid") if m not in prefixed]
    return metrics.get(name) if unprefixed_mode == [mode] else None


def _best_single_mode(metrics: dict[str, Any]) -> float | None:
    values = [v for v in (rag_mode_metric(metrics, m) for m in RAG_SINGLE_MODES) if v is not None]
    return max(values) if values else None


def _rl_split(metrics: dict[str, Any]) -> str:
    queries = metrics.get("test_queries")
    return f"test ({queries} queries)" if queries else "test"


def _rag_split(metrics: dict[str, Any]) -> str:
    if "hybrid_selected" in metrics:
        return f"rag_eval test ({metrics.get('test_queries')} queries; fusion {metrics['hybrid_selected']} chosen on val)"
    queries = metrics.get("num_queries")
    return f"rag_eval ({queries} queries)" if queries else "rag_eval"


def _rag_hybrid(metrics: dict[str, Any]) -> float | None:
    """The hybrid row: the fusion chosen on val when the eval was split, else ``hybrid`` (RRF)."""
    if "hybrid_selected/recall@5" in metrics:
        return metrics["hybrid_selected/recall@5"]
    return rag_mode_metric(metrics, "hybrid")


def _rlhf_split(what: str) -> Callable[[dict], str]:
    def split(metrics: dict[str, Any]) -> str:
        count = lookup_metric(metrics, f"evaluation/{what}")
        return f"test ({count} {'pairs' if 'pairs' in what else 'prompts'})" if count else "test"

    return split


def _trained(policy: str) -> Callable[[dict], bool]:
    return lambda metrics: lookup_metric(metrics, f"evaluation/{policy}_win_rate_vs_sft") is not None


TARGETS: tuple[Target, ...] = (
    Target("train_mamba", "perplexity", "best_val_perplexity", "Kneser-Ney 3-gram", "kn3_val_perplexity", "val",
           "<= 0.9 x baseline", lambda v, b: v <= 0.9 * b),
    Target("train_transformer", "macro-F1", "test_macro_f1", "TF-IDF + logistic regression", "tfidf_macro_f1", "test",
           ">= baseline + 0.03", lambda v, b: v >= b + 0.03),
    Target("build_rag", "hybrid recall@5", _rag_hybrid, "best single mode (dense, bm25)",
           _best_single_mode, _rag_split, ">= baseline", lambda v, b: v >= b),
    Target("train_rl", "mean reward", "test_trained_mean_reward", "best fixed strategy (chosen on val)",
           "test_best_fixed_mean_reward", _rl_split, "> baseline", lambda v, b: v > b),
    Target("train_rlhf", "reward-model accuracy", "evaluation/reward_model_test_accuracy", "zero-shot cosine",
           "evaluation/baseline_cosine_test_accuracy", _rlhf_split("reward_model_test_pairs"),
           ">= 0.95 and > baseline", lambda v, b: v >= 0.95 and v > b),
    Target("train_rlhf", "PPO win rate vs SFT", "evaluation/ppo_win_rate_vs_sft", "SFT (itself)",
           lambda m: 0.5 if lookup_metric(m, "evaluation/ppo_win_rate_vs_sft") is not None else None,
           _rlhf_split("num_prompts"), ">= 0.6", lambda v, b: v >= 0.6, only_if=_trained("ppo")),
    Target("train_rlhf", "DPO win rate vs SFT", "evaluation/dpo_win_rate_vs_sft", "SFT (itself)",
           lambda m: 0.5 if lookup_metric(m, "evaluation/dpo_win_rate_vs_sft") is not None else None,
           _rlhf_split("num_prompts"), ">= 0.6", lambda v, b: v >= 0.6, only_if=_trained("dpo")),
)


def _read(metrics: dict[str, Any], what: str | Callable[[dict], Any]) -> Any:
    value = what(metrics) if callable(what) else lookup_metric(metrics, what)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def check_targets(metrics_by_stage: dict[str, dict[str, Any]], targets: Sequence[Target] = TARGETS) -> list[Check]:
    """The checks of the stages in ``metrics_by_stage`` (``{stage: its metrics}``, as the
    summary holds them), in :data:`TARGETS` order."""
    checks = []
    for t in targets:
        metrics = metrics_by_stage.get(t.stage)
        if metrics is None or not t.only_if(metrics):
            continue
        value, baseline = _read(metrics, t.value), _read(metrics, t.baseline)
        split = t.split(metrics) if callable(t.split) else t.split
        passed = None if value is None or baseline is None else bool(t.passes(value, baseline))
        checks.append(Check(t.stage, split, t.metric, value, t.baseline_name, baseline, t.target, passed))
    return checks


def format_targets(checks: Sequence[Check]) -> str:
    """The targets table: one row per check, ✓ / ✗ (``?`` when a number is missing)."""
    if not checks:
        return ""
    rows = [("stage", "split", "metric", "value", "baseline", "target", "")]
    for c in checks:
        mark = "?" if c.passed is None else ("✓" if c.passed else "✗")
        baseline = f"{c.baseline_name} {_fmt(c.baseline)}"
        rows.append((c.stage, c.split, c.metric, _fmt(c.value), baseline, c.target, mark))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    passed = sum(1 for c in checks if c.passed)
    return "\nEvery model against its baseline (same split):\n" + "\n".join(lines) + f"\n{passed} of {len(checks)} targets met\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"


def checks_as_dicts(checks: Sequence[Check]) -> list[dict[str, Any]]:
    """The checks for the manifest / the pipeline's return value."""
    return [c.__dict__.copy() for c in checks]
