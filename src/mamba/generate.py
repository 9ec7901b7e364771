"""Text generation and scoring with a trained :class:`MambaLM`.

Generation reads the prompt once with the chunked scan (prefill), then produces each new
token with :meth:`MambaLM.step_` from the fixed-size recurrent state: the cost of a new token
does not depend on the prompt length (nothing like a growing key/value cache). The state is
updated in place, and a :class:`Decoder` can compile that step once with ``torch.compile``.

For RLHF-style training: :func:`token_logprobs` (differentiable log-probabilities of a
sequence's tokens) and ``model(ids, compute_logits=False).hidden_states`` (the backbone's
final hidden states, ``model.args.d_model`` wide) for value or reward heads.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Sequence

import torch

from src.mamba.model import MambaCache, MambaLM
from src.mamba.tokenizer import MambaTokenizer

log = logging.getLogger(__name__)


BACKENDS = ("eager", "compile", "native", "auto")


class Decoder:
    """The one-token decoding step of a model, on one of three backends.

    ``Decoder(model, backend).step(tokens, cache)`` is :meth:`MambaLM.step_`: logits (batch,
    vocab) for one token per row, ``cache`` updated in place; :meth:`greedy` feeds the argmax
    back in for many steps. ``backend``:

    * ``"eager"`` (the class's default; ``generate_ids`` without a decoder uses ``auto``,
      :func:`default_decoder`): ``MambaLM.step_`` itself. It always reads the model's current
      weights, as RLHF needs while the policy trains.
    * ``"native"``: MARK's fused C kernel for the CPU (:mod:`src.mamba.native`, float32
      models): all layers, the LM head and the greedy argmax of a block of tokens in one call,
      one OpenMP region, no Python per token. Compiled once per machine (a second or two,
      cached); the fastest on the CPU (see the README's Speed section).
    * ``"compile"``: the step through ``torch.compile``, which works on any device and dtype.
      The compilation happens on the first call of each kind (batch of 1, batch of several:
      the first is specialised to one row, the second has a dynamic batch size, so any number
      of rows uses the same code), or up front in :meth:`warmup`, whose time is
      ``compile_seconds``. It multiplies by transposed copies of the weight matrices
      (:meth:`MambaLM.transposed_weights`, 2x faster matrix-vector products on the CPU).
    * ``"auto"``: ``native`` where the model and machine allow it, else ``eager``; the
      reason is logged.

    ``native`` and ``compile`` copy the weights when the Decoder is built: build a new one
    after the weights change. A server calls :meth:`warmup` at start-up so that no request
    pays a compilation.
    """

    def __init__(self, model: MambaLM, backend: str = "eager") -> None:
        if backend not in BACKENDS:
            raise ValueError(f"decoder backend must be one of {', '.join(BACKENDS)} (got {backend!r})")
        self.model = model
        self.compile_seconds = 0.0
        if backend == "auto":
            backend = _auto_backend(model)
        self.backend = backend
        self._native = None
        self._greedy_block = None
        if backend == "native":
            from src.mamba.native import NativeStep

            started = time.perf_counter()
            self._native = NativeStep(model)  # builds the kernel library on first use
            self.compile_seconds = time.perf_counter() - started
            self._step = self._native.step
        elif backend == "compile":
            transposed = model.transposed_weights()

            def step(token_ids: torch.Tensor, cache: MambaCache) -> torch.Tensor:
                return model.step_(token_ids, cache, transposed)

            def greedy_block(token_ids: torch.Tensor, cache: MambaCache) -> torch.Tensor:
                out = []
                for _ in range(self.block):
                    token_ids = model.step_(token_ids, cache, transposed).argmax(-1)
                    out.append(token_ids)
                return torch.stack(out, 1)

            # dynamic=None: the first graph (batch 1) is static, a second batch size
            # recompiles once with a symbolic batch. On the CPU the greedy loop's many small
            # kernels are called from generated C++ (inductor's cpp_wrapper), not Python:
            # 1.5-2x the tokens/s at batch 1 for a longer compilation.
            cpu = next(model.parameters()).device.type == "cpu"
            self._step = torch.compile(step, dynamic=None)
            self._greedy_block = torch.compile(greedy_block, dynamic=None, options={"cpp_wrapper": True} if cpu else None)
        else:
            self._step = model.step_

    @property
    def compiled(self) -> bool:
        """True for the ``compile`` backend (its first calls compile: see :meth:`warmup`)."""
        return self.backend == "compile"

    @property
    def fused_greedy(self) -> bool:
        """True when :meth:`greedy` runs blocks of steps with the argmax inside (``native``,
        ``compile``): what ``generate_ids`` uses for greedy decoding."""
        return self.backend in ("native", "compile")

    block = 8  # greedy tokens per call of the compiled greedy loop

    @torch.inference_mode()
    def greedy(self, token_ids: torch.Tensor, cache: MambaCache, steps: int) -> torch.Tensor:
        """Feed ``token_ids`` (batch,) and the argmax of each step's logits back in, ``steps``
        times: the greedy tokens (batch, steps), ``cache`` updated in place. The same tokens as
        ``step`` + ``argmax`` one at a time. ``native``: all the steps in one call of the
        kernel; ``compile``: ``block`` steps (argmax included) run as one graph, so the
        per-call costs (guards, wrapper) are paid once per block."""
        if self._native is not None:
            return self._native.greedy(token_ids.contiguous(), cache, steps)
        out = []
        if self._greedy_block is not None:
            for _ in range(steps // self.block):
                out.append(self._greedy_block(token_ids, cache))
                token_ids = out[-1][:, -1]
            steps -= steps // self.block * self.block
        for _ in range(steps):
            token_ids = self._step(token_ids, cache).argmax(-1)
            out.append(token_ids[:, None])
        return torch.cat(out, 1) if out else token_ids.new_zeros(token_ids.shape[0], 0)

    def step(self, token_ids: torch.Tensor, cache: MambaCache) -> torch.Tensor:
        """Logits (batch, vocab) after feeding ``token_ids`` (batch,); ``cache`` updated in place.

        Runs in inference mode, as ``generate_ids`` and the API's worker do: the compiled step
        is specialised on it, and a caller in plain ``no_grad`` would compile it again."""
        if torch.is_inference_mode_enabled():  # the decoding loops: no per-token re-entry
            return self._step(token_ids, cache)
        with torch.inference_mode():
            return self._step(token_ids, cache)

    @torch.inference_mode()
    def warmup(self, batch_sizes: Sequence[int] = (1, 2), greedy: bool = False) -> float:
        """Run the step once per batch size on a throw-away state (compiling it when
        ``compile`` is on; with ``greedy`` also the greedy loop of :meth:`greedy`); returns
        the seconds it took, added to ``compile_seconds``."""
        device = next(self.model.parameters()).device
        started = time.perf_counter()
        for batch in batch_sizes:
            cache = self.model.empty_cache(batch, device)
            self.step(torch.zeros(batch, dtype=torch.long, device=device), cache)
            if greedy and self._greedy_block is not None:
                self._greedy_block(torch.zeros(batch, dtype=torch.long, device=device), cache)
        seconds = time.perf_counter() - started
        self.compile_seconds += seconds
        return seconds


def _auto_backend(model: MambaLM) -> str:
    """``native`` when the model and this machine can run the kernel, else ``eager``."""
    from src.mamba import native

    reason = native.supports(model)
    if reason is None:
        ok, reason = native.available()
        if ok:
            return "native"
    if reason not in _logged_reasons:  # a default decoder rebuilt after each PPO update says it once
        _logged_reasons.add(reason)
        log.info("decoding with the eager step: %s", reason)
    return "eager"


_logged_reasons: set[str] = set()


_default_decoders: "weakref.WeakKeyDictionary[MambaLM, tuple[tuple, Decoder]]" = weakref.WeakKeyDictionary()
_default_lock = threading.Lock()


def weights_fingerprint(model: MambaLM) -> tuple:
    """What identifies the current weights of ``model``: per parameter its storage, device,
    dtype, autograd version counter (bumped by every in-place change: optimizer steps,
    ``load_state_dict``, ``p.mul_()``) and a float64 sum, which catches the writes the counter
    misses (``p.data.copy_(...)``). Summing is one pass over the weights: far cheaper than a
    generation, and the native kernel's packed copies are rebuilt only when this changes."""
    with torch.no_grad():
        parts = [(p.data_ptr(), str(p.device), p.dtype, _version(p)) for p in model.parameters()]
        sums = torch.stack([p.detach().sum(dtype=torch.float64) for p in model.parameters()]).tolist()
    return tuple(parts), tuple(sums)


def _version(param: torch.Tensor) -> int:
    try:
        return param._version
    except RuntimeError:  # an inference tensor (made under torch.inference_mode) has no version counter
        return -1


def default_decoder(model: MambaLM) -> Decoder:
    """The decoder ``generate`` / ``generate_ids`` use when none is given: ``Decoder(model,
    "auto")`` (the native kernel where it runs, else eager), built once per model and rebuilt
    when :func:`weights_fingerprint` says the weights changed since (the native kernel decodes
    from packed copies of the weights)."""
    fingerprint = weights_fingerprint(model)
    with _default_lock:
        cached = _default_decoders.get(model)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        decoder = Decoder(model, "auto")
        _default_decoders[model] = (fingerprint, decoder)
        return decoder


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of ``logits`` (batch, vocab): greedy when ``temperature <= 0``, else
    nucleus sampling (the smallest set of tokens whose probability reaches ``top_p``)."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a token if the mass before it is below top_p (the most likely token always stays).
        keep = (sorted_probs.cumsum(-1) - sorted_probs) < top_p
        sorted_probs = sorted_probs * keep
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_ids(
    model: MambaLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_id: int | None = None,
    decoder: Decoder | None = None,
) -> list[list[int]]:
    """Continue each token-id prompt; returns the new ids per prompt (ending at ``eos_id``
    when it is sampled). Prompts may have different lengths: each distinct one is prefilled on
    its own, then all are decoded together, one token per step. The same ``seed`` gives the same output.
    ``decoder``: a :class:`Decoder` of ``model``; default :func:`default_decoder` (the native
    kernel where it runs, rebuilt when the weights change). Pass ``Decoder(model, "eager")``
    to decode from the live weights without any copy. With a ``native`` or ``compile`` one and
    ``temperature <= 0``, the tokens come from its greedy loop (:meth:`Decoder.greedy`,
    ``Decoder.block`` tokens per call; the same tokens). Sampling draws the same random numbers
    on every backend (:func:`sample_next` on each step's logits, one ``generator``): the same
    seed gives the same samples.
    """
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = next(model.parameters()).device
    if decoder is None:
        decoder = default_decoder(model)
    was_training = model.training
    model.eval()
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    # Each distinct prompt is read once (RLHF samples several answers per prompt), then its
    # state is copied to every row that continues it.
    rows: dict[tuple[int, ...], int] = {}
    index = [rows.setdefault(tuple(prompt), len(rows)) for prompt in prompts]
    caches, logits = [], []
    for prompt in rows:
        out = model(torch.tensor([list(prompt)], dtype=torch.long, device=device), return_cache=True)
        caches.append(out.cache)
        logits.append(out.logits[:, -1])
    cache = MambaCache.concat([caches[i] for i in index])  # a fresh copy: the steps below update it in place
    next_logits = torch.cat([logits[i] for i in index])
    if decoder.fused_greedy and temperature <= 0:
        outputs = _greedy_outputs(decoder, next_logits.argmax(-1), cache, max_new_tokens, eos_id)
        model.train(was_training)
        return outputs
    decode_step = decoder.step
    outputs: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    for step in range(max_new_tokens):
        tokens = sample_next(next_logits, temperature, top_p, generator)
        for row, token in enumerate(tokens.tolist()):
            if not finished[row]:
                outputs[row].append(token)
                finished[row] = token == eos_id
        if all(finished) or step == max_new_tokens - 1:
            break
        next_logits = decode_step(tokens, cache)
    model.train(was_training)
    return outputs


def _greedy_outputs(decoder: Decoder, first: torch.Tensor, cache: MambaCache, max_new_tokens: int, eos_id: int | None) -> list[list[int]]:
    """Greedy continuations from the first tokens ``first`` (batch,), decoded a block at a
    time until every row has produced ``eos_id`` or ``max_new_tokens`` tokens are out."""
    tokens = [first[:, None]]
    made = 1
    while made < max_new_tokens and not _all_ended(tokens, eos_id):
        steps = min(decoder.block, max_new_tokens - made)
        tokens.append(decoder.greedy(tokens[-1][:, -1], cache, steps))
        made += steps
    outputs = []
    for row in torch.cat(tokens, 1).tolist():
        row = row[:max_new_tokens]
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        outputs.append(row)
    return outputs


def _all_ended(tokens: list[torch.Tensor], eos_id: int | None) -> bool:
    return eos_id is not None and bool((torch.cat(tokens, 1) == eos_id).any(1).all())


def generate(
    model: MambaLM,
    tokenizer: MambaTokenizer,
    prompt: str,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 0.95,
    seed: int | None = None,
    decoder: Decoder | None = None,
) -> str:
    """The model's continuation of ``prompt`` as text (the prompt itself not included).

    The prompt is read as the start of a document (``<|bos|>`` first); generation stops
    after ``max_new_tokens`` or at ``<|eos|>``. ``temperature=0`` is greedy decoding.
    ``decoder``: as for :func:`generate_ids` (default: the fast one, rebuilt when the weights change).
    """
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    new = generate_ids(model, [ids], max_new_tokens, temperature, top_p, seed, eos_id=tokenizer.eos_id, decoder=decoder)[0]
    return tokenizer.decode(new)


def token_logprobs(model: MambaLM, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(token_t | tokens before t) for t = 1..T-1 of ``input_ids`` (batch, T):
    a (batch, T-1) tensor, differentiable (for policy-gradient losses). Right padding only
    affects the padded positions."""
    logits = model(input_ids).logits[:, :-1]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)


__all__ = ["BACKENDS", "Decoder", "default_decoder", "weights_fingerprint", "generate", "generate_ids", "sample_next", "token_logprobs"]
