"""Memory and speed of full fine-tuning vs LoRA on MARK's Mamba-2: measured here, and computed for
the public Mamba-2 sizes.

Measured (each run in its own process, so its peak resident memory is its own): the spec model
(``configs/mamba_train.yaml``: d_model 256, 4 layers, vocabulary 5000) and a model shaped like
state-spaces/mamba2-130m (d_model 768, 24 layers, vocabulary 50288, head_dim 64, state 128; random
weights), a few AdamW steps (the engine's optimizer) of ``--batch`` x ``--length`` tokens, full
fine-tuning vs LoRA (r 8 on in_proj, the default targets). Peak RSS (``ru_maxrss``) minus the RSS
before the model was built, and tokens/s after a warm-up step.

Computed (the README's table) for 130M / 370M / 780M / 1.3B / 2.7B: parameters from the real model
built on the meta device; weights, gradients and AdamW states in float32 (MARK keeps float32 weights;
``mixed_precision: bf16`` is autocast, it halves activations, not weights); activations from the
bytes autograd saves for backward in ONE block, measured here at that block's real width (a saved-
tensor hook over a forward pass), times layers and tokens; gradient checkpointing keeps only each
block's input plus one block's activations while it is recomputed.

    python bench/finetune_memory.py [--batch 2] [--length 128] [--steps 4] [--threads 1] [--skip-130m]

Writes ``bench/results/finetune_memory.json`` and prints both tables.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from src.mamba.model import MambaArgs, MambaLM  # noqa: E402
from src.training.adapters import AdapterConfig, apply_adapter, count_parameters  # noqa: E402

SPEC = dict(vocab_size=5000, d_model=256, n_layers=4, n_heads=8, state_size=64)
# The public state-spaces/mamba2-* configurations (head_dim 64, state 128, 1 group, vocabulary 50277
# padded to 50288); heads = 2 * d_model / 64.
PUBLIC = {
    "130M": dict(d_model=768, n_layers=24),
    "370M": dict(d_model=1024, n_layers=48),
    "780M": dict(d_model=1536, n_layers=48),
    "1.3B": dict(d_model=2048, n_layers=48),
    "2.7B": dict(d_model=2560, n_layers=64),
}
LORA = AdapterConfig(r=8, alpha=16, target_modules=["in_proj"])
COMPUTED_LENGTH, COMPUTED_BATCH = 2048, 4
GB = 1024**3


def public_args(d_model: int, n_layers: int, chunk_size: int = 256) -> MambaArgs:
    return MambaArgs(vocab_size=50288, d_model=d_model, n_layers=n_layers, n_heads=2 * d_model // 64, state_size=128,
                     n_groups=1, chunk_size=chunk_size, tie_embeddings=True)


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(name: str, mode: str, batch: int, length: int, steps: int, threads: int) -> dict:
    """One run in this process: peak memory and tokens/s of ``steps`` AdamW steps."""
    from src.training.engine import build_optimizer

    importlib.import_module("peft.tuners.lora")  # in both modes, before the baseline is taken

    torch.manual_seed(0)
    torch.set_num_threads(threads)
    args = MambaArgs(**SPEC, chunk_size=64) if name == "spec" else public_args(768, 24, chunk_size=64)
    before = rss_bytes()
    model = MambaLM(args).train()
    if mode == "lora":
        apply_adapter(model, LORA)
    trainable, total = count_parameters(model)
    optimizer = build_optimizer(model, 1e-4, 0.0)
    ids = torch.randint(3, args.vocab_size, (batch, length + 1), generator=torch.Generator().manual_seed(0))
    timings = []
    for _ in range(steps):
        started = time.perf_counter()
        loss = model(ids[:, :-1], labels=ids[:, 1:]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        timings.append(time.perf_counter() - started)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    steady = timings[1:] or timings
    return {
        "model": name, "mode": mode, "parameters": total, "trainable": trainable, "batch": batch, "length": length,
        "steps": steps, "peak_rss_bytes": peak, "rss_before_model_bytes": before, "peak_over_baseline_bytes": peak - before,
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                                     if torch.is_tensor(t) and t.ndim > 0),
        "tokens_per_s": batch * length / (sum(steady) / len(steady)),
    }


def block_activation_bytes(args: MambaArgs, length: int, dtype: torch.dtype | None) -> float:
    """Bytes autograd saves for backward per token in one block of ``args`` (measured on a real
    forward pass of one block, batch 1, ``length`` tokens; ``dtype``: bf16 autocast or None)."""
    from src.mamba.model import MambaBlock

    block = MambaBlock(args)
    block.mixer.reset_ssm_parameters()
    hidden = torch.randn(1, length, args.d_model, requires_grad=True)
    saved: dict[int, int] = {}
    weights = {p.untyped_storage().data_ptr() for p in block.parameters()}  # weights are not activations
    shapes = {tuple(p.shape) for p in block.parameters()}  # nor autocast's bf16 copies of them

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() in weights or tuple(tensor.shape) in shapes:
            return tensor
        saved[storage.data_ptr()] = max(saved.get(storage.data_ptr(), 0), storage.nbytes())
        return tensor

    context = torch.autocast("cpu", dtype=dtype) if dtype is not None else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), context:
        block(hidden)
    saved.pop(hidden.untyped_storage().data_ptr(), None)  # the block's input is counted by the caller
    return sum(saved.values()) / length


def computed_table(length: int, batch: int) -> list[dict]:
    rows = []
    for size, shape in PUBLIC.items():
        args = public_args(**shape)
        with torch.device("meta"):
            model = MambaLM(args)
        params = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
        in_proj = model.backbone.layers[0].mixer.in_proj
        lora = args.n_layers * LORA.r * (in_proj.in_features + in_proj.out_features)
        tokens = length * batch
        per_token = {mode: block_activation_bytes(args, 256, dtype) for mode, dtype in (("fp32", None), ("bf16", torch.bfloat16))}
        residual = 4 * args.d_model  # each block's float32 input, kept by gradient checkpointing
        row = {"size": size, "d_model": args.d_model, "n_layers": args.n_layers, "parameters": params, "lora_parameters": lora,
               "weights_bytes": 4 * params, "full_grad_bytes": 4 * params, "full_adamw_bytes": 8 * params,
               "lora_grad_bytes": 4 * lora, "lora_adamw_bytes": 8 * lora, "length": length, "batch": batch}
        for mode, value in per_token.items():
            row[f"activations_{mode}_bytes"] = value * args.n_layers * tokens
            row[f"activations_{mode}_checkpointed_bytes"] = residual * args.n_layers * tokens + value * tokens
        rows.append(row)
        del model
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each measured run")
    parser.add_argument("--skip-130m", action="store_true", help="measure only the spec model")
    parser.add_argument("--run", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)  # one measurement (child process)
    args = parser.parse_args(argv)
    if args.run:
        print(json.dumps(measure(args.run[0], args.run[1], args.batch, args.length, args.steps, args.threads)))
        return {}

    measured = []
    for name in ("spec",) + (() if args.skip_130m else ("130m",)):
        for mode in ("full", "lora"):
            proc = subprocess.run(
                [sys.executable, __file__, "--run", name, mode, "--batch", str(args.batch), "--length", str(args.length),
                 "--steps", str(args.steps), "--threads", str(args.threads)], capture_output=True, text=True, check=True,
            )
            measured.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            row = measured[-1]
            print(f"measured {name:>4} {mode:>4}: trainable {row['trainable']:>11,} of {row['parameters']:>11,} | "
                  f"peak RSS over baseline {row['peak_over_baseline_bytes'] / GB:6.2f} GiB | optimizer "
                  f"{row['optimizer_state_bytes'] / 2**20:8.1f} MiB | {row['tokens_per_s']:8.0f} tokens/s", flush=True)
    computed = computed_table(COMPUTED_LENGTH, COMPUTED_BATCH)

    print(f"\nmeasured: batch {args.batch} x {args.length} tokens, {args.steps} AdamW steps, {args.threads} torch thread(s)")
    print("| model | mode | trainable / total | peak RSS over baseline | AdamW state | tokens/s | vs full |")
    print("|---|---|---|---|---|---|---|")
    for row in measured:
        full = next(r for r in measured if r["model"] == row["model"] and r["mode"] == "full")
        print(f"| {row['model']} | {row['mode']} | {row['trainable']:,} / {row['parameters']:,} | "
              f"{row['peak_over_baseline_bytes'] / GB:.2f} GiB | {row['optimizer_state_bytes'] / 2**20:.1f} MiB | "
              f"{row['tokens_per_s']:.0f} | {row['peak_over_baseline_bytes'] / full['peak_over_baseline_bytes']:.2f}x memory, "
              f"{row['tokens_per_s'] / full['tokens_per_s']:.2f}x speed |")
    print(f"\ncomputed: float32 weights, AdamW; activations at {COMPUTED_LENGTH} tokens x batch {COMPUTED_BATCH} "
          "(GiB; ckpt = gradient checkpointing; bf16 = autocast activations)")
    print("| size | params | weights | full: grads + AdamW | LoRA r8 in_proj: params, grads + AdamW | activations fp32 / bf16 "
          "| with ckpt fp32 / bf16 | full total fp32 | LoRA total fp32 | LoRA total bf16 + ckpt |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in computed:
        g = lambda key: r[key] / GB  # noqa: E731
        full = g("weights_bytes") + g("full_grad_bytes") + g("full_adamw_bytes") + g("activations_fp32_bytes")
        lora = g("weights_bytes") + g("lora_grad_bytes") + g("lora_adamw_bytes") + g("activations_fp32_bytes")
        lora_small = g("weights_bytes") + g("lora_grad_bytes") + g("lora_adamw_bytes") + g("activations_bf16_checkpointed_bytes")
        print(f"| {r['size']} | {r['parameters'] / 1e6:.0f}M | {g('weights_bytes'):.2f} | "
              f"{g('full_grad_bytes') + g('full_adamw_bytes'):.2f} | {r['lora_parameters'] / 1e6:.2f}M, "
              f"{g('lora_grad_bytes') + g('lora_adamw_bytes'):.3f} | {g('activations_fp32_bytes'):.1f} / "
              f"{g('activations_bf16_bytes'):.1f} | {g('activations_fp32_checkpointed_bytes'):.2f} / "
              f"{g('activations_bf16_checkpointed_bytes'):.2f} | {full:.1f} | {lora:.1f} | {lora_small:.1f} |")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                    "note": "shared 2-core box; tokens/s are a ratio against full fine-tuning measured in the same run"},
        "measured": measured,
        "computed": computed,
    }
    out = REPO_ROOT / "bench" / "results" / "finetune_memory.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")
    return result


if __name__ == "__main__":
    main()
