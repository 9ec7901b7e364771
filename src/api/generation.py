"""Continuous-batching text generation with MARK's Mamba language models.

One :class:`GenerationWorker` per loaded language model owns the model on one thread.
Requests wait in a bounded queue; between two decoding steps the worker admits every
waiting request (reads its prompt once, the prefill) and adds its recurrent state as a
new row of the batch. Each step then feeds one token per active row through
:meth:`MambaLM.step`: the state of a Mamba row has a fixed size, so a new row is just
one more slice of the batch, and a finished row is dropped with ``cache.select``.
Concurrent requests therefore share the model's matrix products instead of queueing
behind each other, and the server's event loop never runs the model.

Each request gets its text as it is produced (``TextStream``: incremental decoding of
byte-level BPE, stop strings) through a callback, so asyncio handlers (the API server)
and plain threads (the LangChain integration) consume the same engine.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch

from src.core.logging import get_logger
from src.mamba.generate import Decoder
from src.mamba.model import MambaCache, MambaLM
from src.mamba.tokenizer import MambaTokenizer

log = get_logger("api")

# A decoded text ending in this character is cut inside a multi-byte UTF-8 character.
REPLACEMENT_CHAR = "\ufffd"


class ServerBusyError(Exception):
    """The generation queue is full: the caller should retry later (HTTP 503)."""


@dataclass(frozen=True)
class GenerationParams:
    """How to continue one prompt. ``temperature <= 0`` is greedy decoding; ``stop`` strings
    end the text (they are not included); the same ``seed`` gives the same text."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass
class GenerationResult:
    """A finished generation. ``finish_reason``: ``stop`` (end of text or a stop string),
    ``length`` (``max_new_tokens`` reached) or ``cancelled``."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float = 0.0


class TextStream:
    """Turns generated token ids into text pieces that never need to be taken back.

    Holds back a trailing incomplete UTF-8 character and any ending that could still grow
    into a stop string; once a stop string appears, the text is cut before it.
    """

    def __init__(self, tokenizer: MambaTokenizer, stop: Sequence[str] = (), incremental: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        # Without pieces to hand out and without stop strings, decoding once at the end is enough.
        self.incremental = incremental
        self.ids: list[int] = []
        self.text = ""
        self.sent = 0  # characters of ``text`` already handed out
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; returns the new text that is safe to hand out (may be empty)."""
        self.ids.append(token_id)
        if not self.incremental and not self.stop:
            return ""
        self.text = self.tokenizer.decode(self.ids)
        for stop in self.stop:
            at = self.text.find(stop)
            if at >= 0:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            return self.flush()
        if not self.incremental:
            return ""
        end = len(self.text.rstrip(REPLACEMENT_CHAR))
        hold = 0
        for stop in self.stop:  # keep back an ending that may be the start of a stop string
            for size in range(min(len(stop) - 1, end), 0, -1):
                if self.text[end - size : end] == stop[:size]:
                    hold = max(hold, size)
                    break
        return self._take(end - hold)

    def flush(self) -> str:
        """All text not handed out yet (at the end of generation)."""
        if not self.stopped:
            self.text = self.tokenizer.decode(self.ids)
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent : end], end
        return piece


def sample_batch(logits: torch.Tensor, jobs: Sequence["GenerationJob"]) -> list[int]:
    """One next token per row of ``logits`` (batch, vocab), each row with its own job's
    temperature, top-p and random generator.

    The rule is :func:`src.mamba.generate.sample_next`'s (greedy at temperature 0;
    else nucleus sampling: keep a token while the mass before it is below ``top_p``), done
    for all rows at once: per row only one uniform number is drawn (from the job's seeded
    generator, if any) and inverted through the row's cumulative distribution.
    """
    tokens = logits.argmax(-1)
    rows = [i for i, job in enumerate(jobs) if job.params.temperature > 0]
    if rows:
        index = torch.tensor(rows, device=logits.device)
        temperature = torch.tensor([jobs[i].params.temperature for i in rows], device=logits.device)[:, None]
        top_p = torch.tensor([jobs[i].params.top_p for i in rows], device=logits.device)[:, None]
        probs = torch.softmax(logits[index].float() / temperature, dim=-1)
        if bool((top_p < 1.0).any()):
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            sorted_probs = sorted_probs * ((sorted_probs.cumsum(-1) - sorted_probs) < top_p)
        else:  # no nucleus to cut: the vocabulary order serves as well, no sort
            sorted_probs, order = probs, None
        cdf = sorted_probs.cumsum(-1)
        uniform = torch.stack([torch.rand((), generator=jobs[i].generator, device=logits.device) for i in rows])
        pick = torch.searchsorted(cdf, (uniform * cdf[:, -1])[:, None], right=True).clamp_(max=cdf.shape[-1] - 1)
        tokens[index] = (order.gather(-1, pick) if order is not None else pick)[:, 0]
    return tokens.tolist()


