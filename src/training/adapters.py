"""LoRA adapters, in one place for every component (Mamba LM, RLHF stages, classifier encoder).

    from src.training.adapters import AdapterConfig, apply_adapter
    adapted = apply_adapter(model, AdapterConfig(r=8, target_modules=["in_proj"]), what="model.adapter")

* :func:`apply_adapter` injects PEFT's LoRA layers (``LoraConfig`` + PEFT's LoRA tuner, the
  same code as ``get_peft_model``) into the model *in place*: the object stays a ``MambaLM``
  (or ``BertModel`` ...), with the same methods, so the engine, generation and the recipes run
  it unchanged. Every base parameter is frozen; the log lists every adapted module and the
  trainable / total parameter counts.
* Targets are matched here, not by PEFT: an entry is a module name (``in_proj`` matches
  every ``...mixer.in_proj``) or a regular expression matched against the full module name
  (``backbone\\.layers\\.[01]\\.mixer\\.in_proj``); ``layers`` keeps the modules of those
  block indices. **Every entry must match at least one module**: PEFT skips names that match
  nothing, so a run could "train" with no adapter (PEFT issue 3554); here it is a one-line
  ``ConfigError``. PEFT then gets the resolved list of full module names, so MARK and an
  exported ``adapter_config.json`` adapt exactly the same modules.
* :func:`trainable_state_dict` / :func:`load_trainable_state` are what a checkpoint holds
  for an adapted model (the adapter, nothing of the frozen base); :func:`merge_adapter`
  folds the adapter into the base weights (PEFT's merge, then the LoRA layers are unloaded);
  :func:`adapter_disabled` runs the base alone (PEFT's ``disable_adapter``): DPO and PPO's
  reference policy without a second copy of the model.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Literal, Optional

import torch
from pydantic import Field, field_validator
from torch import nn

from src.core.config import StrictModel
from src.core.errors import CheckpointError, ConfigError
from src.core.logging import get_logger

log = get_logger("adapters")

ADAPTER_NAME = "default"
# The block index in a module name: MARK's Mamba (backbone.layers.N), BERT (encoder.layer.N).
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer)\.(\d+)\.")
_REGEX_CHARS = set("\\^$*+?[](){}|")


class AdapterConfig(StrictModel):
    """``model.adapter``: a LoRA adapter on the model's linear layers; the base stays frozen."""

    type: Literal["lora"] = "lora"
    r: int = Field(8, gt=0, description="LoRA rank")
    alpha: float = Field(16.0, gt=0, description="LoRA alpha: the update is scaled by alpha / r")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapter's input")
    target_modules: list[str] = Field(
        default_factory=lambda: ["in_proj"],
        description="module names (in_proj matches every ...mixer.in_proj) or regular expressions matched against "
        "the full module name; each must match at least one module",
    )
    layers: Optional[list[int]] = Field(None, description="only these block indices (null: all blocks)")

    @field_validator("target_modules")
    @classmethod
    def _some_targets(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("must name at least one module")
        for entry in value:
            if set(entry) & _REGEX_CHARS:
                try:
                    re.compile(entry)
                except re.error as err:
                    raise ValueError(f"{entry!r} is not a valid regular expression ({err})") from None
        return value


def _matches(entry: str, name: str) -> bool:
    if set(entry) & _REGEX_CHARS:
        return re.fullmatch(entry, name) is not None
    return name == entry or name.endswith("." + entry)


def resolve_targets(
    model: nn.Module, cfg: AdapterConfig, what: str = "model.adapter", refused: dict[str, str] | None = None
) -> list[str]:
    """The full names of the modules ``cfg`` adapts, in model order.

    Each ``target_modules`` entry must match at least one ``nn.Linear`` (after the ``layers``
    filter); a match on another kind of module, or on a module named in ``refused``
    (``{name: why}``), is a one-line ``ConfigError`` naming ``what``."""
    refused = refused or {}
    chosen: list[str] = []
    for entry in cfg.target_modules:
        found = []
        for name, module in model.named_modules():
            if not name or not _matches(entry, name):
                continue
            if cfg.layers is not None:
                index = LAYER_INDEX.search(name)
                if index is None or int(index.group(1)) not in cfg.layers:
                    continue
            short = name.rsplit(".", 1)[-1]
            if short in refused:
                raise ConfigError(f"{what}.target_modules: {name}: {refused[short]}")
            if not isinstance(module, nn.Linear):
                raise ConfigError(
                    f"{what}.target_modules: {entry!r} matches {name}, a {type(module).__name__}; LoRA adapts linear layers only"
                )
            found.append(name)
        if not found:
            layers = f" in layers {cfg.layers}" if cfg.layers is not None else ""
            examples = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ConfigError(
                f"{what}.target_modules: {entry!r} matches no module{layers} (linear layers: {', '.join(examples)})"
            )
        chosen += [n for n in found if n not in chosen]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(chosen, key=order.__getitem__)


def lora_config(cfg: AdapterConfig, modules: list[str]):
    """PEFT's ``LoraConfig`` for ``cfg`` on exactly ``modules`` (full names)."""
    from peft import LoraConfig

    return LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=list(modules), bias="none")


