"""Start from a pretrained Mamba-2: read a checkpoint folder into a :class:`MambaLM`.

Two layouts are read, whichever the folder has:

* **transformers** (``Mamba2ForCausalLM.save_pretrained``): ``config.json`` with
  ``model_type: mamba2`` and ``model.safetensors`` / ``pytorch_model.bin`` (or their sharded
  ``*.index.json`` forms). Parameter names are MARK's own.
* **mamba_ssm** (what ``state-spaces/mamba2-130m`` ... ship): ``config.json`` with ``d_model``,
  ``n_layer``, ``ssm_cfg``, ``pad_vocab_size_multiple`` ... and ``pytorch_model.bin``. The
  only renamed parameter is ``backbone.embedding`` -> ``backbone.embeddings``.

The checkpoint decides the architecture (width, layers, heads, groups, state size, tied or
untied embeddings, the vocabulary padded to a multiple); what MARK's Mamba-2 cannot compute
(attention layers, MLP blocks, LayerNorm instead of RMSNorm, biases in the projections,
a clamped time step) is a one-line ``ConfigError`` naming the reason. The vocabulary of
the model is the number of embedding rows; the tokenizer may have fewer tokens (padding).

The tokenizer comes from the folder's ``tokenizer.json`` (+ ``tokenizer_config.json``) or,
when it has none (state-spaces checkpoints do not ship one; they use GPT-NeoX's), from
``model.tokenizer``. A hub id is downloaded when the hub is reachable; offline it is a
one-line error saying to point the key at a local folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from src.core.errors import CheckpointError, ConfigError
from src.core.logging import get_logger
from src.mamba.model import MambaArgs, MambaLM
from src.mamba.tokenizer import MambaTokenizer

log = get_logger("mamba")

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json",)
# MambaArgs fields a checkpoint decides, with the YAML ``model`` key each overrides.
ARCH_KEYS = {
    "vocab_size": "vocab_size", "d_model": "d_model", "n_layers": "n_layers", "n_heads": "n_heads",
    "state_size": "state_size", "expand": "expand", "n_groups": "n_groups", "conv_kernel": "conv_kernel",
    "tie_embeddings": "tie_embeddings",
}


@dataclass
class PretrainedCheckpoint:
    """What a checkpoint folder holds: architecture, float32 weights in MARK's names, layout, and
    the folder (for its tokenizer files)."""

    args: MambaArgs
    state_dict: dict[str, torch.Tensor]
    layout: str  # "transformers" or "mamba_ssm"
    folder: Path
    residual_in_fp32: bool = True


def _looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def resolve_folder(name: str, key: str = "model.pretrained", patterns: tuple[str, ...] = ()) -> Path:
    """A local folder for ``name``: the path itself, or a hub snapshot (downloaded when reachable).

    A missing local path, or a hub id that cannot be fetched, is a one-line ``ConfigError``
    naming ``key``."""
    path = Path(name).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{key}: {name} is a file; point it at the checkpoint's folder")
    if _looks_local(name):
        raise ConfigError(f"{key}: {name}: no such folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id=name, allow_patterns=list(patterns) or None))
    except Exception as err:  # offline, no such repo, gated ...
        reason = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{key}: cannot fetch '{name}' from the Hugging Face hub ({reason}); without internet, "
            f"download it elsewhere and point {key} at the local folder"
        ) from None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: cannot read it as JSON ({str(err).splitlines()[0][:160]})") from None


def _load_tensor_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (listed in the checkpoint's index)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: cannot read the weights ({str(err).splitlines()[0][:160]})") from None


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's weight files (single or sharded, safetensors first), as float32."""
    for name in WEIGHT_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if name.endswith(".index.json"):
            index = _read_json(path).get("weight_map")
            if not isinstance(index, dict):
                raise CheckpointError(f"{path}: no weight_map")
            state: dict[str, torch.Tensor] = {}
            for shard in sorted(set(index.values())):
                if Path(shard).name != shard:  # a shard name is a file of this folder, nothing else
                    raise CheckpointError(f"{path}: shard name {shard!r} is not a plain file name")
                state.update(_load_tensor_file(folder / shard))
        else:
            state = _load_tensor_file(path)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    raise CheckpointError(f"{folder}: no weights ({' or '.join(WEIGHT_FILES)})")


def _number(value: Any) -> float:
    """A JSON number, or transformers' ``{"__float__": "Infinity"}`` encoding of a non-finite one."""
    if isinstance(value, dict) and "__float__" in value:
        value = value["__float__"]
    return float(value)


def _refuse(folder: Path, reason: str) -> ConfigError:
    return ConfigError(f"model.pretrained: {folder}: {reason}; MARK's Mamba-2 cannot compute it")


