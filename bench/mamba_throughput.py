"""Training throughput and peak memory of MARK's Mamba vs. transformers' Mamba-2 and a GPT-2.

    python bench/mamba_throughput.py [--lengths 512 2048 8192] [--batch-tokens 8192] [--steps 2]
        [--models mark hf_mamba2 hf_mamba2_chunk256 gpt2 mark_compiled] [--threads N] [--device cpu]
        [--precision fp32|bf16] [--allocator tuned|default] [--config configs/mamba_train.yaml]
        [--output bench/results/mamba_throughput.json]

Every model has the width, depth and vocabulary of the seed config's ``model`` section
(d_model 256, 4 layers, 8 heads, 5000 tokens):

* ``mark``: MARK's :class:`MambaLM` (own chunked SSD scan, chunk ``model.chunk_size``), loss
  through ``labels=`` (the training path);
* ``hf_mamba2``: ``transformers.Mamba2ForCausalLM`` of the *same* ``Mamba2Config`` (same
  chunk size) on its pure-PyTorch path (``mamba_ssm`` is not installed); MARK's weights load
  into it unchanged;
* ``hf_mamba2_chunk256``: the same with transformers' default ``chunk_size`` of 256;
* ``gpt2``: ``GPT2LMHeadModel`` with ``n_embd`` = d_model, ``n_layer`` = n_layers, ``n_head`` = n_heads,
  SDPA attention (its MLP makes it about twice the parameters);
* ``mark_compiled`` (not in the default list): MARK with ``model.compile: true`` (each block
  through ``torch.compile``; the first, compiling, step is the untimed warm-up).

Model FLOPs utilisation (MFU) of the Mamba models: model FLOPs per token (:func:`model_flops_per_token`,
from the config: 6 x the matmul parameters, LM head included, plus 3 x the SSD scan's forward
matmuls) x tokens/s, divided by the dense matmul peak measured in the same run on the same
device and threads (:func:`matmul_peak`: fp32 on CPU, bf16 on a GPU or with ``--precision bf16``).

Every worker first applies :func:`src.core.runtime.tune_cpu_allocator` on CPU (what MARK's
training engine does; ``--allocator default`` leaves glibc's malloc as it is), whichever model
it times. A training step is forward + cross-entropy + backward + AdamW step in float32 on random
token ids (throughput only; nothing is learned). Each (model, length) point runs in its own
subprocess: one warm-up step, then ``--steps`` timed steps; tokens/s = batch tokens / median
step wall time. The CPU-time column divides by the process's CPU time instead, which is
what the speed would be on an otherwise idle machine when other processes share the cores.
Peak memory is the subprocess's peak RSS (CPU) or ``torch.cuda.max_memory_allocated`` (GPU),
next to its RSS just before the first step. The batch is ``max(1, batch_tokens // L)``
sequences. A second table times the SSD scan alone (one layer's scan, forward + backward),
the part MARK implements itself (best of ``--steps`` runs); everything else in a step (projections, LM head) is the
same dense math in both Mamba implementations. Prints the tables, writes the JSON and a
PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODELS = ("mark", "hf_mamba2", "hf_mamba2_chunk256", "gpt2", "mark_compiled")
DEFAULT_MODELS = MODELS[:4]
LABELS = {
    "mark": "MARK Mamba-2",
    "mark_compiled": "MARK Mamba-2, model.compile",
    "hf_mamba2": "transformers Mamba2 (same chunk)",
    "hf_mamba2_chunk256": "transformers Mamba2 (chunk 256)",
    "gpt2": "GPT-2 (same width/depth)",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batch-tokens", type=int, default=8192, help="tokens per step: batch = max(1, this // L)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per point (after one warm-up step)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=MODELS)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                        help="autocast dtype of the training step (default: fp32 on CPU, bf16 on cuda)")
    parser.add_argument("--config", default="configs/mamba_train.yaml", help="seed config whose model section is used")
    parser.add_argument(
        "--allocator", default="tuned", choices=["tuned", "default"],
        help="tuned: src.core.runtime.tune_cpu_allocator in every worker (what MARK's training does on CPU); default: glibc's",
    )
    parser.add_argument("--output", default="bench/results/mamba_throughput.json")
    parser.add_argument("--worker", nargs=3, metavar=("MODEL", "LENGTH", "BATCH"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def seed_model_args(config_path: str):
    """``MambaArgs`` of the config's model section (vocab_size taken as the tokenizer size)."""
    import yaml

    from src.mamba.config import MambaModelConfig
    from src.mamba.model import MambaArgs

    raw = yaml.safe_load(Path(config_path).read_text()) or {}
    m = MambaModelConfig.model_validate(raw.get("model", {}))
    return MambaArgs(
        vocab_size=m.vocab_size, d_model=m.d_model, n_layers=m.n_layers, n_heads=m.n_heads, state_size=m.state_size,
        expand=m.expand, n_groups=m.n_groups, conv_kernel=m.conv_kernel, chunk_size=m.chunk_size,
        tie_embeddings=m.tie_embeddings,
    )


