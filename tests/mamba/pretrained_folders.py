"""Tiny pretrained Mamba-2 folders written the way the ecosystem writes them, for the import
and export tests: a transformers ``save_pretrained`` folder (with a GPT-NeoX-style fast
tokenizer) and an original ``mamba_ssm`` folder (config.json + pytorch_model.bin, no tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

ENDOFTEXT, PADDING = "<|endoftext|>", "<|padding|>"


def save_neox_style_tokenizer(texts: list[str], folder: Path, vocab_size: int = 400):
    """A byte-level BPE with GPT-NeoX's special tokens (one token for bos and eos, a pad),
    trained on ``texts`` and saved as a transformers fast tokenizer; returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[ENDOFTEXT, PADDING],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=ENDOFTEXT, eos_token=ENDOFTEXT,
                                        pad_token=PADDING, unk_token=None)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Move the SSM parameters off their init values (so heads differ), deterministically."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("A_log", "D", "dt_bias", "norm.weight")):
                param.add_(torch.randn(param.shape, generator=gen) * 0.3)


def save_hf_mamba2(folder: Path, vocab_size: int, tied: bool, n_groups: int = 2, tokenizer=None):
    """A tiny random ``Mamba2ForCausalLM`` saved with ``save_pretrained`` (+ tokenizer); returns it."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    torch.manual_seed(0)
    config = Mamba2Config(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8,
        expand=2, n_groups=n_groups, conv_kernel=4, chunk_size=16, tie_word_embeddings=tied, use_bias=False,
        use_conv_bias=True, residual_in_fp32=True, bos_token_id=0, eos_token_id=0, pad_token_id=1,
    )
    model = Mamba2ForCausalLM(config).eval()
    perturb(model)
    model.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return model


def save_mamba_ssm_folder(folder: Path, vocab_size: int, pad_multiple: int = 16):
    """The layout of state-spaces/mamba2-*: mamba_ssm's config.json and pytorch_model.bin with
    ``backbone.embedding.weight`` and a tied ``lm_head.weight`` (vocabulary padded to a multiple).
    Returns a transformers model with the same weights (the reference)."""
    from transformers import Mamba2Config, Mamba2ForCausalLM

    padded = -(-vocab_size // pad_multiple) * pad_multiple
    torch.manual_seed(1)
    reference = Mamba2ForCausalLM(Mamba2Config(
        vocab_size=padded, hidden_size=32, num_hidden_layers=2, num_heads=4, head_dim=16, state_size=8, expand=2,
        n_groups=1, conv_kernel=4, chunk_size=16, tie_word_embeddings=True,
    )).eval()
    perturb(reference, seed=1)
    state = {k.replace("backbone.embeddings.", "backbone.embedding."): v.clone() for k, v in reference.state_dict().items()}
    state["lm_head.weight"] = state["backbone.embedding.weight"].clone()
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({
        "d_model": 32, "d_intermediate": 0, "n_layer": 2, "vocab_size": vocab_size,
        "ssm_cfg": {"layer": "Mamba2", "d_state": 8, "headdim": 16, "ngroups": 1, "chunk_size": 16},
        "attn_layer_idx": [], "attn_cfg": {}, "rms_norm": True, "residual_in_fp32": True, "fused_add_norm": True,
        "pad_vocab_size_multiple": pad_multiple, "tie_embeddings": True,
    }))
    return reference
