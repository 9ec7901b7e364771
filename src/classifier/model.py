"""The classifier model: a Hugging Face encoder with a sequence-classification head.

* :func:`build_model_and_tokenizer` loads ``AutoModelForSequenceClassification`` and
  ``AutoTokenizer`` from a hub id, a local folder or ``minilm-local`` (offline), with the
  label names as ``id2label``.
* :func:`document_logits` runs the model on a batch of windows and pools the window
  logits of each document (mean), so truncation and sliding windows share one path.
* :func:`tokenizer_files` / :func:`tokenizer_from_files` and :func:`model_from_config`
  rebuild the tokenizer and model from what a checkpoint holds, with no access to the
  original model folder or the hub.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from src.core.errors import CheckpointError, ConfigError
from src.core.hub import hub_error, resolve_pretrained


def build_model_and_tokenizer(model_cfg, label_names: list[str]) -> tuple[nn.Module, Any]:
    """The pretrained encoder with a new ``len(label_names)``-way head, and its tokenizer.

    ``model_cfg`` is the config's ``model`` section. A name that can't be loaded (no
    internet, no such folder) is a one-line ``ConfigError`` from :func:`src.core.hub.hub_error`;
    a ``max_length`` beyond the encoder's positions is a ``ConfigError`` too.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    name, key = model_cfg.base_model, "model.base_model"
    source = resolve_pretrained(name, key)
    extra = {} if model_cfg.classifier_dropout is None else {"classifier_dropout": model_cfg.classifier_dropout}
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" report is expected here
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForSequenceClassification.from_pretrained(
            source,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            **extra,
        )
    except Exception as err:  # offline hub miss, missing folder, not a model folder, ...
        raise hub_error(name, key, err) from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"{key}: '{name}' has no fast tokenizer; sliding windows need one")
    limit = max_positions(model, tokenizer)
    if model_cfg.max_length > limit:
        raise ConfigError(f"model.max_length: {model_cfg.max_length} is more than '{name}' can read ({limit} word-pieces)")
    return model, tokenizer


def max_positions(model: nn.Module, tokenizer) -> int:
    """The most word-pieces one window of this encoder can hold."""
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 0) or 10**9
    tok_limit = int(getattr(tokenizer, "model_max_length", 0) or 0)
    if 0 < tok_limit < 10**6:  # "very large" means the tokenizer sets no limit
        limit = min(limit, tok_limit)
    return limit


def pool_window_logits(window_logits: torch.Tensor, doc_index: torch.Tensor, num_docs: int) -> torch.Tensor:
    """Mean of the window logits of each document: ``(num_windows, C)`` -> ``(num_docs, C)``."""
    sums = torch.zeros(num_docs, window_logits.size(-1), dtype=window_logits.dtype, device=window_logits.device)
    sums.index_add_(0, doc_index, window_logits)
    counts = torch.bincount(doc_index, minlength=num_docs).clamp_min(1).to(window_logits.dtype)
    return sums / counts.unsqueeze(-1)