# Events a job reports: ("text", str), ("done", GenerationResult) or ("error", Exception).
EventCallback = Callable[[str, object], None]


@dataclass
class GenerationJob:
    """One request inside the worker; ``cancel()`` drops it at the next step."""

    prompt_ids: list[int]
    params: GenerationParams
    stream: TextStream
    on_event: EventCallback
    generator: torch.Generator | None = None
    pieces: bool = True  # report ("text", piece) events; False: only the result
    started: float = field(default_factory=time.perf_counter)
    cancelled: bool = False
    done: bool = False

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, kind: str, payload: object) -> None:
        try:
            self.on_event(kind, payload)
        except Exception:  # a consumer that went away must not stop the worker
            log.debug("generation event dropped", exc_info=True)

    def accept(self, token_id: int, eos_id: int) -> None:
        """Record one sampled token; emits text and, when the job ends, its result."""
        if token_id == eos_id:
            return self.finish("stop")
        piece = self.stream.push(token_id)
        if piece and self.pieces:
            self._emit("text", piece)
        if self.stream.stopped:
            self.finish("stop")
        elif len(self.stream.ids) >= self.params.max_new_tokens:
            self.finish("length")

    def finish(self, reason: str) -> None:
        if self.done:
            return
        self.done = True
        piece = self.stream.flush()
        if piece and self.pieces and reason != "cancelled":
            self._emit("text", piece)
        result = GenerationResult(
            text=self.stream.text,
            finish_reason=reason,
            prompt_tokens=len(self.prompt_ids),
            completion_tokens=len(self.stream.ids),
            seconds=time.perf_counter() - self.started,
        )
        self._emit("done", result)

    def fail(self, error: Exception) -> None:
        if not self.done:
            self.done = True
            self._emit("error", error)