def args_from_hf_config(config: dict[str, Any], folder: Path, vocab_rows: int) -> tuple[MambaArgs, bool]:
    """MambaArgs of a transformers ``Mamba2Config`` dict (and its ``residual_in_fp32``)."""
    get = lambda key, default: config.get(key, default)  # noqa: E731 (transformers' defaults)
    if get("use_bias", False):
        raise _refuse(folder, "use_bias=true (biases in in_proj/out_proj)")
    if not get("use_conv_bias", True):
        raise _refuse(folder, "use_conv_bias=false")
    if get("hidden_act", "silu") != "silu":
        raise _refuse(folder, f"hidden_act={get('hidden_act', 'silu')!r} (only silu)")
    limit = get("time_step_limit", [0.0, math.inf])
    if limit is not None and (_number(limit[0]) > 0.0 or _number(limit[1]) != math.inf):
        raise _refuse(folder, f"time_step_limit={[_number(v) for v in limit]} (the time step is not clamped in MARK)")
    hidden, expand = int(get("hidden_size", 4096)), int(get("expand", 2))
    heads, head_dim = int(get("num_heads", 128)), int(get("head_dim", 64))
    if heads * head_dim != expand * hidden:
        raise CheckpointError(f"{folder}/config.json: num_heads * head_dim ({heads}*{head_dim}) != expand * hidden_size ({expand}*{hidden})")
    ids = {k: get(k, None) for k in ("pad_token_id", "bos_token_id", "eos_token_id")}
    args = MambaArgs(
        vocab_size=vocab_rows, d_model=hidden, n_layers=int(get("num_hidden_layers", 64)), n_heads=heads,
        state_size=int(get("state_size", 128)), expand=expand, n_groups=int(get("n_groups", 8)),
        conv_kernel=int(get("conv_kernel", 4)), chunk_size=int(get("chunk_size", 256)),
        tie_embeddings=bool(get("tie_word_embeddings", False)), norm_eps=float(get("layer_norm_epsilon", 1e-5)),
        **{k: int(v if not isinstance(v, list) else v[0]) for k, v in ids.items() if v is not None},
    )
    return args, bool(get("residual_in_fp32", True))


def args_from_mamba_ssm_config(config: dict[str, Any], folder: Path, vocab_rows: int) -> tuple[MambaArgs, bool]:
    """MambaArgs of a ``mamba_ssm`` ``MambaConfig`` dict (with ``Mamba2``'s defaults for ``ssm_cfg``)."""
    ssm = dict(config.get("ssm_cfg") or {})
    if ssm.get("layer", "Mamba1") != "Mamba2":
        raise _refuse(folder, f"ssm_cfg.layer={ssm.get('layer', 'Mamba1')!r} (only Mamba2 blocks)")
    if config.get("attn_layer_idx"):
        raise _refuse(folder, f"attention layers at {config['attn_layer_idx']}")
    if int(config.get("d_intermediate", 0) or 0):
        raise _refuse(folder, f"d_intermediate={config['d_intermediate']} (MLP blocks)")
    if not config.get("rms_norm", True):
        raise _refuse(folder, "rms_norm=false (LayerNorm blocks)")
    if ssm.get("bias", False) or not ssm.get("conv_bias", True):
        raise _refuse(folder, "bias=true or conv_bias=false in ssm_cfg")
    if not ssm.get("rmsnorm", True) or ssm.get("norm_before_gate", False):
        raise _refuse(folder, "ssm_cfg.rmsnorm=false or norm_before_gate=true")
    if ssm.get("D_has_hdim", False):
        raise _refuse(folder, "ssm_cfg.D_has_hdim=true")
    limit = ssm.get("dt_limit", [0.0, math.inf])
    if _number(limit[0]) > 0.0 or _number(limit[1]) != math.inf:
        raise _refuse(folder, f"ssm_cfg.dt_limit={list(limit)}")
    d_model, expand = int(config["d_model"]), int(ssm.get("expand", 2))
    d_inner = expand * d_model
    if ssm.get("d_ssm") not in (None, d_inner):
        raise _refuse(folder, f"ssm_cfg.d_ssm={ssm['d_ssm']} != expand * d_model (a partial SSM)")
    head_dim = int(ssm.get("headdim", 64))
    if d_inner % head_dim:
        raise CheckpointError(f"{folder}/config.json: headdim {head_dim} does not divide expand * d_model ({d_inner})")
    args = MambaArgs(
        vocab_size=vocab_rows, d_model=d_model, n_layers=int(config["n_layer"]), n_heads=d_inner // head_dim,
        state_size=int(ssm.get("d_state", 128)), expand=expand, n_groups=int(ssm.get("ngroups", 1)),
        conv_kernel=int(ssm.get("d_conv", 4)), chunk_size=int(ssm.get("chunk_size", 256)),
        tie_embeddings=bool(config.get("tie_embeddings", True)), norm_eps=1e-5,
    )
    return args, bool(config.get("residual_in_fp32", True))


