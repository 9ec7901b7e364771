"""Continuous-batching text generation with MARK's Mamba language models.

One :class:`GenerationWorker` per loaded language model owns the model on one thread.
Requests wait in a bounded queue; between two decoding steps the worker admits every
waiting request (reads its prompt once, the prefill) and adds its recurrent state as a
new row of the batch. Each step then feeds one token per active row through
:meth:`MambaLM.step`: the state of a Mamba row has a fixed size, so a new row is just
one more slice of the batch, and a finished row is dropped with ``cache.select``.
Concurrent requests therefore share the model's matrix products instead of queueing
behind each other, and the server's event loop never runs the model.

No request waits forever: a prompt whose prefill fails fails alone and at once (the batch
goes on), and with ``request_timeout_s`` every request fails with
:class:`GenerationTimeoutError` once it has waited and run that long. With
``GenerationParams.logprobs`` / ``echo`` the worker also reports the model's logprobs of the
generated and prompt tokens (what OpenAI's ``logprobs`` and lm-evaluation-harness read).

Each request gets its text as it is produced (``TextStream``: incremental decoding of
byte-level BPE, stop strings) through a callback, so asyncio handlers (the API server)
and plain threads (the LangChain integration) consume the same engine.
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable, Iterator, Sequence

import torch

from src.api.priority import lower_thread_priority
from src.core.logging import get_logger
from src.mamba.generate import Decoder
from src.mamba.model import MambaCache, MambaLM
from src.mamba.tokenizer import MambaTokenizer

log = get_logger("api")

# A decoded text ending in this character is cut inside a multi-byte UTF-8 character.
REPLACEMENT_CHAR = "\ufffd"


class ServerBusyError(Exception):
    """The generation queue is full: the caller should retry later (HTTP 503)."""


class GenerationTimeoutError(Exception):
    """A request ran past the server's request timeout (HTTP 504)."""


class PrefillError(Exception):
    """Reading one request's prompt failed; only that request fails (HTTP 500)."""


@dataclass(frozen=True)
class GenerationParams:
    """How to continue one prompt. ``temperature <= 0`` is greedy decoding; ``stop`` strings
    end the text (they are not included); the same ``seed`` gives the same text."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Logprobs are of the model's own distribution (before temperature and top-p), as in
    # OpenAI's and vLLM's APIs. ``logprobs``: None for none, else the top-N kept per position
    # (0: only the chosen token's). ``echo``: also the logprobs of the prompt's tokens.
    logprobs: int | None = None
    echo: bool = False


@dataclass
class TokenLogprobs:
    """Per position: the token id, its logprob (``None`` when nothing precedes it) and the
    top-N ``(token id, logprob)`` pairs, most likely first."""

    ids: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    top: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class GenerationResult:
    """A finished generation. ``finish_reason``: ``stop`` (end of text or a stop string),
    ``length`` (``max_new_tokens`` reached) or ``cancelled``. With ``params.logprobs``,
    ``logprobs`` covers the generated tokens (``completion_tokens`` of them, and the
    end-of-text token when it ended the text); with ``params.echo``, ``prompt_logprobs``
    covers the prompt's."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float = 0.0
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None


