"""Load a trained Mamba model and its tokenizer from a checkpoint, for serving and RLHF."""

from __future__ import annotations

from pathlib import Path

import torch

from src.core.checkpoint import find_latest_checkpoint, load_checkpoint, load_state_dict_checked
from src.core.errors import CheckpointError, NotTrainedError
from src.mamba.model import MambaArgs, MambaLM
from src.mamba.tokenizer import MambaTokenizer

TRAIN_COMMAND = "python -m src.scripts.train_mamba --config configs/mamba_train.yaml"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file as given, or in a folder its ``best_model.pt`` (else the latest
    ``checkpoint_*.pt``). No checkpoint is a ``NotTrainedError`` naming the training command."""
    path = Path(path)
    if path.is_dir():
        best = path / "best_model.pt"
        found = best if best.is_file() else find_latest_checkpoint(path)
        if found is None:
            raise NotTrainedError(f"no trained Mamba model in {path}: train one with `{TRAIN_COMMAND}`")
        return found
    if not path.exists():
        raise NotTrainedError(f"{path}: no such checkpoint; train the Mamba model with `{TRAIN_COMMAND}`")
    return path


def load_mamba(checkpoint: str | Path = "checkpoints/mamba", device: str | torch.device = "cpu") -> tuple[MambaLM, MambaTokenizer]:
    """``(model, tokenizer)`` from a Mamba checkpoint file or folder (default: the trained one).

    The checkpoint alone is enough: it holds the architecture and the tokenizer. The model
    is returned in eval mode on ``device``. Errors are one-line ``MarkError``s.
    """
    path = resolve_checkpoint(checkpoint)
    return lm_from_state(load_checkpoint(path, map_location="cpu", kind="mamba"), path, "Mamba checkpoint", device)


def lm_from_state(state: dict, path: Path, what: str, device: str | torch.device = "cpu") -> tuple[MambaLM, MambaTokenizer]:
    """``(model, tokenizer)`` rebuilt from a loaded checkpoint ``state`` holding the weights
    (``model``) and ``extra.model_args`` / ``extra.tokenizer_json``; an incomplete one is a
    one-line ``CheckpointError`` naming ``path`` and ``what`` it should have been."""
    extra = state.get("extra") or {}
    if "model_args" not in extra or "tokenizer_json" not in extra or "model" not in state:
        raise CheckpointError(f"{path}: not a complete {what} (model weights, architecture or tokenizer missing)")
    model = build_lm(extra, path)
    if "adapter" in extra:
        from src.training.adapters import load_trainable_state

        load_trainable_state(model, state["model"], path)
    else:
        load_state_dict_checked(model, state["model"], path)
    tokenizer = MambaTokenizer.from_str(extra["tokenizer_json"], str(path))
    return model.to(device).eval(), tokenizer


def is_pretrained_folder(path: str | Path) -> bool:
    """Whether ``path`` is a pretrained Mamba-2 folder (transformers or mamba_ssm layout: a
    ``config.json``) rather than a MARK checkpoint file or folder."""
    path = Path(path)
    return path.is_dir() and (path / "config.json").is_file() and not (path / "best_model.pt").is_file()


def load_start_model(path: str | Path, tokenizer: str | None = None) -> tuple[MambaLM, MambaTokenizer, dict]:
    """``(model, tokenizer, record)`` to fine-tune from: a MARK checkpoint (an adapter in it is
    merged) or a pretrained Mamba-2 folder (``tokenizer``: a tokenizer folder for one without its
    own). ``record`` says where it came from, as an adapter trained on it records its base."""
    from src.core.checkpoint import file_sha256
    from src.training.adapters import merge_adapter

    path = Path(path)
    if is_pretrained_folder(path):
        from src.mamba.pretrained import load_pretrained

        model, tok, checkpoint = load_pretrained(str(path), tokenizer)
        return model, tok, {"pretrained": str(path.resolve()), "layout": checkpoint.layout}
    file = resolve_checkpoint(path)
    model, tok = load_mamba(file)
    if model.has_adapter():
        merge_adapter(model)
    return model, tok, {"checkpoint": str(file.resolve()), "sha256": file_sha256(file)}


def build_lm(extra: dict, path: Path) -> MambaLM:
    """The model a checkpoint's ``extra`` describes, before its weights are loaded: a fresh
    :class:`MambaLM` of ``model_args``, or, for an adapter checkpoint (``extra["adapter"]``),
    its frozen base with the adapter injected (unmerged; the checkpoint holds only the adapter)."""
    args = MambaArgs.from_dict(extra["model_args"])
    if "adapter" not in extra:
        return MambaLM(args)
    from src.training.adapters import restore_adapter

    return restore_adapter(adapter_base(extra["adapter"].get("base") or {}, args, path), extra["adapter"], path)


def adapter_base(base: dict, args: MambaArgs, path: Path) -> MambaLM:
    """The frozen base model an adapter checkpoint at ``path`` was trained on: a pretrained
    folder (``{"pretrained": folder}``) or another MARK checkpoint (``{"checkpoint": file,
    "sha256": ...}``, whose own adapter is merged). A base that moved, changed or no longer has
    the recorded architecture is a one-line ``CheckpointError``."""
    from src.core.checkpoint import file_sha256
    from src.core.errors import MarkError
    from src.mamba.pretrained import build_model, read_checkpoint
    from src.training.adapters import merge_adapter

    try:
        if "pretrained" in base:
            model = build_model(read_checkpoint(base["pretrained"]), args.chunk_size)
        elif "checkpoint" in base:
            source = Path(base["checkpoint"])
            if base.get("sha256") and source.is_file() and file_sha256(source) != base["sha256"]:
                raise CheckpointError(f"{source} changed since the adapter was trained on it (sha256 differs)")
            model = load_mamba(source)[0]
            if model.has_adapter():
                merge_adapter(model)
        else:
            raise CheckpointError("no base model recorded")
    except MarkError as err:
        raise CheckpointError(f"{path}: the adapter's base model: {err}") from None
    if MambaArgs.from_dict({**model.args.to_dict(), "chunk_size": args.chunk_size}) != args:
        raise CheckpointError(f"{path}: the adapter's base model has another architecture than the one it was trained on")
    return model
