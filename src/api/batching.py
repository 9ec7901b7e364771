"""Micro-batching for models that map a list of texts to a list of results in one call.

The embedding model and the classifier are much faster per text on a batch than one text
at a time, and their Hugging Face tokenizers must not be called from several threads at
once. A :class:`MicroBatcher` owns such a model on one thread: concurrent requests queue
up, and the worker runs everything waiting (up to ``max_items`` texts) as one batch,
then hands each request its own slice of the results.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from typing import Callable, Generic, Sequence, TypeVar

from src.api.generation import ServerBusyError
from src.core.logging import get_logger

Item = TypeVar("Item")
Result = TypeVar("Result")
log = get_logger("api")


class MicroBatcher(Generic[Item, Result]):
    """Runs ``batch_fn(items) -> results`` (same length, same order) on one thread for
    all concurrent callers. ``max_pending`` requests may wait; more is ``ServerBusyError``."""

    def __init__(
        self,
        batch_fn: Callable[[list[Item]], Sequence[Result]],
        name: str,
        max_items: int = 64,
        max_pending: int = 256,
    ) -> None:
        self.batch_fn = batch_fn
        self.name = name
        self.max_items = max_items
        self._pending: queue.Queue[tuple[list[Item], Future] | None] = queue.Queue(maxsize=max_pending)
        self._closed = False
        self.batches = 0
        self.items = 0
        self._thread = threading.Thread(target=self._run, name=f"batch-{name}", daemon=True)
        self._thread.start()

    def submit(self, items: Sequence[Item]) -> Future:
        """Queue ``items``; the future's result is their results, in order."""
        future: Future = Future()
        if self._closed:
            raise ServerBusyError(f"the {self.name} worker is shut down")
        try:
            self._pending.put_nowait((list(items), future))
        except queue.Full:
            raise ServerBusyError(f"{self._pending.maxsize} {self.name} requests are already waiting; retry later") from None
        return future

    def run(self, items: Sequence[Item]) -> list[Result]:
        """Blocking: the results of ``items``."""
        return self.submit(items).result()

    async def arun(self, items: Sequence[Item]) -> list[Result]:
        """Awaitable: the results of ``items``."""
        return await asyncio.wrap_future(self.submit(items))

    @property
    def pending(self) -> int:
        """Requests waiting for the worker."""
        return self._pending.qsize()

    def close(self) -> None:
        self._closed = True
        try:
            self._pending.put_nowait(None)
        except queue.Full:
            pass
        self._thread.join(timeout=10)

    def _run(self) -> None:
        carry: tuple[list[Item], Future] | None = None
        while True:
            first = carry or self._pending.get()
            carry = None
            if first is None:
                break
            requests = [first]
            size = len(first[0])
            # Everything already waiting joins the batch, up to max_items texts.
            while size < self.max_items:
                try:
                    nxt = self._pending.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._closed = True
                    break
                if size + len(nxt[0]) > self.max_items:
                    carry = nxt
                    break
                requests.append(nxt)
                size += len(nxt[0])
            requests = [(items, fut) for items, fut in requests if fut.set_running_or_notify_cancel()]
            if not requests:
                continue
            try:
                results = list(self.batch_fn([item for items, _ in requests for item in items]))
                self.batches += 1
                self.items += size
            except Exception as err:  # the batch's callers get the error; the worker goes on
                log.exception("%s batch failed", self.name)
                for _, fut in requests:
                    fut.set_exception(err)
                continue
            start = 0
            for items, fut in requests:
                fut.set_result(results[start : start + len(items)])
                start += len(items)
            if self._closed:
                break
        while True:  # tell whoever still waits
            try:
                leftover = self._pending.get_nowait()
            except queue.Empty:
                break
            if leftover is not None and leftover[1].set_running_or_notify_cancel():
                leftover[1].set_exception(ServerBusyError(f"the {self.name} worker is shut down"))
