"""The full pipeline's stages: which component each one runs, with which config file.

Every training stage is a component entry point called in-process, exactly as the single
targets of the orchestrator call it: its config is loaded with the component's own schema
(``load_config``) and passed to its ``run(cfg, resume, evaluate)``, which returns
``{"metrics": {...}, "outputs": {name: path}}``. Components are imported when their stage
runs, so a pipeline that does not select a stage never imports its component.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from src.core.config import CONFIG_DIR, load_config
from src.core.errors import ConfigError

DATA_PREP = "data_prep"
EXPORT_MODELS = "export_models"


@dataclass(frozen=True)
class TrainStage:
    """A stage that trains (or builds) one model through its component's entry point.

    ``model``: the :func:`src.core.load_model` name of what it makes; ``config_file``: the
    file looked up in ``--config-dir`` (then in ``configs/``); ``entry_module``: a module
    with ``run(cfg, resume=False, evaluate=False)``; ``schema``: ``"module:Class"`` of the
    config; ``evaluate``: passed to ``run``; ``key_metrics``: ``(metric, label)`` pairs shown
    in the summary table, the first two present.
    """

    name: str
    model: str
    config_file: str
    entry_module: str
    schema: str
    evaluate: bool = False
    key_metrics: tuple[tuple[str, str], ...] = ()

    def load_schema(self) -> type[BaseModel]:
        module_name, class_name = self.schema.split(":")
        return getattr(importlib.import_module(module_name), class_name)

    def run(self, cfg: BaseModel, resume: bool) -> dict[str, Any]:
        """The component's ``run(cfg, resume, evaluate)``: its ``{"metrics", "outputs"}`` summary.

        Stages share one process: the torch thread count a component sets (``torch_threads``)
        is restored afterwards, and its models are freed before the next stage."""
        import gc

        import torch

        module = importlib.import_module(self.entry_module)
        threads = torch.get_num_threads()
        try:
            return module.run(cfg, resume=resume, evaluate=self.evaluate)
        finally:
            torch.set_num_threads(threads)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


TRAIN_STAGES: dict[str, TrainStage] = {
    stage.name: stage
    for stage in (
        TrainStage(
            "train_mamba", "mamba", "mamba_train.yaml", "src.scripts.train_mamba",
            "src.mamba.config:MambaTrainConfig",
            key_metrics=(("best_val_perplexity", "val ppl"), ("kn3_val_perplexity", "3-gram val ppl"),
                         ("unigram_val_perplexity", "unigram val ppl"), ("best_val_loss", "val loss")),
        ),
        TrainStage(
            "train_transformer", "transformer", "transfer_train.yaml", "src.scripts.train_transfer",
            "src.classifier.config:TransferConfig",
            key_metrics=(("test_macro_f1", "test macro-F1"), ("tfidf_macro_f1", "TF-IDF test"), ("majority_macro_f1", "majority test"),
                         ("best_val_macro_f1", "val macro-F1")),
        ),
        TrainStage(
            "build_rag", "rag", "rag_indexer.yaml", "src.scripts.train_rag_indexer", "src.rag.config:RagConfig",
            evaluate=True,
            key_metrics=(("recall@5", "rag_eval recall@5"), ("mrr", "MRR"), ("num_chunks", "chunks")),
        ),
        TrainStage(
            "train_rl", "rl", "rl_train.yaml", "src.scripts.train_rl", "src.rl.config:RLConfig",
            # The test split when the environment has one (the retrieval env does), else the val split.
            key_metrics=(("test_trained_mean_reward", "test reward"), ("test_best_fixed_mean_reward", "best fixed (chosen on val) test"),
                         ("trained_mean_reward", "val reward"), ("best_fixed_mean_reward", "best fixed val")),
        ),
        TrainStage(
            "train_rlhf", "rlhf", "rlhf.yaml", "src.training.rlhf_pipeline", "src.rlhf.config:RLHFConfig",
            # {policy}: the exported policy (export/policy: ppo, dpo or sft).
            key_metrics=(("evaluation/{policy}_win_rate_vs_sft", "{POLICY} test win rate vs SFT"),
                         ("evaluation/reward_{policy}_mean", "reward {POLICY}"), ("evaluation/reward_sft_mean", "SFT")),
        ),
    )
}

STAGE_ORDER: tuple[str, ...] = (DATA_PREP, *TRAIN_STAGES, EXPORT_MODELS)


def resolve_config_path(config_dir: str | Path, config_file: str) -> Path:
    """``<config_dir>/<config_file>``, or ``configs/<config_file>`` when ``config_dir`` lacks it
    (so a demo folder only holds the configs it changes)."""
    preferred = Path(config_dir) / config_file
    if preferred.is_file():
        return preferred
    for fallback in (Path("configs") / config_file, CONFIG_DIR / config_file):
        if fallback.is_file():
            return fallback
    raise ConfigError(f"{preferred}: config file not found (nor in configs/)")


def load_stage_config(stage: TrainStage, config_dir: str | Path, device: str | None) -> tuple[BaseModel, Path]:
    """The stage's validated config (``--device`` applied as ``system.device``) and its file."""
    path = resolve_config_path(config_dir, stage.config_file)
    overrides = [f"system.device={device}"] if device else []
    return load_config(path, stage.load_schema(), overrides), path


def format_key_metric(stage: TrainStage, metrics: dict[str, Any]) -> str:
    """The summary table's "key metric" cell: the first two of the stage's key metrics present
    (``a/b`` names ``metrics["a"]["b"]``, for components that report metrics per sub-stage;
    ``{policy}`` / ``{POLICY}`` the exported policy, ``export/policy``, default ``ppo``)."""
    policy = str(lookup_metric(metrics, "export/policy") or "ppo")
    shown = []
    for key, label in stage.key_metrics:
        key, label = key.format(policy=policy), label.format(POLICY=policy.upper())
        value = lookup_metric(metrics, key)
        if value is not None:
            shown.append(f"{label} {_fmt(value)}")
    return ", ".join(shown[:2])


def lookup_metric(metrics: dict[str, Any], key: str) -> Any:
    """``metrics[key]``, else the nested value ``key`` names with ``/`` (``None`` if absent)."""
    if key in metrics:
        return metrics[key]
    node: Any = metrics
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:,.0f}"
