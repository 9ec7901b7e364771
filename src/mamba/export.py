"""Take a MARK Mamba-2 elsewhere: a Hugging Face folder and a GGUF file for llama.cpp.

    from src.mamba import load_mamba
    from src.mamba.export import export_hf, export_gguf
    model, tokenizer = load_mamba("checkpoints/mamba")
    export_hf(model, tokenizer, "exports/mamba-hf")              # Mamba2ForCausalLM.from_pretrained
    export_gguf(model, tokenizer, "exports/mamba.gguf", "f16")    # llama.cpp (f32 | f16 | q8_0)

**HF folder**: ``config.json`` (a ``Mamba2Config`` with every key written out: transformers'
defaults describe a 7B model), ``model.safetensors`` (MARK's parameter names are
transformers'; a tied ``lm_head`` is left out as ``save_pretrained`` does), ``tokenizer.json``
+ ``tokenizer_config.json`` (bos/eos/pad; MARK's own BPE also prepends bos, as MARK does for
every document) and ``generation_config.json``.

**GGUF**: architecture ``mamba2`` with the tensors and keys llama.cpp's ``mamba2`` loader reads
(the layout of its own converter: ``A = -exp(A_log)``, the conv kernel squeezed, the gated norm
split per group), and the vocabulary as a GPT-2-style BPE (``tokenizer.ggml.model = gpt2``,
pre-tokenizer ``gpt-2``, merges, bos/eos/pad ids). Rows of a padded vocabulary get ``[PADn]``
tokens. What llama.cpp could not run or would tokenize differently is refused before anything
is written, with a one-line ``ExportError``.

Both writers write to a temporary name and rename at the end: a failed export leaves no
half-written file behind.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from src.core.errors import MarkError
from src.mamba.model import MambaLM, to_hf_config
from src.mamba.tokenizer import MambaTokenizer

GGUF_DTYPES = ("f32", "f16", "q8_0")
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


class ExportError(MarkError):
    """A model that cannot be written in the asked format (one line, exit code 2)."""

    exit_code = 2


def _staging(target: Path) -> Path:
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def _replace(staging: Path, target: Path) -> Path:
    """Move a finished staging file or folder onto ``target`` (replacing an older export)."""
    if target.is_dir() and not target.is_symlink():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
        staging.rename(target)
        shutil.rmtree(old)
    else:
        os.replace(staging, target)
    return target


# ---------------------------------------------------------------- Hugging Face


def hf_config_dict(model: MambaLM, tokenizer: MambaTokenizer) -> dict[str, Any]:
    """``config.json`` of the export: the full ``Mamba2Config`` (every key explicit) with the
    tokenizer's special ids."""
    config = to_hf_config(model.args)
    config.bos_token_id, config.eos_token_id, config.pad_token_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    config.architectures = ["Mamba2ForCausalLM"]
    return json.loads(config.to_json_string(use_diff=False))


def hf_tokenizer(tokenizer: MambaTokenizer, model_max_length: int | None = None):
    """The ``transformers`` fast tokenizer of ``tokenizer``, with its bos/eos/pad(/unk).

    MARK's own BPE gets a post-processor that prepends bos (MARK trains and generates with
    bos before every text), so ``tok(text).input_ids`` is what the model expects; a pretrained
    tokenizer is written as it came."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer.from_str(tokenizer.backend.to_str())
    names = tokenizer.token_names()
    if not tokenizer.is_pretrained:
        bos = names["bos"]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.bos_id)]
        )
    kwargs = {f"{role}_token": token for role, token in names.items() if token is not None}
    if model_max_length:
        kwargs["model_max_length"] = model_max_length
    return PreTrainedTokenizerFast(tokenizer_object=backend, clean_up_tokenization_spaces=False, **kwargs)


def export_hf(model: MambaLM, tokenizer: MambaTokenizer, out_dir: str | Path, max_length: int | None = None) -> Path:
    """Write the Hugging Face ``Mamba2ForCausalLM`` folder of ``model`` to ``out_dir``; returns it.

    ``Mamba2ForCausalLM.from_pretrained(out_dir)`` and ``AutoTokenizer.from_pretrained(out_dir)``
    load it (see the module docstring for the files)."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    if tokenizer.vocab_size > model.args.vocab_size:
        raise ExportError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.args.vocab_size} rows")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        config = hf_config_dict(model, tokenizer)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        state = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in model.state_dict().items()}
        if model.args.tie_embeddings:
            state.pop("lm_head.weight")  # tied: transformers re-ties it from the embeddings
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        hf_tokenizer(tokenizer, max_length).save_pretrained(staging)
        GenerationConfig(
            bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id, do_sample=False,
        ).save_pretrained(staging)
        return _replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------- PEFT adapter