def document_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits ``(num_docs, num_labels)`` of a batch made by :func:`collate_windows`."""
    window_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    num_docs = int(batch["labels"].numel()) if "labels" in batch else int(batch["doc_index"].max().item()) + 1
    return pool_window_logits(window_logits.float(), batch["doc_index"], num_docs)


def tokenizer_files(tokenizer) -> dict[str, Any]:
    """The tokenizer's saved files by name: text as ``str``, binary files as uint8 tensors.

    Everything a ``weights_only`` checkpoint may hold, so the tokenizer travels inside it.
    """
    files: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).rglob("*")):
            if not path.is_file():
                continue
            data = path.read_bytes()
            name = path.relative_to(tmp).as_posix()
            try:
                files[name] = data.decode("utf-8")
            except UnicodeDecodeError:
                files[name] = torch.frombuffer(bytearray(data), dtype=torch.uint8).clone()
    return files


# The files a Hugging Face tokenizer's ``save_pretrained`` writes. A checkpoint's tokenizer
# files are written under these names only (the names below, not the checkpoint's strings):
# a crafted checkpoint must not choose where a file goes (``../../x``) or what it is called.
TOKENIZER_FILE_NAMES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.txt",
    "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.model", "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_from_files(files: dict[str, Any], source: str = "<checkpoint>"):
    """Inverse of :func:`tokenizer_files`: the tokenizer, loaded from a temporary folder.

    Only the known tokenizer file names are accepted; any other name (a path, ``..``, an
    unknown file) is a one-line ``CheckpointError`` and nothing is written."""
    from transformers import AutoTokenizer

    if not isinstance(files, dict):
        raise CheckpointError(f"{source}: its tokenizer files are not a name -> content mapping")
    allowed = {name: name for name in TOKENIZER_FILE_NAMES}
    unknown = [name for name in files if not isinstance(name, str) or name not in allowed]
    if unknown:
        shown = ", ".join(repr(n)[:80] for n in unknown[:3])
        raise CheckpointError(
            f"{source}: refused: tokenizer file name(s) {shown} are not tokenizer files "
            f"({', '.join(TOKENIZER_FILE_NAMES[:4])}, ...); the checkpoint may be crafted"
        )
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            target = Path(tmp) / allowed[name]  # our constant, never the checkpoint's string
            if isinstance(content, str):
                target.write_text(content, encoding="utf-8")
            elif isinstance(content, torch.Tensor):
                target.write_bytes(content.to(torch.uint8).numpy().tobytes())
            else:
                raise CheckpointError(f"{source}: tokenizer file {name} is neither text nor bytes")
        try:
            return AutoTokenizer.from_pretrained(tmp)
        except Exception as err:
            raise CheckpointError(f"{source}: cannot rebuild the tokenizer it holds: {str(err).splitlines()[0][:200]}") from None


def add_adapter(model: nn.Module, adapter_cfg, base_model: str, seed: int | None = None) -> nn.Module:
    """A LoRA adapter (``model.adapter``) on the encoder of ``model``, in place: the encoder is
    frozen, the classification head (every module beside the encoder) trains fully; ``seed``: see
    :func:`src.training.adapters.apply_adapter`."""
    from src.training.adapters import apply_adapter

    heads = [name for name, module in model.named_children()
             if name != model.base_model_prefix and any(True for _ in module.parameters())]
    return apply_adapter(model, adapter_cfg, "model.adapter", base={"pretrained": base_model}, also_trained=heads, seed=seed)


def model_from_config(
    hf_config: dict, state_dict: dict[str, torch.Tensor], source: str = "<checkpoint>", adapter: dict | None = None
) -> nn.Module:
    """An ``AutoModelForSequenceClassification`` built from a config dict and loaded with weights.
    ``adapter`` (the checkpoint's adapter record): the weights are the adapter and head only,
    loaded onto the pretrained encoder it was trained on (unmerged)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from src.core.checkpoint import load_state_dict_checked
    from src.training.adapters import load_trainable_state, restore_adapter

    hf_config = dict(hf_config)
    model_type = hf_config.pop("model_type", None)
    if not model_type:
        raise CheckpointError(f"{source}: the model config it holds has no model_type")
    try:
        config = AutoConfig.for_model(model_type, **hf_config)
        if adapter is None:
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            base = (adapter.get("base") or {}).get("pretrained", "")
            model = AutoModelForSequenceClassification.from_pretrained(resolve_pretrained(base), config=config)
    except Exception as err:
        raise CheckpointError(f"{source}: cannot rebuild a '{model_type}' model: {str(err).splitlines()[0][:200]}") from None
    if adapter is None:
        load_state_dict_checked(model, state_dict, source)
    else:
        load_trainable_state(restore_adapter(model, adapter, source), state_dict, source)
    return model