def apply_adapter(
    model: nn.Module, cfg: AdapterConfig, what: str = "model.adapter", refused: dict[str, str] | None = None,
    base: dict | None = None, also_trained: list[str] | None = None, seed: int | None = None,
) -> nn.Module:
    """Inject a fresh LoRA adapter into ``model`` in place (PEFT's LoRA layers: B starts at
    zero, so the adapted model computes what the base does); freeze every other parameter.
    ``base`` records where the frozen base comes from (kept in checkpoints, see :func:`adapter_info`);
    ``also_trained``: modules (full names) trained fully beside the adapter, e.g. a new classification head.
    ``seed`` (every training entry passes ``system.seed``): LoRA's A matrices are initialised from
    this seed alone and the global RNG is left as it was, so two runs with the same seed start
    from the same adapter even in one process; None draws them from the global RNG.

    Returns ``model``. The adapted modules and the parameter counts are logged; an entry of
    ``cfg.target_modules`` that matches nothing is a ``ConfigError`` (see :func:`resolve_targets`)."""
    from peft.tuners.lora import LoraModel

    if has_adapter(model):
        raise ConfigError(f"{what}: the model already has an adapter (merge it first)")
    modules = resolve_targets(model, cfg, what, refused)
    model.requires_grad_(False)
    # PEFT's LoRA tuner (what get_peft_model builds) injects the layers into the model itself.
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        LoraModel(model, lora_config(cfg, modules), ADAPTER_NAME)
    _set_trainable(model, also_trained or [])
    model.adapter_config, model.adapter_modules, model.adapter_base = cfg, modules, base
    model.adapter_also_trained = list(also_trained or [])
    trainable, total = count_parameters(model)
    for name in modules:
        log.info("LoRA r=%d alpha=%g on %s", cfg.r, cfg.alpha, name)
    log.info("adapter: %d modules; trainable parameters %s of %s (%.2f%%)", len(modules), f"{trainable:,}",
             f"{total:,}", 100.0 * trainable / max(1, total))
    return model


def _set_trainable(model: nn.Module, also_trained: list[str]) -> None:
    """Only the LoRA weights and the ``also_trained`` modules train."""
    for name, param in model.named_parameters():
        param.requires_grad_(".lora_" in name or any(name.startswith(m + ".") for m in also_trained))