class GenerationWorker:
    """Serves one language model from one thread, batching all concurrent requests.

    ``submit`` queues a job (``ServerBusyError`` when ``max_pending`` are already waiting);
    ``generate`` / ``stream`` block the calling thread, ``agenerate`` / ``astream`` await.
    At most ``max_batch_size`` requests decode together; more wait their turn.
    """

    def __init__(
        self,
        model: MambaLM,
        tokenizer: MambaTokenizer,
        name: str = "mamba",
        max_batch_size: int = 32,
        max_pending: int = 256,
        compile_step: bool = False,
    ) -> None:
        self.model = model.eval()
        # The decoding step updates the batch's state in place; compiled, it is compiled
        # once on this worker's thread before the first request is served.
        self.decoder = Decoder(self.model, compile=compile_step)
        self.tokenizer = tokenizer
        self.name = name
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        self._pending: queue.Queue[GenerationJob | None] = queue.Queue(maxsize=max_pending)
        self._closed = False
        # Counters for /models and the load bench: decoding steps and rows per step.
        self.steps = 0
        self.rows_decoded = 0
        self.max_rows = 0
        self.active = 0  # requests decoding right now
        self.cancelled = 0  # requests dropped because their client left
        self._thread = threading.Thread(target=self._run, name=f"generate-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def encode_prompt(self, prompt: str) -> list[int]:
        """The token ids a prompt is read as: the start of a document (``<|bos|>`` first)."""
        return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)

    def submit(self, prompt_ids: list[int], params: GenerationParams, on_event: EventCallback, pieces: bool = True) -> GenerationJob:
        """Queue a job; ``on_event`` is called from the worker thread with its events
        (``pieces=False``: no ``("text", piece)`` events, only the result)."""
        if self._closed:
            raise ServerBusyError(f"the {self.name} generator is shut down")
        if not prompt_ids:
            raise ValueError("a prompt needs at least one token")
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        stream = TextStream(self.tokenizer, params.stop, incremental=pieces)
        job = GenerationJob(list(prompt_ids), params, stream, on_event, generator, pieces=pieces)
        try:
            self._pending.put_nowait(job)
        except queue.Full:
            raise ServerBusyError(
                f"{self._pending.maxsize} generation requests are already waiting for {self.name}; retry later"
            ) from None
        return job

    def stream(self, prompt: str, params: GenerationParams) -> Iterator[str]:
        """Yield the text of ``prompt``'s continuation piece by piece (blocking)."""
        events: queue.Queue = queue.Queue()
        job = self.submit(self.encode_prompt(prompt), params, lambda kind, payload: events.put((kind, payload)))
        try:
            while True:
                kind, payload = events.get()
                if kind == "text":
                    yield payload
                elif kind == "error":
                    raise payload
                else:
                    return
        finally:
            job.cancel()

    def generate(self, prompt: str, params: GenerationParams) -> GenerationResult:
        """The whole continuation of ``prompt`` (blocking)."""
        events: queue.Queue = queue.Queue()
        self.submit(self.encode_prompt(prompt), params, lambda kind, payload: events.put((kind, payload)), pieces=False)
        while True:
            kind, payload = events.get()
            if kind == "error":
                raise payload
            if kind == "done":
                return payload

    async def astream(self, prompt_ids: list[int], params: GenerationParams, pieces: bool = True) -> AsyncIterator[tuple[str, object]]:
        """Async iterator of ``("text", str)`` events ending with ``("done", GenerationResult)``
        (only the latter with ``pieces=False``). Leaving the iteration early (client gone)
        cancels the job."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(kind: str, payload: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = self.submit(prompt_ids, params, deliver, pieces)
        try:
            while True:
                kind, payload = await events.get()
                if kind == "error":
                    raise payload
                yield kind, payload
                if kind == "done":
                    return
        finally:
            job.cancel()

    async def agenerate(self, prompt_ids: list[int], params: GenerationParams) -> GenerationResult:
        """The whole continuation of the token ids ``prompt_ids``, awaited."""
        async for kind, payload in self.astream(prompt_ids, params, pieces=False):
            if kind == "done":
                return payload
        raise RuntimeError("generation ended without a result")

    @property
    def pending(self) -> int:
        return self._pending.qsize()

    def close(self) -> None:
        """Stop the thread after the current step; waiting jobs get an error."""
        self._closed = True
        try:
            self._pending.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=10)

    # ------------------------------------------------------------------ the loop
    def _prefill(self, job: GenerationJob) -> tuple[MambaCache, torch.Tensor]:
        ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
        out = self.model(ids, return_cache=True)
        return out.cache, out.logits[:, -1]

    def _admit(self, active: list[GenerationJob], block: bool) -> list[GenerationJob]:
        """Take waiting jobs (blocking for the first one when nothing is active)."""
        admitted: list[GenerationJob] = []
        while len(active) + len(admitted) < self.max_batch_size:
            try:
                job = self._pending.get(block=block and not admitted and not active)
            except queue.Empty:
                break
            if job is None:  # close()
                self._closed = True
                break
            if not job.cancelled:
                admitted.append(job)
        return admitted

    def _run(self) -> None:
        if self.decoder.compiled:
            seconds = self.decoder.warmup((1, 2))
            log.info("compiled the %s decoding step in %.1f s", self.name, seconds)
        active: list[GenerationJob] = []
        cache: MambaCache | None = None
        logits: torch.Tensor | None = None
        with torch.inference_mode():
            while not self._closed or active:
                if self._closed:
                    for job in active:
                        job.fail(ServerBusyError(f"the {self.name} generator is shut down"))
                    break
                try:
                    new_jobs = self._admit(active, block=True)
                    if new_jobs:
                        prefilled = [self._prefill(job) for job in new_jobs]
                        caches = ([cache] if cache is not None else []) + [c for c, _ in prefilled]
                        cache = MambaCache.concat(caches)
                        rows = ([logits] if logits is not None else []) + [l for _, l in prefilled]
                        logits = torch.cat(rows)
                        active = active + new_jobs
                    if not active:
                        continue
                    tokens = sample_batch(logits, active)
                    for job, token in zip(active, tokens):
                        if job.cancelled:
                            job.finish("cancelled")
                            self.cancelled += 1
                        else:
                            job.accept(token, self.tokenizer.eos_id)
                    keep = [row for row, job in enumerate(active) if not job.done]
                    self.active = len(keep)
                    if not keep:
                        active, cache, logits = [], None, None
                        continue
                    if len(keep) < len(active):
                        index = torch.tensor(keep, device=self.device)
                        cache = cache.select(index)
                        active = [active[row] for row in keep]
                        tokens = [tokens[row] for row in keep]
                    step_tokens = torch.tensor(tokens, dtype=torch.long, device=self.device)
                    logits = self.decoder.step(step_tokens, cache)  # cache: owned here, updated in place
                    self.steps += 1
                    self.rows_decoded += len(active)
                    self.max_rows = max(self.max_rows, len(active))
                except Exception as err:  # a failed step fails its batch, not the server
                    log.exception("generation step failed for %s", self.name)
                    for job in active:
                        job.fail(err)
                    active, cache, logits = [], None, None
                    self.active = 0
        # Whatever is still queued after close() is told so.
        while True:
            try:
                job = self._pending.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.fail(ServerBusyError(f"the {self.name} generator is shut down"))