def read_checkpoint(folder: str | Path) -> PretrainedCheckpoint:
    """The architecture and weights (MARK's parameter names, float32) of a local checkpoint folder."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"model.pretrained: {folder} has no config.json (not a Mamba-2 checkpoint folder)")
    config = _read_json(config_path)
    state = read_weights(folder)
    if config.get("model_type") == "mamba2":
        layout = "transformers"
    elif "d_model" in config and "n_layer" in config:
        layout = "mamba_ssm"
        state = {k.replace("backbone.embedding.", "backbone.embeddings.", 1): v for k, v in state.items()}
    else:
        raise ConfigError(
            f"model.pretrained: {config_path}: neither a transformers Mamba-2 config (model_type "
            f"{config.get('model_type')!r}) nor a mamba_ssm one (d_model, n_layer)"
        )
    embedding = state.get("backbone.embeddings.weight")
    if embedding is None:
        raise CheckpointError(f"{folder}: no embedding matrix (backbone.embeddings.weight) in its weights")
    reader = args_from_hf_config if layout == "transformers" else args_from_mamba_ssm_config
    args, residual_in_fp32 = reader(config, folder, int(embedding.shape[0]))
    if args.tie_embeddings:
        head = state.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, embedding):
            raise CheckpointError(f"{folder}: embeddings are tied in config.json but lm_head.weight differs from them")
    elif "lm_head.weight" not in state:
        raise CheckpointError(f"{folder}: untied embeddings but no lm_head.weight in its weights")
    return PretrainedCheckpoint(args, state, layout, folder, residual_in_fp32)


def build_model(checkpoint: PretrainedCheckpoint, chunk_size: int | None = None, gradient_checkpointing: bool = False) -> MambaLM:
    """A :class:`MambaLM` with the checkpoint's weights (every parameter must match by name and shape).

    ``chunk_size`` (speed only) replaces the checkpoint's when given."""
    args = checkpoint.args
    if chunk_size is not None:
        args = MambaArgs.from_dict({**args.to_dict(), "chunk_size": chunk_size})
    model = MambaLM(args, gradient_checkpointing=gradient_checkpointing)
    expected = model.state_dict()
    if args.tie_embeddings:
        expected.pop("lm_head.weight")
    missing = sorted(set(expected) - set(checkpoint.state_dict))
    unexpected = sorted(set(checkpoint.state_dict) - set(expected))
    wrong = [k for k in expected if k in checkpoint.state_dict and checkpoint.state_dict[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        detail = "; ".join(
            part for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"shape of {wrong[:3]}" if wrong else "",
            ) if part
        )
        raise CheckpointError(f"{checkpoint.folder}: weights do not fit a Mamba-2 of its config.json ({detail})")
    model.load_state_dict(checkpoint.state_dict, strict=not args.tie_embeddings)
    return model


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(checkpoint_folder: Path, tokenizer: str | None, pretrained_name: str) -> MambaTokenizer:
    """The tokenizer of a pretrained model: ``model.tokenizer`` when set, else the checkpoint's files."""
    if tokenizer:
        folder = resolve_folder(tokenizer, "model.tokenizer", ("tokenizer*", "special_tokens_map.json", "*.txt", "*.model"))
        return MambaTokenizer.from_pretrained(folder, "model.tokenizer")
    if not has_tokenizer(checkpoint_folder):
        raise ConfigError(
            f"model.pretrained: {pretrained_name} has no tokenizer files (tokenizer.json); set model.tokenizer to a "
            "folder that has them (state-spaces/mamba2-* use the GPT-NeoX tokenizer, EleutherAI/gpt-neox-20b)"
        )
    return MambaTokenizer.from_pretrained(checkpoint_folder, "model.pretrained")


def load_pretrained(
    pretrained: str, tokenizer: str | None = None, chunk_size: int | None = None, gradient_checkpointing: bool = False
) -> tuple[MambaLM, MambaTokenizer, PretrainedCheckpoint]:
    """``(model, tokenizer, checkpoint)`` for ``model.pretrained`` (a local folder or a hub id)."""
    folder = resolve_folder(pretrained, "model.pretrained", ("*.json", "*.safetensors", "*.bin", "*.txt", "*.model"))
    checkpoint = read_checkpoint(folder)
    tok = load_tokenizer(folder, tokenizer, pretrained)
    if tok.vocab_size > checkpoint.args.vocab_size:
        raise ConfigError(
            f"model.tokenizer: its {tok.vocab_size} tokens do not fit the checkpoint's {checkpoint.args.vocab_size} "
            f"embedding rows; use the tokenizer the model was trained with"
        )
    model = build_model(checkpoint, chunk_size, gradient_checkpointing)
    log.info(
        "pretrained Mamba-2 from %s (%s layout): %s parameters, %d layers, d_model %d, %d heads, %d groups, "
        "vocab %d (tokenizer %d), %s embeddings",
        folder, checkpoint.layout, f"{model.num_parameters():,}", checkpoint.args.n_layers, checkpoint.args.d_model,
        checkpoint.args.n_heads, checkpoint.args.n_groups, checkpoint.args.vocab_size, tok.vocab_size,
        "tied" if checkpoint.args.tie_embeddings else "untied",
    )
    return model, tok, checkpoint


def yaml_overrides(model_cfg, args: MambaArgs) -> dict[str, tuple[Any, Any]]:
    """``{yaml key: (yaml value, checkpoint value)}`` for every ``model`` key the checkpoint overrides."""
    return {
        f"model.{key}": (getattr(model_cfg, key), getattr(args, field))
        for field, key in ARCH_KEYS.items()
        if getattr(model_cfg, key) != getattr(args, field)
    }
