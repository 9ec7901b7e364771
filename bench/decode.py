"""Prefill and decode speed of MARK's Mamba-2 vs transformers and llama.cpp on the same weights.

    python bench/decode.py [--batches 1 16] [--prompt-tokens 200] [--new-tokens 128] [--threads 2]
        [--no-compile] [--checkpoint DIR] [--config configs/mamba_train.yaml] [--device cpu]
        [--output bench/results/decode.json]

One set of weights (a trained checkpoint with ``--checkpoint``, else the seed config's
architecture, d_model 256, 4 layers, vocab 5000, with seeded random weights: speed does not
depend on what the weights say; for the GGUF export a BPE is trained on the repository's own
source) runs in three engines in one process, on the same threads:

* ``mark``: :class:`src.mamba.generate.Decoder` eager, the fused in-place step;
* ``mark_native``: the ``native`` Decoder (MARK's C kernel, ``src/mamba/kernels/decode_cpu.c``),
  one ``step`` + argmax per token as the API's worker decodes (its build time, paid once per
  machine, is reported);
* ``mark_native_greedy``: the native Decoder's ``greedy``, all the tokens in one kernel call:
  what ``generate_ids(..., temperature=0, decoder=native)`` runs;
* ``mark_compiled``: the same step through ``torch.compile`` (the compile time is reported
  separately, it is paid once per process: the API server pays it at start-up);
* ``mark_greedy``: the compiled Decoder's ``greedy`` (``Decoder.block`` steps with the argmax
  inside one compiled graph, called from inductor's generated C++ on the CPU; its extra compile
  time is reported too): what ``generate_ids(..., temperature=0, decoder=compiled)`` runs;
* ``transformers``: ``Mamba2ForCausalLM`` with the same state dict (or the HF export of
  ``src.mamba.export`` when it exists), ``generate(do_sample=False)`` on its default path
  (pure PyTorch here: no ``mamba_ssm`` kernels);
* ``llama.cpp``: the f32 GGUF export through ``llama_cpp`` (batch 1 only: llama-cpp-python
  decodes one sequence), when ``src.mamba.export.export_gguf`` and ``llama_cpp`` are both
  importable; otherwise the column is skipped and the reason printed.

Prefill: the prompts (``batch`` x ``prompt-tokens``, read at once) until the state after the
last prompt token exists. Decode: ``new-tokens`` greedy tokens per row, one step at a time;
tokens/s counts all rows. Each point is the best of ``--repeats`` runs (after a warm-up);
wall-clock and process-CPU-time rates are both reported (the CPU-time rate is what the speed
would be on an idle machine when other processes share the cores). The greedy tokens of the
engines are compared. Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.mamba_throughput import machine_info, seed_model_args  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--prompt-tokens", type=int, default=200)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per point (best kept), after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="torch and llama.cpp threads")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile'd MARK step")
    parser.add_argument(
        "--engines", nargs="+",
        default=["mark", "mark_native", "mark_native_greedy", "mark_compiled", "mark_greedy", "transformers", "llama.cpp"],
    )
    parser.add_argument("--checkpoint", help="a MARK mamba checkpoint dir (default: seeded random weights)")
    parser.add_argument("--config", default="configs/mamba_train.yaml", help="seed config whose model section is used")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--output", default="bench/results/decode.json")
    return parser.parse_args(argv)


def build_mark(opts, need_tokenizer: bool):
    """(MambaLM, tokenizer or None) on ``opts.device``, in eval mode. Without a checkpoint and
    with ``need_tokenizer`` (the GGUF export writes a vocabulary), a byte-level BPE of the
    config's size is trained on this repository's own source and docs, and the model gets its size."""
    from dataclasses import replace

    from src.mamba.model import MambaLM

    if opts.checkpoint:
        from src.mamba.load import load_mamba

        model, tokenizer = load_mamba(opts.checkpoint)
        return model.to(opts.device).eval(), tokenizer
    args, tokenizer = seed_model_args(opts.config), None
    if need_tokenizer:
        from src.mamba.tokenizer import MambaTokenizer

        files = sorted(REPO.glob("src/**/*.py")) + sorted(REPO.glob("*.md"))
        tokenizer = MambaTokenizer.train([f.read_text(errors="replace") for f in files], vocab_size=args.vocab_size)
        args = replace(args, vocab_size=tokenizer.vocab_size)
    torch.manual_seed(0)
    model = MambaLM(args)
    with torch.no_grad():  # per-head decays unlike the init values, as after training
        for block in model.backbone.layers:
            for param in (block.mixer.A_log, block.mixer.D, block.mixer.dt_bias):
                param.add_(torch.randn_like(param) * 0.3)
    return model.to(opts.device).eval(), tokenizer


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _best(run, repeats: int, device: str) -> tuple[float, float, object]:
    """(best wall seconds, CPU seconds of that run, its result) over ``repeats`` runs after a warm-up."""
    run()
    best = None
    for _ in range(repeats):
        _sync(device)
        w0, c0 = time.perf_counter(), time.process_time()
        result = run()
        _sync(device)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if best is None or wall < best[0]:
            best = (wall, cpu, result)
    return best


def _row(engine: str, batch: int, opts, prefill, decode, tokens) -> dict:
    (p_wall, p_cpu), (d_wall, d_cpu) = prefill, decode
    prompt, new = batch * opts.prompt_tokens, batch * opts.new_tokens
    return {
        "engine": engine, "batch": batch,
        "prefill_tokens_per_s": prompt / p_wall, "prefill_cpu_tokens_per_s": prompt / max(p_cpu, 1e-9),
        "decode_tokens_per_s": new / d_wall, "decode_cpu_tokens_per_s": new / max(d_cpu, 1e-9),
        "decode_ms_per_step": 1000 * d_wall / opts.new_tokens,
        "tokens": tokens,
    }


@torch.inference_mode()
def bench_mark(model, decoder, prompts: torch.Tensor, opts, engine: str, greedy: bool = False) -> dict:
    """Prefill with the chunked scan, then ``new_tokens`` greedy steps of ``decoder`` (one
    ``step`` + argmax per token, as the API's worker decodes; with ``greedy``,
    ``decoder.greedy``)."""
    from src.mamba.model import MambaCache

    def prefill():
        out = model(prompts, return_cache=True)
        return out.cache, out.logits[:, -1]

    p_wall, p_cpu, (cache, first) = _best(prefill, opts.repeats, opts.device)

    def decode():
        state = MambaCache.concat([cache])  # a fresh copy: the steps update it in place
        token = first.argmax(-1)
        if greedy:  # Decoder.greedy: the argmax inside the kernel or the compiled graph
            return torch.cat([token[:, None], decoder.greedy(token, state, opts.new_tokens - 1)], 1)
        out = [token]
        for _ in range(opts.new_tokens - 1):
            token = decoder.step(token, state).argmax(-1)
            out.append(token)
        return torch.stack(out, 1)

    d_wall, d_cpu, tokens = _best(decode, opts.repeats, opts.device)
    # The first token comes from the prefill's logits: the loop ran new_tokens - 1 steps.
    d_wall, d_cpu = d_wall * opts.new_tokens / (opts.new_tokens - 1), d_cpu * opts.new_tokens / (opts.new_tokens - 1)
    return _row(engine, prompts.shape[0], opts, (p_wall, p_cpu), (d_wall, d_cpu), tokens.tolist())


def build_transformers(model, tokenizer, opts):
    """``Mamba2ForCausalLM`` with MARK's weights: from ``src.mamba.export.export_hf`` when it
    exists, else by loading the state dict into a model of ``to_hf_config``."""
    from transformers import Mamba2ForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the "fast path is not available" notice
    try:
        from src.mamba.export import export_hf
    except ImportError:
        export_hf = None
    if export_hf is not None and tokenizer is not None:
        folder = export_hf(model, tokenizer, Path(tempfile.mkdtemp(prefix="mark-decode-hf-")))
        return Mamba2ForCausalLM.from_pretrained(folder).to(opts.device).eval(), "src.mamba.export.export_hf"
    from src.mamba.model import to_hf_config

    hf = Mamba2ForCausalLM(to_hf_config(model.args))
    hf.load_state_dict(model.state_dict(), strict=True)
    return hf.to(opts.device).eval(), "state dict loaded into Mamba2ForCausalLM(to_hf_config(args))"


@torch.inference_mode()
def bench_transformers(hf, prompts: torch.Tensor, opts) -> dict:
    """Prefill: one forward with ``use_cache=True``; decode: ``generate`` minus that prefill."""
    n = opts.new_tokens

    def prefill():
        return hf(prompts, use_cache=True).logits[:, -1]

    p_wall, p_cpu, _ = _best(prefill, opts.repeats, opts.device)

    def full():
        return hf.generate(
            prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=n, min_new_tokens=n,
            do_sample=False, pad_token_id=0, eos_token_id=None,
        )

    g_wall, g_cpu, out = _best(full, max(1, opts.repeats - 1), opts.device)
    decode = (max(g_wall - p_wall, 1e-9), max(g_cpu - p_cpu, 1e-9))
    return _row("transformers", prompts.shape[0], opts, (p_wall, p_cpu), decode, out[:, prompts.shape[1]:].tolist())


def llama_cpp_available() -> tuple[bool, str]:
    """Whether the llama.cpp column can run, and why not."""
    import importlib

    try:
        importlib.import_module("src.mamba.export").export_gguf
    except (ImportError, AttributeError) as err:
        return False, f"src.mamba.export.export_gguf is not importable ({err})"
    try:
        importlib.import_module("llama_cpp")
    except ImportError as err:
        return False, f"llama_cpp is not installed ({err}; `pip install llama-cpp-python` builds it, ~5.5 min)"
    return True, ""


def bench_llama_cpp(model, tokenizer, prompt: list[int], opts) -> dict:
    """Batch 1 on the f32 GGUF export: prefill = ``eval(prompt)``, decode = ``eval([token])``
    + argmax of the last logits, per token."""
    import numpy as np
    from llama_cpp import Llama

    from src.mamba.export import export_gguf

    path = export_gguf(model, tokenizer, Path(tempfile.mkdtemp(prefix="mark-decode-gguf-")) / "model.gguf", dtype="f32")
    llm = Llama(
        model_path=str(path), n_ctx=opts.prompt_tokens + opts.new_tokens + 8, n_batch=max(512, opts.prompt_tokens),
        n_threads=opts.threads, n_threads_batch=opts.threads, verbose=False,
    )

    n_vocab = llm.n_vocab()

    def next_token() -> int:
        # Without logits_all (which would make the prefill compute the logits of every
        # prompt position), llama-cpp-python leaves ``scores`` empty: read the last logits.
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    def prefill():
        llm.reset()
        llm.eval(prompt)
        return next_token()

    p_wall, p_cpu, first = _best(prefill, opts.repeats, "cpu")

    def decode():
        llm.reset()
        llm.eval(prompt)
        token, out = next_token(), []
        out.append(token)
        w0, c0 = time.perf_counter(), time.process_time()
        for _ in range(opts.new_tokens - 1):
            llm.eval([token])
            token = next_token()
            out.append(token)
        return out, time.perf_counter() - w0, time.process_time() - c0

    runs = [decode() for _ in range(opts.repeats + 1)][1:]
    out, d_wall, d_cpu = min(runs, key=lambda r: r[1])
    scale = opts.new_tokens / (opts.new_tokens - 1)
    return _row("llama.cpp", 1, opts, (p_wall, p_cpu), (d_wall * scale, d_cpu * scale), [out])


def print_table(rows: list[dict]) -> None:
    head = f"{'engine':<20} {'batch':>5} {'prefill tok/s':>13} {'(cpu)':>9} {'decode tok/s':>12} {'(cpu)':>9} {'ms/step':>8}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['engine']:<20} {r['batch']:>5} {r['prefill_tokens_per_s']:>13.0f} {r['prefill_cpu_tokens_per_s']:>9.0f} "
            f"{r['decode_tokens_per_s']:>12.0f} {r['decode_cpu_tokens_per_s']:>9.0f} {r['decode_ms_per_step']:>8.2f}"
        )


def summarize(rows: list[dict], batches: list[int]) -> dict:
    by = {(r["engine"], r["batch"]): r for r in rows}
    summary: dict = {}
    for batch in batches:
        for mark in ("mark", "mark_native", "mark_native_greedy", "mark_compiled", "mark_greedy"):
            ours = by.get((mark, batch))
            if ours is None:
                continue
            for other in ("transformers", "llama.cpp"):
                # llama.cpp runs one stream: batch 16 is compared with its batch-1 rate.
                ref = by.get((other, batch)) or (by.get((other, 1)) if other == "llama.cpp" else None)
                if ref is None:
                    continue
                for kind in ("decode", "prefill"):
                    key = f"{mark}_{kind}_vs_{other}"
                    summary.setdefault(key, {})[str(batch)] = round(
                        ours[f"{kind}_tokens_per_s"] / ref[f"{kind}_tokens_per_s"], 3
                    )
                    summary.setdefault(key + "_cpu_time", {})[str(batch)] = round(
                        ours[f"{kind}_cpu_tokens_per_s"] / ref[f"{kind}_cpu_tokens_per_s"], 3
                    )
    # Greedy tokens of every engine against MARK eager at the same batch.
    agree = {}
    for (engine, batch), r in by.items():
        ref = by.get(("mark", batch))
        if engine != "mark" and ref is not None:
            pairs = [(a, b) for x, y in zip(r["tokens"], ref["tokens"]) for a, b in zip(x, y)]
            agree[f"{engine}@{batch}"] = round(sum(a == b for a, b in pairs) / max(1, len(pairs)), 4)
    summary["greedy_token_agreement_with_mark"] = agree
    return summary


def main(argv=None) -> dict:
    opts = parse_args(argv)
    torch.set_num_threads(opts.threads)
    started = time.time()
    load_before = os.getloadavg()
    run_llama, why = llama_cpp_available() if "llama.cpp" in opts.engines else (False, "not in --engines")
    model, tokenizer = build_mark(opts, need_tokenizer=run_llama)
    from src.mamba.generate import Decoder

    gen = torch.Generator().manual_seed(0)
    # Ordinary tokens only (ids 0-3 are the special tokens), so no engine stops early.
    all_prompts = torch.randint(4, model.args.vocab_size, (max(opts.batches), opts.prompt_tokens), generator=gen)
    all_prompts = all_prompts.to(opts.device)
    rows, skipped, notes = [], {}, {}

    decoders = {}
    if "mark" in opts.engines:
        decoders["mark"] = Decoder(model)
    if {"mark_native", "mark_native_greedy"} & set(opts.engines):
        from src.mamba import native

        # Built afresh in a temporary cache, so that the build time below is a cold one.
        os.environ["MARK_CACHE_DIR"] = tempfile.mkdtemp(prefix="mark-decode-native-")
        ok, why_not = native.available()
        reason = native.supports(model) if ok else why_not
        if reason is None:
            notes["native_build_seconds"] = round(native.build_seconds, 2)
            print(f"  native kernel library built in {native.build_seconds:.1f} s (once per machine)", file=sys.stderr)
            decoders["mark_native"] = Decoder(model, "native")
        else:
            for engine in ("mark_native", "mark_native_greedy"):
                skipped[engine] = reason
    if "mark_compiled" in opts.engines and not opts.no_compile:
        decoder = Decoder(model, "compile")
        decoder.warmup(tuple(sorted({1 if b == 1 else 2 for b in opts.batches})))
        notes["compile_seconds"] = round(decoder.compile_seconds, 1)
        print(f"  torch.compile of the decoding step: {decoder.compile_seconds:.1f} s (once per process)", file=sys.stderr)
        decoders["mark_compiled"] = decoder
        if "mark_greedy" in opts.engines:
            seconds = decoder.warmup(tuple(sorted({1 if b == 1 else 2 for b in opts.batches})), greedy=True)
            notes["compile_seconds_greedy_block"] = round(seconds, 1)
            print(f"  torch.compile of the {decoder.block}-step greedy loop: {seconds:.1f} s", file=sys.stderr)
    elif "mark_compiled" in opts.engines:
        skipped["mark_compiled"] = "--no-compile"

    hf = None
    if "transformers" in opts.engines:
        hf, notes["transformers_weights"] = build_transformers(model, tokenizer, opts)
    if not run_llama:
        skipped["llama.cpp"] = why
        print(f"  llama.cpp column skipped: {why}", file=sys.stderr)

    for batch in opts.batches:
        prompts = all_prompts[:batch]
        runs = [(engine, decoder) for engine, decoder in decoders.items() if engine in opts.engines]
        if "mark_native" in decoders and "mark_native_greedy" in opts.engines:
            runs.append(("mark_native_greedy", decoders["mark_native"]))
        if "mark_compiled" in decoders and "mark_greedy" in opts.engines:
            runs.append(("mark_greedy", decoders["mark_compiled"]))
        for engine, decoder in runs:
            rows.append(bench_mark(model, decoder, prompts, opts, engine, greedy=engine.endswith("greedy")))
            print(f"  {engine} batch {batch}: {rows[-1]['decode_tokens_per_s']:.0f} decode tok/s", file=sys.stderr, flush=True)
        if hf is not None:
            rows.append(bench_transformers(hf, prompts, opts))
            print(f"  transformers batch {batch}: {rows[-1]['decode_tokens_per_s']:.0f} decode tok/s", file=sys.stderr, flush=True)
        if run_llama and batch == 1:
            rows.append(bench_llama_cpp(model, tokenizer, prompts[0].tolist(), opts))

    report = {
        "machine": machine_info(opts),
        "settings": {
            "batches": opts.batches, "prompt_tokens": opts.prompt_tokens, "new_tokens": opts.new_tokens,
            "repeats": opts.repeats, "threads": opts.threads, "config": opts.config,
            "weights": opts.checkpoint or "seeded random (torch.manual_seed(0)), seed config architecture",
            "parameters": model.num_parameters(), "precision": "float32",
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "wall_seconds": round(time.time() - started, 1),
        },
        "notes": notes,
        "skipped": skipped,
        "summary": summarize(rows, opts.batches),
        "results": [{k: v for k, v in r.items() if k != "tokens"} for r in rows],
    }
    print_table(rows)
    for engine, why in skipped.items():
        print(f"{engine}: skipped ({why})")
    if "native_build_seconds" in notes:
        print(f"native kernel library: built in {notes['native_build_seconds']} s (once per machine, then cached)")
    if "compile_seconds" in notes:
        print(f"torch.compile of MARK's step: {notes['compile_seconds']} s, paid once per process")
    print(json.dumps(report["summary"], indent=2))
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {output}")
    return report


if __name__ == "__main__":
    main()
