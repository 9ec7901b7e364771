"""MARK's fused C decoding step for the CPU (``kernels/decode_cpu.c``), through ctypes.

The step of :meth:`MambaLM.step_` as one C function: every layer, the LM head and the greedy
argmax of a whole block of tokens in one OpenMP parallel region, with no Python, no
allocation and no thread start-up per token (see the C file). :class:`NativeStep` holds a
model's float32 weights in the layout the kernel reads; :class:`src.mamba.generate.Decoder`
uses it for ``backend="native"``.

The library is compiled on first use with the C compiler the machine has (``$CC`` or ``cc``,
``-O3 -march=native -fopenmp``: a second or two) and cached under ``$MARK_CACHE_DIR`` (default
``~/.cache/mark``), keyed by the source, the compiler, the flags and the CPU. :func:`available` says
whether it can be built here, and why not.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from src.mamba.model import MambaCache, MambaLM

SOURCE = Path(__file__).with_name("kernels") / "decode_cpu.c"
FLAGS = ["-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-lm"]
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_error: str | None = None
build_seconds = 0.0  # what building the library took in this process (0: loaded from the cache)


def cache_dir() -> Path:
    return Path(os.environ.get("MARK_CACHE_DIR") or Path.home() / ".cache" / "mark")


def _cpu_identity() -> str:
    """The CPU model and feature flags: ``-march=native`` code is only reused on the same kind
    of CPU (a shared cache directory may be read from other machines)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        import platform

        return platform.machine() + platform.processor()
    wanted = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted}))


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def library() -> ctypes.CDLL:
    """The compiled kernel library (built and cached on the first call); ``RuntimeError``
    with the compiler's message when it cannot be built."""
    global _library, _error, build_seconds
    with _lock:
        if _library is not None:
            return _library
        if _error is not None:
            raise RuntimeError(_error)
        compiler = _compiler()
        if compiler is None:
            _error = "no C compiler found (set $CC) to build MARK's native decoding kernel"
            raise RuntimeError(_error)
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
        identity = SOURCE.read_bytes() + version.encode() + " ".join(FLAGS).encode() + _cpu_identity().encode()
        key = hashlib.sha256(identity).hexdigest()[:16]
        target = cache_dir() / f"mark_decode_cpu_{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            # Build next to the target, then rename: a concurrent or killed build never
            # leaves a half-written library under the final name.
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                built = Path(tmp) / target.name
                started = time.perf_counter()
                result = subprocess.run([compiler, str(SOURCE), "-o", str(built), *FLAGS], capture_output=True, text=True)
                if result.returncode != 0:
                    _error = f"building {SOURCE.name} failed: {result.stderr.strip()[-2000:]}"
                    raise RuntimeError(_error)
                os.replace(built, target)
                build_seconds = time.perf_counter() - started
        lib = ctypes.CDLL(str(target))
        lib.mark_tile.restype = ctypes.c_int
        lib.mark_decode.restype = ctypes.c_int
        lib.mark_decode.argtypes = [
            ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
            ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
        ]
        _library = lib
        return lib


def available() -> tuple[bool, str]:
    """(True, "") when the kernel library can be built and loaded here, else (False, why)."""
    try:
        library()
    except (RuntimeError, OSError) as error:
        return False, str(error)
    return True, ""


def supports(model: MambaLM) -> str | None:
    """None when ``model`` can run on the native kernel, else the reason it cannot."""
    weight = model.lm_head.weight
    if weight.device.type != "cpu":
        return f"the native kernel runs on the CPU, the model is on {weight.device}"
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return "the native kernel runs float32 models"
    if model.has_adapter():
        return "the model has an unmerged LoRA adapter (the kernel reads the base matrices)"
    return None


