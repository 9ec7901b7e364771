"""Micro-batching with two lanes for models that map a list of texts to a list of results.

The embedding model and the classifier are much faster per text on a batch than one text
at a time, and their Hugging Face tokenizers must not be called from several threads at
once. A :class:`MicroBatcher` owns such a model on one thread per replica (each replica a
``batch_fn`` with its own copy of the model): concurrent requests queue up, and a free
worker runs the next *sub-batch*, then hands each request its results.

Scheduling, as embedding servers (TEI, Infinity) do it:

* Two lanes. ``interactive`` is short work someone is waiting on (a search query, the
  evidence sentences of ``/query``); ``bulk`` is batch work (``/v1/embeddings``). When both
  lanes wait, the interactive lane gets ``interactive_weight`` sub-batches for each bulk one,
  so bulk work always moves but never holds a query back by more than one sub-batch.
* Bounded sub-batches. A sub-batch holds at most ``max_items`` items and, with a ``cost``
  function (an item's estimated tokens), at most ``max_cost`` padded tokens (items x the
  costliest item: what a padded batch computes). A request larger than that is split.
  Within a lane the request with the fewest items left goes first (shortest remaining work
  first, which keeps the mean wait lowest), so a 256-text request does not hold back the
  small ones queued after it; one passed over ``MAX_SKIPS`` times goes first once, so a
  large request is never starved.
* With several replicas, the first ``replicas - 1`` workers take bulk work first (full
  sub-batches) and interactive work when no bulk waits; the last worker is kept for the
  interactive lane and helps with bulk work only while no interactive request waits, in
  sub-batches of a quarter of ``max_cost``. ``nice``: the niceness of each worker's thread
  (:mod:`src.api.priority`), e.g. the bulk workers behind the kept one.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Generic, Sequence, TypeVar

from src.api.generation import ServerBusyError
from src.api.priority import lower_thread_priority
from src.core.logging import get_logger

Item = TypeVar("Item")
Result = TypeVar("Result")
log = get_logger("api")
LANES = ("interactive", "bulk")
MAX_SKIPS = 8  # a request passed over this many times goes first once
SMALL_SUB_BATCH = 4  # the worker kept for interactive work runs bulk sub-batches of max_cost / 4


@dataclass(eq=False)
class _Request:
    items: list
    costs: list[int]
    future: Future
    lane: str
    results: list = field(default_factory=list)
    next: int = 0  # the first item not yet handed to a worker
    left: int = 0  # items handed out whose results have not come back
    failed: bool = False
    started: bool = False  # its future is running (a worker took it up)
    seq: int = 0  # arrival order
    skipped: int = 0  # sub-batches of its lane formed without it since it was last served


class MicroBatcher(Generic[Item, Result]):
    """Runs ``batch_fn(items) -> results`` (same length, same order) for all concurrent
    callers (see the module docstring). ``batch_fn`` may be a list: one worker thread per
    replica. ``max_pending`` requests may wait; more is ``ServerBusyError``."""

    def __init__(
        self,
        batch_fn: Callable[[list[Item]], Sequence[Result]] | Sequence[Callable[[list[Item]], Sequence[Result]]],
        name: str,
        max_items: int = 64,
        max_pending: int = 256,
        cost: Callable[[Item], int] | None = None,
        max_cost: int | None = None,
        interactive_weight: int = 3,
        nice: int | Sequence[int] = 0,
    ) -> None:
        self.batch_fns = list(batch_fn) if isinstance(batch_fn, (list, tuple)) else [batch_fn]
        self.nice = list(nice) if isinstance(nice, (list, tuple)) else [nice] * len(self.batch_fns)
        if len(self.nice) != len(self.batch_fns):
            raise ValueError(f"nice: one value per replica ({len(self.batch_fns)}), not {len(self.nice)}")
        self.name = name
        self.max_items = max_items
        self.max_pending = max_pending
        self.cost = cost
        self.max_cost = max_cost
        self.interactive_weight = interactive_weight
        self._lanes: dict[str, collections.deque[_Request]] = {lane: collections.deque() for lane in LANES}
        self._waiting = 0  # requests not fully handed out yet
        self._submitted = 0
        self._interactive_turns = 0  # interactive sub-batches since the last bulk one
        self._cond = threading.Condition()
        self._closed = False
        self.batches = 0
        self.items = 0
        self.lane_batches = {lane: 0 for lane in LANES}
        self._threads = [
            threading.Thread(target=self._run, args=(i, fn), name=f"batch-{name}-{i}", daemon=True)
            for i, fn in enumerate(self.batch_fns)
        ]
        for thread in self._threads:
            thread.start()

    # ------------------------------------------------------------------ callers
    def submit(self, items: Sequence[Item], lane: str = "interactive") -> Future:
        """Queue ``items`` in ``lane``; the future's result is their results, in order."""
        if lane not in self._lanes:
            raise ValueError(f"lane must be one of {LANES}, not {lane!r}")
        items = list(items)
        future: Future = Future()
        request = _Request(items, [max(1, self.cost(x)) for x in items] if self.cost else [1] * len(items), future, lane, [None] * len(items))
        with self._cond:
            if self._closed:
                raise ServerBusyError(f"the {self.name} worker is shut down")
            if self._waiting >= self.max_pending:
                raise ServerBusyError(f"{self.max_pending} {self.name} requests are already waiting; retry later")
            if not items:
                future.set_running_or_notify_cancel()
                future.set_result([])
                return future
            self._submitted += 1
            request.seq = self._submitted
            self._lanes[lane].append(request)
            self._waiting += 1
            self._cond.notify()
        return future

    def run(self, items: Sequence[Item], lane: str = "interactive") -> list[Result]:
        """Blocking: the results of ``items``."""
        return self.submit(items, lane).result()

    async def arun(self, items: Sequence[Item], lane: str = "interactive") -> list[Result]:
        """Awaitable: the results of ``items``."""
        return await asyncio.wrap_future(self.submit(items, lane))

    @property
    def pending(self) -> int:
        """Requests waiting for a worker (not all of their items handed out yet)."""
        return self._waiting

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
        with self._cond:  # tell whoever still waits
            for queue in self._lanes.values():
                while queue:
                    request = queue.popleft()
                    if (request.started or request.future.set_running_or_notify_cancel()) and not request.future.done():
                        request.future.set_exception(ServerBusyError(f"the {self.name} worker is shut down"))
            self._waiting = 0

    # ------------------------------------------------------------------ scheduling
    def _pick_lane(self, worker: int) -> tuple[str, int | None] | None:
        """The lane of worker ``worker``'s next sub-batch and its token budget, or None: nothing
        to run on this worker now (called under the lock)."""
        interactive, bulk = self._lanes["interactive"], self._lanes["bulk"]
        if len(self.batch_fns) == 1:  # one worker: the lanes take turns, interactive_weight to 1
            if interactive and not (bulk and self._interactive_turns >= self.interactive_weight):
                return "interactive", self.max_cost
            return ("bulk", self.max_cost) if bulk else None
        if worker < len(self.batch_fns) - 1:  # a bulk worker
            if bulk:
                return "bulk", self.max_cost
            return ("interactive", self.max_cost) if interactive else None
        if interactive:  # the worker kept for interactive work
            return "interactive", self.max_cost
        if bulk and self.max_cost is not None:
            # It helps with bulk work while no query waits, in small sub-batches, so a query
            # that comes waits for a small one at most.
            return "bulk", max(1, self.max_cost // SMALL_SUB_BATCH)
        return None

    def _next_batch(self, lane: str, max_cost: int | None) -> list[tuple[_Request, int, int]]:
        """Items of ``lane``'s requests up to ``max_items`` and ``max_cost``: ``[(request,
        start, end)]`` (called under the lock). The request with the fewest items left goes
        first (earlier on ties), so small requests are not held back by large ones; those passed
        over ``MAX_SKIPS`` times go first, oldest first, so a large request still moves."""
        queue = self._lanes[lane]
        parts: list[tuple[_Request, int, int]] = []
        count, widest, full = 0, 0, False
        def order(r: _Request) -> tuple:  # passed over too often: oldest first; else fewest items left
            return (0, r.seq, 0) if r.skipped >= MAX_SKIPS else (1, len(r.items) - r.next, r.seq)

        for request in sorted(queue, key=order):
            if full or count >= self.max_items:
                break
            if not request.started:
                if not request.future.set_running_or_notify_cancel():
                    queue.remove(request)  # cancelled while it waited
                    self._waiting -= 1
                    continue
                request.started = True
            start = request.next
            while request.next < len(request.items):
                wider = max(widest, request.costs[request.next])
                if count >= self.max_items or (count and max_cost is not None and (count + 1) * wider > max_cost):
                    full = True
                    break
                widest, count = wider, count + 1
                request.next += 1
            if request.next > start:
                parts.append((request, start, request.next))
                request.left += request.next - start
                request.skipped = 0
            if request.next == len(request.items):
                queue.remove(request)
                self._waiting -= 1
        served = {id(request) for request, _, _ in parts}
        for request in queue:
            if id(request) not in served:
                request.skipped += 1
        return parts

    def _run(self, worker: int, batch_fn: Callable[[list[Item]], Sequence[Result]]) -> None:
        lower_thread_priority(self.nice[worker])
        while True:
            with self._cond:
                while not self._closed and (picked := self._pick_lane(worker)) is None:
                    self._cond.wait()
                if self._closed:
                    return
                lane, max_cost = picked
                parts = self._next_batch(lane, max_cost)
                if any(self._lanes.values()):
                    self._cond.notify()  # another worker may take what is left
                if not parts:
                    continue
                self._interactive_turns = 0 if lane == "bulk" else self._interactive_turns + 1
            try:
                results = list(batch_fn([item for request, start, end in parts for item in request.items[start:end]]))
                error = None
            except Exception as err:  # the batch's callers get the error; the worker goes on
                log.exception("%s batch failed", self.name)
                error = err
            with self._cond:
                self.batches += 1
                self.lane_batches[lane] += 1
                self.items += sum(end - start for _, start, end in parts)
                offset = 0
                for request, start, end in parts:
                    request.left -= end - start
                    if error is not None:
                        self._fail(request, error)
                    elif not request.failed:
                        request.results[start:end] = results[offset : offset + end - start]
                        if request.left == 0 and request.next == len(request.items):
                            request.future.set_result(request.results)
                    offset += end - start
                self._cond.notify_all()

    def _fail(self, request: _Request, error: Exception) -> None:
        """``request`` gets ``error``; its items still waiting are dropped (under the lock)."""
        if request.failed:
            return
        request.failed = True
        if request.next < len(request.items):  # still queued for more sub-batches
            self._lanes[request.lane].remove(request)
            request.next = len(request.items)
            self._waiting -= 1
        request.future.set_exception(error)