def position_logprobs(logits: torch.Tensor, chosen: Sequence[int], top_n: int) -> tuple[list[float], list[list[tuple[int, float]]]]:
    """The logprob of ``chosen[i]`` under row ``i`` of ``logits`` (rows, vocab), and the
    ``top_n`` most likely ``(id, logprob)`` of each row."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(list(chosen), dtype=torch.long, device=logits.device)[:, None]
    picked = logp.gather(-1, index)[:, 0].tolist()
    if top_n <= 0:
        return picked, [[] for _ in picked]
    values, ids = logp.topk(min(top_n, logp.shape[-1]), dim=-1)
    top = [list(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    return picked, top


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
    deadline: float | None = None  # time.perf_counter() value past which the job fails
    cancelled: bool = False
    done: bool = False
    logprobs: TokenLogprobs | None = None
    prompt_logprobs: TokenLogprobs | None = None

    def cancel(self) -> None:
        self.cancelled = True

    def _emit(self, kind: str, payload: object) -> None:
        try:
            self.on_event(kind, payload)
        except Exception:  # a consumer that went away must not stop the worker
            log.debug("generation event dropped", exc_info=True)

    def accept(self, token_id: int, eos_id: int, logprob: tuple[float, list[tuple[int, float]]] | None = None) -> None:
        """Record one sampled token (and its logprob and top-N, when asked for); emits
        text and, when the job ends, its result."""
        if logprob is not None and self.logprobs is not None:
            # The end-of-text token is listed too (as OpenAI lists <|endoftext|>): scoring
            # clients count positions, and it is the model's choice like any other token.
            self.logprobs.ids.append(token_id)
            self.logprobs.logprobs.append(logprob[0])
            self.logprobs.top.append(logprob[1])
            if self.pieces:  # streamed: the logprobs go out with (before) the text they belong to
                self._emit("logprobs", (token_id, logprob[0], logprob[1]))
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
            logprobs=self.logprobs,
            prompt_logprobs=self.prompt_logprobs,
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
        decoder: str = "eager",
        request_timeout_s: float | None = None,
        nice: int = 0,
    ) -> None:
        self.model = model.eval()
        self.nice = nice  # the worker thread's niceness (src.api.priority)
        # The decoding step updates the batch's state in place (``decoder``: a Decoder
        # backend); compiled, it is compiled once on this worker's thread before the first
        # request is served.
        self.decoder = Decoder(self.model, decoder)
        # Every request fails with GenerationTimeoutError once it has waited and run this long.
        self.request_timeout_s = request_timeout_s
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
        self.timed_out = 0  # requests failed by the request timeout
        self.failed = 0  # requests failed by an error in their prefill or a decoding step
        self.tokens_generated = 0
        self.prompt_tokens_read = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) of recent steps
        self._thread = threading.Thread(target=self._run, name=f"generate-{name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ public API
    def encode_prompt(self, prompt: str) -> list[int]:
        """The token ids a prompt is read as: the start of a document (``<|bos|>`` first)."""
        return [self.tokenizer.bos_id] + self.tokenizer.encode(prompt)

    def encode_grounded(self, prompt: str) -> list[int]:
        """A retrieval-grounded prompt as this model reads it: an RLHF model trained on prompts
        of at most ``max_prompt_tokens`` reads them through the same :class:`PromptFormat` as
        its training and evaluation (``<|bos|>`` and the prompt's last tokens: the question and
        the end of the context); any other model reads it whole (:meth:`encode_prompt`)."""
        limit = getattr(self.model, "trained_prompt_tokens", None)
        if not limit:
            return self.encode_prompt(prompt)
        from src.rlhf.data import PromptFormat

        return PromptFormat(self.tokenizer, max_prompt_tokens=limit).prompt_ids(prompt)

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
        if self.request_timeout_s is not None:
            job.deadline = job.started + self.request_timeout_s
        if params.logprobs is not None:
            job.logprobs = TokenLogprobs()
        try:
            self._pending.put_nowait(job)
        except queue.Full:
            raise ServerBusyError(
                f"{self._pending.maxsize} generation requests are already waiting for {self.name}; retry later"
            ) from None
        return job

    def stream(self, prompt: str | list[int], params: GenerationParams) -> Iterator[str]:
        """Yield the text of ``prompt``'s continuation piece by piece (blocking); ``prompt``:
        text (read through :meth:`encode_prompt`) or token ids."""
        events: queue.Queue = queue.Queue()
        ids = self.encode_prompt(prompt) if isinstance(prompt, str) else prompt
        job = self.submit(ids, params, lambda kind, payload: events.put((kind, payload)))
        try:
            while True:
                kind, payload = self._next_event(events, job)
                if kind == "text":
                    yield payload
                elif kind == "error":
                    raise payload
                elif kind == "done":
                    return
        finally:
            job.cancel()

    def _timeout_error(self) -> GenerationTimeoutError:
        return GenerationTimeoutError(
            f"the request ran past the server's request timeout of {self.request_timeout_s:g} s; "
            "ask for fewer tokens or retry when the server is less busy"
        )

    def _wait_seconds(self, job: GenerationJob) -> float | None:
        """How long a consumer waits for the next event: until the job's deadline, plus a
        grace second for the worker to fail it itself (it checks between steps)."""
        if job.deadline is None:
            return None
        return max(0.0, job.deadline - time.perf_counter()) + 1.0

    def _next_event(self, events: queue.Queue, job: GenerationJob) -> tuple[str, object]:
        try:
            return events.get(timeout=self._wait_seconds(job))
        except queue.Empty:  # the worker is stuck in a step longer than the deadline allows
            job.cancel()
            raise self._timeout_error() from None

    def generate(self, prompt: str, params: GenerationParams) -> GenerationResult:
        """The whole continuation of ``prompt`` (blocking)."""
        events: queue.Queue = queue.Queue()
        job = self.submit(self.encode_prompt(prompt), params, lambda kind, payload: events.put((kind, payload)), pieces=False)
        while True:
            kind, payload = self._next_event(events, job)
            if kind == "error":
                raise payload
            if kind == "done":
                return payload

    async def astream(self, prompt_ids: list[int], params: GenerationParams, pieces: bool = True) -> AsyncIterator[tuple[str, object]]:
        """Async iterator of ``("text", str)`` events ending with ``("done", GenerationResult)``
        (only the latter with ``pieces=False``); with ``params.logprobs``, each generated
        token's ``("logprobs", (id, logprob, top))`` comes before the text it ends. Errors
        (a failed prefill, the request timeout) are raised. Leaving the iteration early
        (client gone) cancels the job."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def deliver(kind: str, payload: object) -> None:
            loop.call_soon_threadsafe(events.put_nowait, (kind, payload))

        job = self.submit(prompt_ids, params, deliver, pieces)
        try:
            while True:
                try:
                    kind, payload = await asyncio.wait_for(events.get(), self._wait_seconds(job))
                except asyncio.TimeoutError:  # the worker is stuck in a step longer than the deadline allows
                    raise self._timeout_error() from None
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

    def tokens_per_second(self, window_s: float = 10.0) -> float:
        """Tokens generated per second over the last ``window_s`` seconds."""
        now = time.perf_counter()
        recent = list(self._recent)  # a copy: the worker thread appends to it
        return sum(n for t, n in recent if now - t <= window_s) / window_s

    def _record_step(self, tokens: int) -> None:
        now = time.perf_counter()
        self._recent.append((now, tokens))
        while self._recent and now - self._recent[0][0] > 60.0:
            self._recent.popleft()

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
        """Read the job's prompt: its recurrent state and the logits of its next token (and,
        with ``echo``, the logprobs of the prompt's own tokens)."""
        ids = torch.tensor([job.prompt_ids], dtype=torch.long, device=self.device)
        out = self.model(ids, return_cache=True)
        if job.params.echo:
            # Position t's logits predict token t+1; the first token has nothing before it.
            picked, top = position_logprobs(out.logits[0, :-1], job.prompt_ids[1:], job.params.logprobs or 0)
            job.prompt_logprobs = TokenLogprobs(list(job.prompt_ids), [None] + picked, [[]] + top)
        return out.cache, out.logits[:, -1]

    def _expire(self, jobs: list[GenerationJob]) -> None:
        """Fail the jobs past their deadline (they leave the batch at the next select)."""
        now = time.perf_counter()
        for job in jobs:
            if job.deadline is not None and now > job.deadline and not job.done:
                self.timed_out += 1
                job.fail(self._timeout_error())

    def _prefill_all(self, new_jobs: list[GenerationJob]) -> list[tuple[GenerationJob, MambaCache, torch.Tensor]]:
        """Prefill each admitted job; a job whose prefill fails is failed at once (its
        caller gets the error now), the others go on. Jobs that asked for no new token
        (``max_new_tokens=0``: only the prompt's logprobs) are finished here."""
        ready = []
        for job in new_jobs:
            try:
                cache, logits = self._prefill(job)
            except Exception as err:
                log.exception("prefill failed for a %s request (%d prompt tokens)", self.name, len(job.prompt_ids))
                self.failed += 1
                job.fail(PrefillError(f"reading the prompt failed: {type(err).__name__}: {err}"))
                continue
            self.prompt_tokens_read += len(job.prompt_ids)
            if job.prompt_logprobs is not None and job.pieces:
                job._emit("prompt", job.prompt_logprobs)  # streamed echo: the prompt goes first
            if job.params.max_new_tokens <= 0:
                job.finish("length")
                continue
            ready.append((job, cache, logits))
        return ready

    def _logprob_rows(self, logits: torch.Tensor, jobs: list[GenerationJob], tokens: list[int]) -> list:
        """``(logprob, top)`` of each row's sampled token for the jobs that asked, else None."""
        rows = [i for i, job in enumerate(jobs) if job.params.logprobs is not None]
        out: list = [None] * len(jobs)
        if rows:
            top_n = max(jobs[i].params.logprobs or 0 for i in rows)
            picked, top = position_logprobs(logits[rows], [tokens[i] for i in rows], top_n)
            for k, i in enumerate(rows):
                out[i] = (picked[k], top[k][: jobs[i].params.logprobs or 0])
        return out

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
        lower_thread_priority(self.nice)
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
                    self._expire(new_jobs)  # waited in the queue past their deadline
                    prefilled = self._prefill_all([job for job in new_jobs if not job.done])
                    if prefilled:
                        caches = ([cache] if cache is not None else []) + [c for _, c, _ in prefilled]
                        cache = MambaCache.concat(caches)
                        rows = ([logits] if logits is not None else []) + [l for _, _, l in prefilled]
                        logits = torch.cat(rows)
                        active = active + [job for job, _, _ in prefilled]
                    if not active:
                        continue
                    tokens = sample_batch(logits, active)
                    token_logprobs = self._logprob_rows(logits, active, tokens)
                    self._record_step(sum(1 for t in tokens if t != self.tokenizer.eos_id))
                    for job, token, logprob in zip(active, tokens, token_logprobs):
                        if job.cancelled:
                            job.finish("cancelled")
                            self.cancelled += 1
                        elif not job.done:
                            job.accept(token, self.tokenizer.eos_id, logprob)
                            self.tokens_generated += token != self.tokenizer.eos_id
                    self._expire(active)
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
                        if not job.done:
                            self.failed += 1
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