def pack(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """``weight`` (out, in) in the kernel's tiled layout: (ceil(out / tile), in, tile), tile
    ``t`` holding rows ``t * tile ...`` transposed, zero past the last row."""
    rows, cols = weight.shape
    tiles = -(-rows // tile)
    padded = weight.new_zeros(tiles * tile, cols)
    padded[:rows] = weight
    return padded.view(tiles, tile, cols).transpose(1, 2).contiguous()


def _pointers(tensors: list[torch.Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


class NativeStep:
    """A model's decoding step on the native kernel. It holds packed copies of the weight
    matrices (:func:`pack`) and reads the embeddings, norms and SSM parameters in place:
    build a new one after the weights change. ``threads``: the OpenMP threads of each call (default: torch's)."""

    def __init__(self, model: MambaLM, threads: int | None = None) -> None:
        reason = supports(model)
        if reason is not None:
            raise ValueError(reason)
        self.lib = library()
        self.model = model
        self.threads = threads
        args = model.args
        self.vocab_size = args.vocab_size
        self.n_layers = args.n_layers
        self.eps = float(args.norm_eps)
        self.dims = torch.tensor(
            [args.d_model, args.n_layers, args.n_heads, args.head_dim, args.state_size, args.n_groups, args.conv_kernel, args.vocab_size],
            dtype=torch.int64,
        )
        backbone = model.backbone
        tile = self.lib.mark_tile()
        with torch.no_grad():
            keep = [backbone.embeddings.weight.detach().contiguous(), pack(model.lm_head.weight.detach(), tile), backbone.norm_f.weight.detach().contiguous()]
            for block in backbone.layers:
                mixer = block.mixer
                keep += [
                    block.norm.weight.detach().contiguous(),
                    pack(mixer.in_proj.weight.detach(), tile),
                    mixer.conv1d.weight.detach().reshape(mixer.conv_dim, -1).contiguous(),
                    mixer.conv1d.bias.detach().contiguous(),
                    mixer.dt_bias.detach().contiguous(),
                    (-torch.exp(mixer.A_log.detach())).contiguous(),
                    mixer.D.detach().contiguous(),
                    mixer.norm.weight.detach().contiguous(),
                    pack(mixer.out_proj.weight.detach(), tile),
                ]
        self._weights = keep  # owns the memory the pointers point to
        self._weight_ptrs = _pointers(keep)

    def _run(self, token_ids: torch.Tensor, cache: MambaCache, steps: int, tokens_out: torch.Tensor | None, logits: torch.Tensor | None) -> None:
        if token_ids.dtype != torch.int64 or token_ids.dim() != 1:
            raise ValueError("token_ids must be a 1-d int64 tensor")
        token_ids = token_ids.contiguous()
        if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        batch = token_ids.shape[0]
        for state in (*cache.conv, *cache.ssm):
            if state.dtype != torch.float32 or not state.is_contiguous() or state.shape[0] != batch or state.device.type != "cpu":
                raise ValueError("the cache must hold contiguous float32 CPU states of the batch's rows")
        threads = self.threads or torch.get_num_threads()
        status = self.lib.mark_decode(
            self.dims.data_ptr(), self.eps, self._weight_ptrs, _pointers(cache.conv), _pointers(cache.ssm),
            batch, token_ids.data_ptr(), steps,
            tokens_out.data_ptr() if tokens_out is not None else None,
            logits.data_ptr() if logits is not None else None, threads,
        )
        if status != 0:
            raise MemoryError("the native decoding kernel could not allocate its scratch memory")

    def step(self, token_ids: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """Logits (batch, vocab) after feeding ``token_ids`` (batch,); ``cache`` updated in place."""
        logits = torch.empty(token_ids.shape[0], self.vocab_size)
        self._run(token_ids, cache, 1, None, logits)
        return logits

    def greedy(self, token_ids: torch.Tensor, cache: MambaCache, steps: int) -> torch.Tensor:
        """``steps`` greedy tokens (batch, steps) after feeding ``token_ids``; ``cache`` updated."""
        out = torch.empty(token_ids.shape[0], steps, dtype=torch.int64)
        if steps > 0:
            self._run(token_ids, cache, steps, out, None)
        return out


__all__ = ["NativeStep", "available", "cache_dir", "library", "supports"]