def export_peft(model: MambaLM, tokenizer: MambaTokenizer, out_dir: str | Path) -> tuple[Path, Path]:
    """Write the LoRA adapter of ``model`` (a :class:`MambaLM` loaded with its adapter unmerged)
    as a PEFT folder; returns ``(adapter folder, base folder)``.

    ``out_dir`` gets ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT's names) and
    the tokenizer files. The base is the transformers folder the adapter was trained on; when
    that was not a transformers folder (a mamba_ssm checkpoint, or an RLHF stage's merged
    input), its transformers form is written to ``out_dir/base``. Then::

        base = Mamba2ForCausalLM.from_pretrained(base_folder)
        model = PeftModel.from_pretrained(base, out_dir)

    An adapter on ``out_proj`` is refused (PEFT refuses it on Mamba-2; export hf or gguf)."""
    import copy

    from src.training.adapters import peft_export_problem, save_peft_adapter, unload_adapter

    if not model.has_adapter():
        raise ExportError("--format peft: the model has no LoRA adapter (train with model.adapter); use --format hf")
    problem = peft_export_problem(model.adapter_modules)
    if problem:
        raise ExportError(f"--format peft: {problem}")
    base = getattr(model, "adapter_base", None) or {}
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out_dir)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if base.get("layout") == "transformers" and Path(base.get("pretrained", "")).is_dir():
            base_dir = Path(base["pretrained"])
        else:
            staging.mkdir()
            export_hf(unload_adapter(copy.deepcopy(model)), tokenizer, staging / "base")
            base_dir = out_dir / "base"
        save_peft_adapter(model, staging, str(base_dir.resolve()))
        hf_tokenizer(tokenizer).save_pretrained(staging)
        return _replace(staging, out_dir), base_dir
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


# ---------------------------------------------------------------- GGUF


