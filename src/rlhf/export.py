"""Stage 5, export: ``rlhf_final_model.pt``, the PPO policy as a self-contained model file
(read back by :func:`src.rlhf.load.load_rlhf_model`, for ``load_model`` and the API server).

The file holds the policy's language-model weights (the value head is a training aid and is
left out), its architecture and tokenizer, the pipeline's config, the evaluation metrics, and
where every stage's output came from (path + sha256), so a served model can be traced back
to the exact base model, SFT model, reward model and policy it was made from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from src.core.checkpoint import load_checkpoint, save_checkpoint
from src.core.errors import CheckpointError

from src.rlhf.load import KIND


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
            # an adapter policy keeps its adapter record: the file holds only the adapter, loaded onto its base
            "extra": {k: extra[k] for k in ("model_args", "tokenizer_json", "tokenizer_sha256", "adapter") if k in extra},
            "config": config,
            "metrics": metrics,
            "provenance": provenance,
        },
        output_path,
    )
    # Tied weights (embeddings / LM head) share storage: count each tensor once.
    unique = {t.untyped_storage().data_ptr(): t.numel() for t in policy["model"].values()}
    return {"metrics": {"parameters": sum(unique.values())}, "outputs": {"rlhf_final_model": str(output_path)}}