def model_flops_per_token(args) -> float:
    """Training FLOPs per token of a Mamba-2 of ``args`` (forward + backward = 3 x forward).

    Matmuls with weights: 2 FLOPs per parameter and token forward (in_proj, out_proj, LM head;
    the depthwise conv, norms and elementwise work are left out, as MFU conventions do).
    The SSD scan's matmuls per token and layer (chunk Q, heads h x head_dim p, groups g,
    state n): scores C B^T 2Qgn, inside-chunk mixing 2Qhp, chunk states 2hpn, carried-in
    state output 2hpn.
    """
    d_inner = args.expand * args.d_model
    conv_dim = d_inner + 2 * args.n_groups * args.state_size
    in_proj = args.d_model * (d_inner + conv_dim + args.n_heads)
    out_proj = d_inner * args.d_model
    lm_head = args.vocab_size * args.d_model
    matmul_params = args.n_layers * (in_proj + out_proj) + lm_head
    q, hp, gn = args.chunk_size, d_inner, args.n_groups * args.state_size
    scan_forward = args.n_layers * (2 * q * gn + 2 * q * hp + 4 * hp * args.state_size)
    return 6.0 * matmul_params + 3.0 * scan_forward


def matmul_peak(device: str, dtype_name: str, threads: int, size: int = 2048, repeats: int = 5) -> tuple[float, float]:
    """Best dense matmul rate (FLOP/s) of ``size`` x ``size`` matrices on ``device`` in
    ``dtype_name`` with ``threads`` torch threads: the denominator of MFU, measured in the
    same run as the throughput it divides. Returns (wall-clock rate, CPU-time rate); the
    second (FLOPs / process CPU seconds x threads) is the one to set against ``cpu tok/s``
    when other processes share the cores."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if device == "cuda":
        size = max(size, 8192)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    best, best_cpu = float("inf"), float("inf")
    for i in range(repeats + 1):  # the first run warms up
        if device == "cuda":
            torch.cuda.synchronize()
        start, cpu = time.perf_counter(), time.process_time()
        torch.mm(a, b, out=out)
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - start)
            best_cpu = min(best_cpu, (time.process_time() - cpu) / torch.get_num_threads())
    flops = 2.0 * size**3
    return flops / best, (flops / best_cpu if device == "cpu" and best_cpu > 0 else flops / best)


def build_model(name: str, args, length: int):
    """(model, step_loss(ids) -> loss) for one of MODELS."""
    from dataclasses import replace

    from src.mamba.model import MambaLM, to_hf_config

    if name in ("mark", "mark_compiled"):
        model = MambaLM(args, compile=name == "mark_compiled")
        return model, lambda ids: model(ids[:, :-1], labels=ids[:, 1:]).loss
    if name.startswith("hf_mamba2"):
        from transformers import Mamba2ForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the "falling back to the PyTorch path" notice
        hf_args = replace(args, chunk_size=256) if name == "hf_mamba2_chunk256" else args
        model = Mamba2ForCausalLM(to_hf_config(hf_args))
        return model, lambda ids: model(ids[:, :-1], labels=ids[:, :-1], use_cache=False).loss
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        config = GPT2Config(
            vocab_size=args.vocab_size, n_positions=length, n_embd=args.d_model, n_layer=args.n_layers,
            n_head=args.n_heads, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, attn_implementation="sdpa",
        )
        model = GPT2LMHeadModel(config)
        return model, lambda ids: model(ids[:, :-1], labels=ids[:, :-1]).loss
    raise ValueError(name)


def run_worker(opts) -> dict:
    """Time one (model, length) point in this process; returns its measurements."""
    import torch

    name, length, batch = opts.worker[0], int(opts.worker[1]), int(opts.worker[2])
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.device == "cpu" and opts.allocator == "tuned":  # for every model alike
        from src.core.runtime import tune_cpu_allocator

        tune_cpu_allocator()
    device = torch.device(opts.device)
    torch.manual_seed(0)
    args = seed_model_args(opts.config)
    model, step_loss = build_model(name, args, length)
    model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, args.vocab_size, (batch, length + 1), device=device)

    precision = opts.precision or ("bf16" if device.type == "cuda" else "fp32")

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = step_loss(ids)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    w0 = time.perf_counter()
    step()  # warm-up (compiles, for mark_compiled)
    warmup_seconds = time.perf_counter() - w0
    wall, cpu = [], []
    for _ in range(opts.steps):
        w0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    tokens = batch * length
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    return {
        "model": name,
        "length": length,
        "batch": batch,
        "tokens_per_step": tokens,
        "parameters": sum(p.numel() for p in model.parameters()),
        "step_seconds": [round(t, 4) for t in wall],
        "tokens_per_s": tokens / statistics.median(wall),
        "cpu_tokens_per_s": tokens / statistics.median(cpu) * (torch.get_num_threads() if device.type == "cpu" else 1),
        "peak_memory_mib": round(peak, 1),
        "memory_before_mib": round(rss_before, 1) if device.type == "cpu" else 0.0,
        "memory_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
        "threads": torch.get_num_threads(),
        "precision": precision,
        "warmup_seconds": round(warmup_seconds, 1),
    }


def measure_scans(opts, lengths: list[int]) -> list[dict]:
    """The SSD scan alone (forward + backward of one layer's scan, seed-config shapes):
    MARK's ``ssd_chunked`` vs transformers' ``mamba2_chunk_scan`` (its PyTorch path)."""
    import torch
    import torch.nn.functional as F
    from transformers.models.mamba2.modeling_mamba2 import mamba2_chunk_scan
    from transformers.utils import logging as hf_logging

    from src.mamba.ssd import ssd_chunked

    hf_logging.set_verbosity_error()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    args = seed_model_args(opts.config)
    heads, head_dim, state, groups = args.n_heads, args.head_dim, args.state_size, args.n_groups
    rows = []
    for length in lengths:
        batch = max(1, opts.batch_tokens // length)
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, length, heads, head_dim, generator=gen, device=opts.device)
        dt_raw = torch.randn(batch, length, heads, generator=gen, device=opts.device)
        B = torch.randn(batch, length, groups, state, generator=gen, device=opts.device) * state**-0.5
        C = torch.randn(batch, length, groups, state, generator=gen, device=opts.device) * state**-0.5
        A = -torch.arange(1, heads + 1, dtype=torch.float32, device=opts.device)
        D = torch.ones(heads, device=opts.device)
        dt_bias = torch.full((heads,), -3.0, device=opts.device)
        inputs = [x, dt_raw, B, C]
        for t in inputs:
            t.requires_grad_(True)
        variants = {
            "mark": lambda: ssd_chunked(x, F.softplus(dt_raw + dt_bias), A, B, C, args.chunk_size, D),
            "hf_mamba2": lambda: mamba2_chunk_scan(x, dt_raw, A, B, C, args.chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True),
            "hf_mamba2_chunk256": lambda: mamba2_chunk_scan(x, dt_raw, A, B, C, 256, D=D, dt_bias=dt_bias, dt_softplus=True),
        }
        reference = variants["hf_mamba2"]().detach()
        for name, scan in variants.items():
            out = scan()
            grad = torch.ones_like(out)
            out.backward(grad)  # warm-up
            wall = []
            for _ in range(max(2, opts.steps)):
                start = time.perf_counter()
                out = scan()
                out.backward(grad)
                if opts.device == "cuda":
                    torch.cuda.synchronize()
                wall.append(time.perf_counter() - start)
            rows.append({
                "model": name, "length": length, "batch": batch,
                "tokens_per_s": batch * length / min(wall),
                "max_abs_diff_vs_hf": float((out.detach() - reference).abs().max()),
            })
            for t in inputs:
                t.grad = None
    return rows


def measure(opts, name: str, length: int) -> dict:
    batch = max(1, opts.batch_tokens // length)
    cmd = [sys.executable, __file__, "--worker", name, str(length), str(batch), "--steps", str(opts.steps),
           "--threads", str(opts.threads), "--device", opts.device, "--config", opts.config, "--allocator", opts.allocator]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"model": name, "length": length, "batch": batch, "error": tail[:300]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine_info(opts) -> dict:
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": opts.device,
    }
    if opts.device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def summarize(results: list[dict], lengths: list[int]) -> dict:
    by = {(r["model"], r["length"]): r for r in results if "error" not in r}
    summary: dict = {"speedup_vs_hf_mamba2": {}, "speedup_vs_hf_mamba2_chunk256": {}, "speedup_vs_gpt2": {}}
    for length in lengths:
        mark = by.get(("mark", length))
        for other in ("hf_mamba2", "hf_mamba2_chunk256", "gpt2"):
            ref = by.get((other, length))
            if mark and ref:
                summary[f"speedup_vs_{other}"][str(length)] = round(mark["tokens_per_s"] / ref["tokens_per_s"], 3)
    first, last = by.get(("mark", lengths[0])), by.get(("mark", lengths[-1]))
    if first and last:
        summary["mark_tokens_per_s_ratio_longest_to_shortest"] = round(last["tokens_per_s"] / first["tokens_per_s"], 3)
        summary["mark_cpu_tokens_per_s_ratio_longest_to_shortest"] = round(
            last["cpu_tokens_per_s"] / first["cpu_tokens_per_s"], 3
        )
    return summary


def print_scan_table(rows: list[dict]) -> None:
    print(f"{'SSD scan only (fwd+bwd)':<34} {'L':>5} {'batch':>5} {'tokens/s':>9} {'max |diff| vs HF':>17}")
    for r in rows:
        print(f"{LABELS[r['model']]:<34} {r['length']:>5} {r['batch']:>5} {r['tokens_per_s']:>9.0f} {r['max_abs_diff_vs_hf']:>17.2e}")


def print_table(results: list[dict], peak: float, cpu_peak: float, precision: str) -> None:
    print(f"MFU against the {precision} matmul peak measured in this run: {peak / 1e9:.1f} GFLOP/s "
          f"(cpu MFU: against {cpu_peak / 1e9:.1f} GFLOP/s per CPU-time)")
    head = (f"{'model':<34} {'L':>5} {'batch':>5} {'tokens/s':>9} {'cpu tok/s':>9} {'MFU':>6} {'cpu MFU':>7} "
            f"{'peak MiB':>9} {'before MiB':>10}")
    print(head)
    print("-" * len(head))
    for r in results:
        label = LABELS.get(r["model"], r["model"])
        if "error" in r:
            print(f"{label:<34} {r['length']:>5} {r['batch']:>5}  error: {r['error']}")
            continue
        mfu = f"{100 * r['mfu']:>5.1f}% {100 * r['cpu_mfu']:>6.1f}%" if "mfu" in r else f"{'-':>6} {'-':>7}"
        print(
            f"{label:<34} {r['length']:>5} {r['batch']:>5} {r['tokens_per_s']:>9.0f} {r['cpu_tokens_per_s']:>9.0f} "
            f"{mfu} {r['peak_memory_mib']:>9.0f} {r['memory_before_mib']:>10.0f}"
        )


def plot(results: list[dict], scans: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (
        (axes[0], results, "tokens_per_s", "training step (fwd + bwd + AdamW)", "tokens / s"),
        (axes[1], scans, "tokens_per_s", "SSD scan only (fwd + bwd, one layer)", "tokens / s"),
        (axes[2], results, "peak_memory_mib", "peak memory of a training step", "MiB"),
    )
    for ax, rows, key, title, ylabel in panels:
        for name in MODELS:
            mine = sorted((r for r in rows if r["model"] == name and "error" not in r), key=lambda r: r["length"])
            if mine:
                ax.plot([r["length"] for r in mine], [r[key] for r in mine], marker="o", label=LABELS[name])
        lengths = sorted({r["length"] for r in rows})
        ax.set_xscale("log", base=2)
        ax.set_xticks(lengths, [str(x) for x in lengths])
        ax.set_ylim(bottom=0)
        ax.set_xlabel("sequence length L")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    opts = parse_args(argv)
    if opts.worker:
        print(json.dumps(run_worker(opts)))
        return {}
    started = time.time()
    load_before = os.getloadavg()
    precision = opts.precision or ("bf16" if opts.device == "cuda" else "fp32")
    peak, cpu_peak = matmul_peak(opts.device, precision, opts.threads)
    flops_per_token = model_flops_per_token(seed_model_args(opts.config))
    print(f"  {precision} matmul peak: {peak / 1e9:.1f} GFLOP/s (CPU time: {cpu_peak / 1e9:.1f}); model FLOPs/token {flops_per_token / 1e6:.2f} M",
          file=sys.stderr, flush=True)
    results = []
    for length in opts.lengths:
        for name in opts.models:
            result = measure(opts, name, length)
            if "error" not in result and name.startswith(("mark", "hf_mamba2")):
                result["mfu"] = round(result["tokens_per_s"] * flops_per_token / peak, 4)
                result["cpu_mfu"] = round(result["cpu_tokens_per_s"] * flops_per_token / cpu_peak, 4)
            results.append(result)
            shown = f"{result['tokens_per_s']:.0f} tok/s" if "error" not in result else f"error: {result['error']}"
            print(f"  {name} L={length}: {shown}", file=sys.stderr, flush=True)
    scans = measure_scans(opts, opts.lengths)
    report = {
        "machine": machine_info(opts),
        "settings": {
            "lengths": opts.lengths, "batch_tokens": opts.batch_tokens, "steps": opts.steps,
            "threads": opts.threads or "default", "config": opts.config, "precision": precision,
            "allocator": opts.allocator,
            "matmul_peak_gflops": round(peak / 1e9, 2), "matmul_peak_cpu_time_gflops": round(cpu_peak / 1e9, 2),
            "model_flops_per_token": flops_per_token,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
            "wall_seconds": round(time.time() - started, 1),
        },
        "results": results,
        "scan_only": scans,
        "summary": summarize(results, opts.lengths),
    }
    by_scan = {(r["model"], r["length"]): r["tokens_per_s"] for r in scans}
    report["summary"]["mfu"] = {
        name: {str(r["length"]): r["mfu"] for r in results if r["model"] == name and "mfu" in r}
        for name in opts.models if name.startswith(("mark", "hf_mamba2"))
    }
    report["summary"]["scan_speedup_vs_hf_mamba2"] = {
        str(L): round(by_scan[("mark", L)] / by_scan[("hf_mamba2", L)], 3) for L in opts.lengths
    }
    report["summary"]["scan_speedup_vs_hf_mamba2_chunk256"] = {
        str(L): round(by_scan[("mark", L)] / by_scan[("hf_mamba2_chunk256", L)], 3) for L in opts.lengths
    }
    print_table(results, peak, cpu_peak, precision)
    print()
    print_scan_table(scans)
    print(json.dumps(report["summary"], indent=2))
    output = Path(opts.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2) + "\n")
    plot(results, scans, output.with_suffix(".png"))
    print(f"wrote {output} and {output.with_suffix('.png')}")
    return report


if __name__ == "__main__":
    main()