def _gpt2_pretokenizer_problem(tokenizer_json: dict[str, Any]) -> str | None:
    """Why llama.cpp's ``gpt-2`` pre-tokenizer would split text differently, or None."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    if len(steps) != 1 or steps[0].get("type") != "ByteLevel":
        return f"its pre-tokenizer is {pre.get('type')!r}, not GPT-2's byte-level one"
    if steps[0].get("add_prefix_space"):
        return "its byte-level pre-tokenizer adds a prefix space (llama.cpp's gpt-2 one does not)"
    if not steps[0].get("use_regex", True):
        return "its byte-level pre-tokenizer does not split with GPT-2's regex"
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        return f"its model is {model.get('type')!r}, not BPE"
    normalizer = tokenizer_json.get("normalizer")
    if normalizer not in (None, {}) and normalizer.get("type") != "NFC":  # NFC: GPT-NeoX's; text is NFC in practice
        return f"its normalizer {normalizer.get('type')!r} has no llama.cpp equivalent"
    return None


def gguf_vocabulary(tokenizer: MambaTokenizer, n_vocab: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) of the GGUF vocabulary: one entry per embedding row."""
    import gguf

    tok_json = json.loads(tokenizer.backend.to_str())
    problem = _gpt2_pretokenizer_problem(tok_json)
    if problem:
        raise ExportError(f"GGUF: the tokenizer cannot be written as a GPT-2 BPE for llama.cpp: {problem}")
    added = {t["id"]: t for t in tok_json.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(n_vocab):
        token = tokenizer.id_to_token(i) if i < tokenizer.vocab_size else None
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        elif i in added:
            tokens.append(token)
            types.append(int(gguf.TokenType.CONTROL if added[i].get("special") else gguf.TokenType.USER_DEFINED))
        else:
            tokens.append(token)
            types.append(int(gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    return tokens, types, merges


def _gguf_tensors(model: MambaLM) -> list[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) of every tensor, in llama.cpp's mamba2 layout."""
    import gguf

    args = model.args
    T, M = gguf.TENSOR_NAMES, gguf.MODEL_TENSOR
    f32 = lambda t: t.detach().to("cpu", torch.float32).contiguous().numpy()  # noqa: E731
    tensors = [(T[M.TOKEN_EMBD] + ".weight", f32(model.backbone.embeddings.weight))]
    for i, block in enumerate(model.backbone.layers):
        mixer = block.mixer
        name = lambda key, suffix=".weight": T[key].format(bid=i) + suffix  # noqa: E731
        tensors += [
            (name(M.ATTN_NORM), f32(block.norm.weight)),
            (name(M.SSM_IN), f32(mixer.in_proj.weight)),
            (name(M.SSM_CONV1D), f32(mixer.conv1d.weight.squeeze(1))),
            (name(M.SSM_CONV1D, ".bias"), f32(mixer.conv1d.bias)),
            (name(M.SSM_DT, ".bias"), f32(mixer.dt_bias)),
            (name(M.SSM_A, ""), f32(-torch.exp(mixer.A_log.float())).reshape(-1, 1)),
            (name(M.SSM_D, ""), f32(mixer.D).reshape(-1, 1)),
            (name(M.SSM_NORM), f32(mixer.norm.weight).reshape(args.n_groups, args.d_inner // args.n_groups)),
            (name(M.SSM_OUT), f32(mixer.out_proj.weight)),
        ]
    tensors.append((T[M.OUTPUT_NORM] + ".weight", f32(model.backbone.norm_f.weight)))
    if not args.tie_embeddings:  # tied: llama.cpp reuses token_embd
        tensors.append((T[M.OUTPUT] + ".weight", f32(model.lm_head.weight)))
    return tensors


# The matrices llama.cpp multiplies with (the rest stays float32 as in its converter: the
# conv kernel and the SSM parameters must be float32 for its ssm ops).
_MATMUL_TENSORS = ("token_embd.weight", "output.weight", ".ssm_in.weight", ".ssm_out.weight")


def check_llama_cpp_limits(model: MambaLM) -> None:
    """Refuse (one line) a model llama.cpp's mamba2 graph cannot run."""
    args = model.args
    if args.d_inner != args.expand * args.d_model or args.d_inner % args.n_heads:
        raise ExportError(f"GGUF: d_inner {args.d_inner} must be expand * d_model and split into {args.n_heads} heads for llama.cpp")
    if args.n_heads % args.n_groups or args.d_inner % args.n_groups:
        raise ExportError(f"GGUF: {args.n_groups} groups must divide the {args.n_heads} heads and d_inner for llama.cpp")
    if args.conv_kernel < 2:
        raise ExportError("GGUF: llama.cpp's ssm_conv needs a convolution kernel of at least 2")


def export_gguf(model: MambaLM, tokenizer: MambaTokenizer, out_path: str | Path, dtype: str = "f32", name: str = "mark-mamba2") -> Path:
    """Write ``model`` (+ vocabulary) as a llama.cpp ``mamba2`` GGUF file; returns its path.

    ``dtype``: ``f32``, ``f16`` or ``q8_0`` for the big matrices (embeddings, in/out
    projections); norms, conv and SSM parameters stay float32. A q8_0 matrix whose rows are not
    a multiple of 32 values stays f16 (the quantizer's block size)."""
    import gguf

    if dtype not in GGUF_DTYPES:
        raise ExportError(f"GGUF dtype '{dtype}': choose one of {', '.join(GGUF_DTYPES)}")
    check_llama_cpp_limits(model)
    args = model.args
    if tokenizer.vocab_size > args.vocab_size:
        raise ExportError(f"GGUF: the tokenizer has {tokenizer.vocab_size} tokens but the model only {args.vocab_size} rows")
    tokens, types, merges = gguf_vocabulary(tokenizer, args.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(out_path)
    writer = gguf.GGUFWriter(str(staging), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.MAMBA2])
    try:
        writer.add_name(name)
        writer.add_context_length(2**20)  # a recurrent model has no context limit; llama.cpp needs a value
        writer.add_embedding_length(args.d_model)
        writer.add_feed_forward_length(0)
        writer.add_head_count(0)
        writer.add_block_count(args.n_layers)
        writer.add_ssm_conv_kernel(args.conv_kernel)
        writer.add_ssm_inner_size(args.d_inner)
        writer.add_ssm_state_size(args.state_size)
        writer.add_ssm_time_step_rank(args.n_heads)
        writer.add_ssm_group_count(args.n_groups)
        writer.add_layer_norm_rms_eps(args.norm_eps)
        writer.add_file_type(int(file_type))

        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokenizer.bos_id)
        writer.add_eos_token_id(tokenizer.eos_id)
        writer.add_pad_token_id(tokenizer.pad_id)
        if tokenizer.unk_id is not None:
            writer.add_unk_token_id(tokenizer.unk_id)
        writer.add_add_bos_token(not tokenizer.is_pretrained)  # MARK's own model starts every text with bos
        writer.add_add_eos_token(False)

        for tensor_name, data in _gguf_tensors(model):
            if dtype == "f32" or not tensor_name.endswith(_MATMUL_TENSORS):
                writer.add_tensor(tensor_name, data)
            elif dtype == "q8_0" and data.shape[-1] % 32 == 0:
                writer.add_tensor(tensor_name, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                                  raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(tensor_name, data.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        return _replace(staging, out_path)
    except BaseException:
        writer.close()
        staging.unlink(missing_ok=True)
        raise