def has_adapter(model: nn.Module) -> bool:
    """Whether ``model`` (or a module in it) holds an unmerged adapter of :func:`apply_adapter` / :func:`restore_adapter`."""
    return any(getattr(m, "adapter_modules", None) is not None for m in model.modules())


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) distinct parameters (tied weights counted once)."""
    seen: dict[int, nn.Parameter] = {id(p): p for p in model.parameters()}
    return sum(p.numel() for p in seen.values() if p.requires_grad), sum(p.numel() for p in seen.values())


def adapter_info(model: nn.Module) -> dict:
    """What a checkpoint records to rebuild the adapter: its config, the adapted modules and
    ``base``, where the frozen base comes from."""
    info = {"config": model.adapter_config.model_dump(), "modules": list(model.adapter_modules), "base": model.adapter_base}
    if getattr(model, "adapter_also_trained", None):
        info["also_trained"] = list(model.adapter_also_trained)
    return info


def restore_adapter(model: nn.Module, info: dict, path: str | Path) -> nn.Module:
    """Inject the (untrained) adapter recorded by :func:`adapter_info` into a base ``model``;
    then load its weights with :func:`load_trainable_state`. A record that does not fit is a
    ``CheckpointError`` naming ``path``."""
    from peft.tuners.lora import LoraModel

    try:
        cfg = AdapterConfig.model_validate(info["config"])
        modules = list(info["modules"])
        missing = [m for m in modules if not isinstance(_get(model, m), nn.Linear)]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable adapter record ({str(err).splitlines()[0][:160]})") from None
    if missing:
        raise CheckpointError(f"{path}: the adapter's modules {missing[:3]} are not linear layers of the base model")
    model.requires_grad_(False)
    LoraModel(model, lora_config(cfg, modules), ADAPTER_NAME)
    _set_trainable(model, list(info.get("also_trained") or []))
    model.adapter_config, model.adapter_modules, model.adapter_base = cfg, modules, info.get("base")
    model.adapter_also_trained = list(info.get("also_trained") or [])
    return model


def _get(model: nn.Module, name: str):
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _saved_names(model: nn.Module) -> set[str]:
    """What an adapted model's checkpoint holds: its trainable parameters (the adapter, and a
    head trained beside it) and its buffers (small state such as a reward model's score scale)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    buffers = set(model.state_dict()) - set(params)
    return {n for n, p in params.items() if p.requires_grad} | buffers


def trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The entries of ``state`` (default: ``model.state_dict()``) that train: for an adapted
    model its LoRA weights (+ trained heads and buffers) only, else everything. What the
    engine's checkpoints hold."""
    state = model.state_dict() if state is None else state
    if not has_adapter(model):
        return state
    names = _saved_names(model)
    return {k: v for k, v in state.items() if k in names}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load a :func:`trainable_state_dict` into ``model``: exactly its trainable parameters for
    an adapted model (the frozen base stays as it is), else the full state dict. A mismatch is a
    one-line ``CheckpointError`` naming ``path``."""
    from src.core.checkpoint import load_state_dict_checked

    if not has_adapter(model):
        load_state_dict_checked(model, state, path)
        return
    expected = _saved_names(model)
    if set(state) != expected:
        extra, missing = sorted(set(state) - expected), sorted(expected - set(state))
        raise CheckpointError(
            f"{path}: does not hold this model's adapter (missing {missing[:2]}, unexpected {extra[:2]})"
        )
    current = model.state_dict(keep_vars=True)
    for name, value in state.items():
        if current[name].shape != value.shape:
            raise CheckpointError(f"{path}: adapter weight {name} has shape {tuple(value.shape)}, expected {tuple(current[name].shape)}")
    with torch.no_grad():
        for name, value in state.items():
            current[name].copy_(value)


def merge_adapter(model: nn.Module) -> nn.Module:
    """Fold the adapter into the base weights (``W + alpha/r * B A``, PEFT's merge) and remove
    the LoRA layers, in place (PEFT's ``merge_and_unload``); returns ``model``, a plain model
    again (all parameters trainable, as a freshly built one)."""
    return _unload(model, merge=True)


def unload_adapter(model: nn.Module) -> nn.Module:
    """Remove the LoRA layers without merging (PEFT's ``unload``), in place: the base model."""
    return _unload(model, merge=False)


def _unload(model: nn.Module, merge: bool) -> nn.Module:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            if merge:
                module.merge(safe_merge=True)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    for attr in ("adapter_config", "adapter_modules", "adapter_base", "adapter_also_trained", "peft_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    model.requires_grad_(True)
    return model


@contextmanager
def adapter_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block ``model`` computes the base alone (PEFT's ``disable_adapter``): the
    reference policy of DPO and PPO, with no second copy of the model."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for name, param in model.named_parameters():  # PEFT's toggle changes requires_grad: put it back
            param.requires_grad_(trainable[name])


@contextmanager
def frozen_reference(policy: nn.Module, reference: nn.Module | None = None) -> Iterator[nn.Module]:
    """The reference policy of DPO / PPO: ``reference`` when given (a frozen copy), else
    ``policy`` with its adapter disabled (the base it is trained on, no second copy)."""
    if reference is not None:
        yield reference
        return
    if not has_adapter(policy):
        raise ValueError("no reference model given and the policy has no adapter to disable")
    was_training = policy.training
    policy.eval()
    try:
        with adapter_disabled(policy):
            yield policy
    finally:
        policy.train(was_training)


# Modules PEFT refuses to adapt on transformers' Mamba-2 (PEFT PR 2562): the fused CUDA path
# reads out_proj.weight (and conv1d's) directly, bypassing a LoRA layer.
PEFT_MAMBA_REFUSED = ("out_proj", "conv1d")


def peft_export_problem(modules: list[str]) -> str | None:
    """Why an adapter on ``modules`` cannot be a PEFT adapter of ``Mamba2ForCausalLM``, or None."""
    bad = [m for m in modules if m.rsplit(".", 1)[-1] in PEFT_MAMBA_REFUSED]
    if bad:
        return (
            f"PEFT refuses LoRA on {'/'.join(PEFT_MAMBA_REFUSED)} for Mamba-2 models (transformers' fused CUDA path reads "
            f"out_proj.weight directly; PEFT PR 2562), and this adapter targets {bad[0]}: export --format hf or gguf "
            "(the adapter merged)"
        )
    return None


def save_peft_adapter(model: nn.Module, out_dir: str | Path, base_model: str | None = None) -> Path:
    """Write the adapter of ``model`` as a PEFT folder (``adapter_config.json`` with
    ``LoraConfig.save_pretrained``, ``adapter_model.safetensors`` with PEFT's key names
    ``base_model.model.<module>.lora_A.weight``). MARK's Mamba module names are transformers',
    so ``PeftModel.from_pretrained(Mamba2ForCausalLM.from_pretrained(base), out_dir)`` loads it."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = lora_config(model.adapter_config, model.adapter_modules)
    config.base_model_name_or_path = base_model
    config.task_type = "CAUSAL_LM"
    config.save_pretrained(str(out_dir))
    state = get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    state = {f"base_model.model.{k}": v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()}
    save_file(state, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    return out_dir
