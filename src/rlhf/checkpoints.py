"""The files the RLHF stages hand to each other, written and read in one place.

``sft_model.pt`` and ``ppo_policy.pt`` are Mamba language-model checkpoints (kind ``mamba``:
weights, architecture, tokenizer), so ``load_mamba`` reads them like the base model; the RLHF
facts ride along under ``"rlhf"``: the stage, the hash of its :class:`StageConfig` (settings
+ sha256 of its inputs), its metrics. A stage's output is reused (``--resume``, skip flags)
by reading that entry.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from src.core.checkpoint import file_sha256, load_checkpoint, save_checkpoint
from src.core.config import config_hash, config_to_dict
from src.core.errors import CheckpointError
from src.mamba.model import MambaLM
from src.mamba.tokenizer import MambaTokenizer
from src.rlhf.config import StageConfig
from src.training.adapters import adapter_info, has_adapter, load_trainable_state, trainable_state_dict
from src.training.engine import TrainTask, fit


def lm_extra(model: MambaLM, tokenizer: MambaTokenizer) -> dict[str, Any]:
    """What ``load_mamba`` needs beside the weights: the architecture and the tokenizer (and,
    for a model with a LoRA adapter, the adapter and where its frozen base comes from)."""
    return {
        "model_args": model.args.to_dict(),
        "tokenizer_json": tokenizer.to_str(),
        "tokenizer_sha256": tokenizer.fingerprint(),
        **({"adapter": adapter_info(model)} if has_adapter(model) else {}),
    }


def stage_record(stage: StageConfig, metrics: dict[str, Any]) -> dict[str, Any]:
    """The ``"rlhf"`` entry of a stage's output: which stage, with which settings and inputs."""
    return {
        "stage": stage.stage,
        "stage_hash": config_hash(stage),
        "inputs": dict(stage.inputs),
        "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))},
    }


def save_lm(
    path: Path, model: MambaLM, tokenizer: MambaTokenizer, stage: StageConfig, metrics: dict[str, Any], **more: Any
) -> Path:
    """Write a Mamba LM checkpoint (kind ``mamba``) with the stage's record; ``more`` adds
    entries (e.g. the PPO value head)."""
    state = {
        "kind": "mamba",
        "model": {k: v.detach().cpu() for k, v in trainable_state_dict(model).items()},  # an adapter: only it
        "extra": lm_extra(model, tokenizer),
        "config": config_to_dict(stage),
        "rlhf": stage_record(stage, metrics),
        **more,
    }
    return save_checkpoint(state, path)


def require_output(path: Path, stage: str, flag: str) -> Path:
    """``path`` if it exists; else a one-line ``CheckpointError`` saying which stage makes it."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: the {stage} output is missing; run the pipeline without {flag} to create it")
    return Path(path)


def finished_output(path: Path, stage: StageConfig, kind: str) -> dict[str, Any] | None:
    """The ``"rlhf"`` record of ``path`` if it was made by exactly this stage config and these
    inputs (so it can be reused), else ``None``."""
    if not Path(path).is_file():
        return None
    try:
        record = load_checkpoint(path, kind=kind).get("rlhf") or {}
    except CheckpointError:
        return None
    return record if record.get("stage_hash") == config_hash(stage) else None


def output_metrics(path: Path, kind: str) -> dict[str, Any]:
    """The metrics a stage stored in its output file."""
    return dict((load_checkpoint(path, kind=kind).get("rlhf") or {}).get("metrics") or {})


def file_record(path: Path) -> dict[str, str]:
    """``{"path", "sha256"}`` of a file: where a stage's input came from."""
    return {"path": str(path), "sha256": file_sha256(path)}


def same_inputs_check(stage: StageConfig, what: str):
    """The ``check_resume`` of a stage: its checkpoints must have started from ``stage.inputs``
    (the same base model and data), else resuming is refused with one line naming ``what``."""

    def check_resume(extra: dict) -> None:
        if extra.get("inputs") != stage.inputs:
            raise CheckpointError(
                f"{stage.paths.checkpoint_dir}: its {what} checkpoint started from other inputs (base model or data); "
                "run without --resume"
            )

    return check_resume


def fit_best(task: TrainTask, stage: StageConfig, resume: bool, what: str) -> tuple[Any, dict[str, Any]]:
    """Train ``task`` through the engine, then load its best checkpoint (lowest
    ``task.metric_for_best`` on val) back into ``task.model``; returns the engine's result and
    that checkpoint's state."""
    result = fit(task, stage, resume=resume)
    if result.best_model_path is None:
        raise CheckpointError(f"{stage.paths.checkpoint_dir}: {what} produced no best_model.pt (no validation ran)")
    best = load_checkpoint(result.best_model_path, kind=task.kind)
    load_trainable_state(task.model, best["model"], result.best_model_path)
    return result, best
