"""Stage 5, export: ``rlhf_final_model.pt``, the PPO policy as a self-contained model file,
and :func:`load_rlhf_model` to read it (for ``load_model`` and the API server).

The file holds the policy's language-model weights (the value head is a training aid and is
left out), its architecture and tokenizer, the pipeline's config, the evaluation metrics, and
where every stage's output came from (path + sha256), so a served model can be traced back
to the exact base model, SFT model, reward model and policy it was made from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from src.core.checkpoint import load_checkpoint, load_state_dict_checked, save_checkpoint
from src.core.errors import CheckpointError, NotTrainedError
from src.models.mamba.model import MambaArgs, MambaLM
from src.models.mamba.tokenizer import MambaTokenizer

KIND = "rlhf"
FINAL_MODEL = "rlhf_final_model.pt"
PIPELINE_COMMAND = "python -m src.training.rlhf_pipeline --base-model mamba --config configs/rl_train.yaml --output-dir checkpoints/rlhf"


def export_rlhf_model(
    policy_path: Path, output_path: Path, config: dict[str, Any], metrics: dict[str, Any], provenance: dict[str, Any]
) -> dict[str, Any]:
    """Write ``output_path`` (``rlhf_final_model.pt``) from the PPO policy checkpoint.

    ``config``: the pipeline's effective config; ``metrics``: per stage; ``provenance``:
    ``{stage: {"path", "sha256"}}``. Returns ``{"metrics": ..., "outputs": ...}``.
    """
    policy = load_checkpoint(policy_path, kind="mamba")
    extra = policy.get("extra") or {}
    if "model_args" not in extra or "tokenizer_json" not in extra:
        raise CheckpointError(f"{policy_path}: not a complete policy checkpoint (architecture or tokenizer missing)")
    save_checkpoint(
        {
            "kind": KIND,
            "model": policy["model"],
            "extra": {k: extra[k] for k in ("model_args", "tokenizer_json", "tokenizer_sha256") if k in extra},
            "config": config,
            "metrics": metrics,
            "provenance": provenance,
        },
        output_path,
    )
    # Tied weights (embeddings / LM head) share storage: count each tensor once.
    unique = {t.untyped_storage().data_ptr(): t.numel() for t in policy["model"].values()}
    return {"metrics": {"parameters": sum(unique.values())}, "outputs": {"rlhf_final_model": str(output_path)}}


def resolve_final_model(path: str | Path) -> Path:
    """``path`` itself, or ``<path>/rlhf_final_model.pt`` for a folder; missing is a
    ``NotTrainedError`` naming the pipeline command."""
    path = Path(path)
    candidate = path / FINAL_MODEL if path.is_dir() else path
    if not candidate.is_file():
        raise NotTrainedError(f"{candidate}: no RLHF model; run `{PIPELINE_COMMAND}`")
    return candidate


def load_rlhf_model(
    path_or_dir: str | Path = "checkpoints/rlhf", device: str | torch.device = "cpu"
) -> tuple[MambaLM, MambaTokenizer]:
    """``(model, tokenizer)`` of an exported RLHF model, in eval mode on ``device``.

    The model is a :class:`MambaLM`: ``src.models.mamba.generate`` and friends work on it
    as on the base model.
    """
    path = resolve_final_model(path_or_dir)
    state = load_checkpoint(path, map_location="cpu", kind=KIND)
    extra = state.get("extra") or {}
    if "model_args" not in extra or "tokenizer_json" not in extra or "model" not in state:
        raise CheckpointError(f"{path}: not a complete RLHF model (weights, architecture or tokenizer missing)")
    model = MambaLM(MambaArgs.from_dict(extra["model_args"]))
    load_state_dict_checked(model, state["model"], path)
    tokenizer = MambaTokenizer.from_str(extra["tokenizer_json"], str(path))
    return model.to(device).eval(), tokenizer


def read_rlhf_metadata(path_or_dir: str | Path = "checkpoints/rlhf") -> dict[str, Any]:
    """The exported model's ``config``, ``metrics`` and ``provenance`` (no weights built)."""
    state = load_checkpoint(resolve_final_model(path_or_dir), map_location="cpu", kind=KIND)
    return {key: state.get(key) for key in ("config", "metrics", "provenance")}
