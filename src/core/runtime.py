"""Devices, seeding, mixed precision and RNG state: set up once, the same for every component."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform
import random
from typing import Any

import numpy as np
import torch

from src.core.errors import ConfigError
from src.core.logging import get_logger


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; ``cuda`` without a GPU is a ``ConfigError``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("system.device: 'cuda' was asked for but no CUDA device is available (use cpu or auto)")
    return torch.device(device)


def resolve_mixed_precision(flag: bool | str, device: torch.device) -> str:
    """Map ``training.mixed_precision`` to Accelerate's ``no`` / ``bf16`` / ``fp16``.

    ``true`` means bf16 on a GPU that supports it and fp16 (with a grad scaler) on older
    GPUs. On CPU ``true`` is a logged no-op: CPU autocast rarely speeds training up.
    ``auto`` is ``true`` on a GPU and, on a CPU, bf16 where it computes bf16 natively
    (:func:`cpu_has_native_bf16`: MiniLM fine-tuning 1.6x, its reward model 2.4x faster at
    the same val metrics), else fp32. An explicit ``"bf16"`` is honoured on CPU too.
    """
    log = get_logger("runtime")
    if flag in (False, "no"):
        return "no"
    if flag == "auto" and device.type == "cpu":
        if cpu_has_native_bf16():
            return "bf16"
        log.info("mixed_precision auto: this CPU has no native bf16: training in fp32")
        return "no"
    if device.type == "cuda":
        if flag == "fp16":
            return "fp16"
        if torch.cuda.is_bf16_supported():
            return "bf16"
        if flag == "bf16":
            raise ConfigError("training.mixed_precision: this GPU does not support bf16 (use fp16 or true)")
        return "fp16"
    if flag == "bf16":
        return "bf16"
    log.info("mixed_precision is on but has no benefit on CPU: training in fp32")
    return "no"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16, read from
    ``/proc/cpuinfo``): where bf16 autocast is a speed-up (MiniLM inference 2.5x, its fine-tuning
    1.6x on a 2-core AMD EPYC with AVX512-BF16) rather than an emulation. False off Linux."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def machine_summary() -> str:
    """One line for a benchmark's JSON: CPU model, cores, native bf16, the 1-minute load average now."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), model)
    except OSError:
        pass
    load = f", load {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    gpu = f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    return f"{model}, {os.cpu_count()} cores, native bf16: {'yes' if cpu_has_native_bf16() else 'no'}{gpu}{load}"


def resolve_inference_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> ``bf16`` on a bf16-capable GPU or a CPU with native bf16, else ``fp32``."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if device.type == "cpu" and cpu_has_native_bf16() else "fp32"


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_allocator_tuned: bool | None = None


def tune_cpu_allocator(mmap_threshold: int = 32 << 20) -> bool:
    """Let glibc's malloc keep and reuse the memory of large CPU tensors (Linux only).

    By default glibc maps every block above a threshold (128 kB, raised only as such blocks
    are freed) with its own ``mmap`` and returns the top of the heap to the system as soon
    as a few hundred kB are free, so each training step's large temporaries (activations,
    logits chunks, gradients: tens of MB each) come back as fresh pages that the kernel
    zero-fills on first touch. Blocks up to ``mmap_threshold`` (32 MB, glibc's maximum) are
    served from the heap and the heap is never trimmed: +5.6% and +7.7% training tokens/s
    for the spec's Mamba at L = 2048 in two in-process A/B pairs on this box (``bench/mamba_throughput.py`` applies it to
    every model it times). The cost: a process keeps its peak heap until it exits.
    Idempotent; ``MARK_MALLOC_TUNING=0`` turns it off. Returns whether it is in effect.
    """
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get("MARK_MALLOC_TUNING", "1") == "0" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1 and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    except (OSError, AttributeError):
        return False
    if ok:
        get_logger("runtime").info("glibc malloc: blocks up to %d MB from the heap, no trimming", mmap_threshold >> 20)
    _allocator_tuned = ok
    return ok


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices), and ask cuDNN for deterministic kernels.

    ``PYTHONHASHSEED`` is deliberately not set: it is read once, when the interpreter starts,
    so setting it here would change nothing. MARK's results do not depend on it (no metric
    depends on the iteration order of a set or dict of strings); the two-run determinism test
    (tests/pipelines/test_determinism.py) runs the pipeline under two different hash seeds.

    Same seed, same machine and same thread count give the same numbers on CPU. Across
    thread counts (``torch_threads``, ``OMP_NUM_THREADS``, the number of cores) float sums
    are ordered differently, so results differ in the last bits and sampled outputs
    (RLHF generations) can diverge from there.
    """
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)  # every device's generator
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def capture_rng_state() -> dict[str, Any]:
    """All RNG states as plain lists and numbers: loadable with ``weights_only=True`` and
    sendable between processes."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "python": [py_state[0], list(py_state[1]), py_state[2]],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
