"""Batching across requests: one scheduler per model, one session run at a time.

Requests put their rows in the model's queue and await one future per row. A worker thread takes the next batch
whenever the session is free: the oldest waiting row, then the waiting rows nearest to it in length, up to
``max_batch_rows`` rows and ``max_batch_tokens`` padded tokens (rows x longest), so that short texts do not pay for
long ones and no row waits behind more than a batch's worth of newer ones. A row whose future was cancelled (its
client went away, or its request timed out) is dropped before it runs.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from serve.metrics import Metrics
from serve.runtime import Row

log = logging.getLogger("edgetune.serve")


@dataclass(order=True)
class _Item:
    length: int
    seq: int
    row: Row = field(compare=False)
    future: asyncio.Future = field(compare=False)
    loop: asyncio.AbstractEventLoop = field(compare=False)
    enqueued: float = field(compare=False)
    taken: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Limits:
    max_batch_rows: int = 32
    max_batch_tokens: int = 16384  # rows x padded length
    max_padding: float = 0.25  # a row joins a batch only while its padding stays within this share of its real tokens
    max_wait_ms: float = 0.0  # wait this long for a fuller batch (0: run as soon as the session is free)


def pick_batch(pending: list[_Item], oldest: _Item, limits: Limits) -> tuple[int, int]:
    """The slice [lo, hi) of ``pending`` (sorted by length) to run next: ``oldest`` and the rows nearest to it in
    length, within the row, padded-token and padding limits (one row always runs).

    On a CPU a padded position costs as much as a real one, so a batch that mixes a 60-token text with 17-token ones
    runs at a third of its speed; the padding limit keeps such texts in batches of their own.
    """
    i = bisect.bisect_left(pending, oldest)
    lo, hi, real = i, i + 1, oldest.length

    def fits(lo: int, hi: int, real: int) -> bool:  # rows [lo, hi) padded to the longest, pending[hi - 1]
        padded = (hi - lo) * pending[hi - 1].length
        return padded <= limits.max_batch_tokens and padded <= (1 + limits.max_padding) * real

    while hi - lo < limits.max_batch_rows:
        left = lo > 0 and fits(lo - 1, hi, real + pending[lo - 1].length)
        right = hi < len(pending) and fits(lo, hi + 1, real + pending[hi].length)
        if right and (not left or pending[hi].length - oldest.length <= oldest.length - pending[lo - 1].length):
            real += pending[hi].length
            hi += 1
        elif left:
            real += pending[lo - 1].length
            lo -= 1
        else:
            break
    return lo, hi


class Scheduler:
    """The queue and worker thread of one model. ``run(rows)`` is the model's batch function (only the worker calls
    it); ``lock`` serialises its runs with those of other models that share the same cores."""

    def __init__(
        self,
        name: str,
        run: Callable[[list[Row]], list],
        limits: Limits,
        lock: threading.Lock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self._run = run
        self.limits = limits
        self._lock = lock or threading.Lock()
        self.metrics = metrics
        self._pending: list[_Item] = []  # sorted by (length, arrival)
        self._fifo: deque[_Item] = deque()  # arrival order; taken items are skipped lazily
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closing = False
        self.dropped = 0  # rows cancelled before they ran
        self._thread = threading.Thread(target=self._work, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        return len(self._pending)

    def submit(self, rows: list[Row]) -> list[asyncio.Future]:
        """Queue rows (from the event loop); one future per row, resolved with the row's output."""
        loop = asyncio.get_running_loop()
        now = time.perf_counter()
        futures = []
        with self._cond:
            if self._closing:
                raise RuntimeError(f"scheduler {self.name} is closed")
            for row in rows:
                item = _Item(len(row), next(self._seq), row, loop.create_future(), loop, now)
                bisect.insort(self._pending, item)
                self._fifo.append(item)
                futures.append(item.future)
            self._cond.notify()
        return futures

    def close(self) -> None:
        """Run what is queued, then stop the worker (returns once it has)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _next_batch(self) -> list[_Item] | None:
        with self._cond:
            while True:
                self._drop_cancelled()
                if self._pending:
                    if self._wait_for_more():
                        continue
                    break
                if self._closing:
                    return None
                self._cond.wait()
            while self._fifo[0].taken:
                self._fifo.popleft()
            lo, hi = pick_batch(self._pending, self._fifo[0], self.limits)
            batch = self._pending[lo:hi]
            del self._pending[lo:hi]
            for item in batch:
                item.taken = True
            return batch

    def _wait_for_more(self) -> bool:
        """With max_wait_ms set, wait (holding no rows back longer than that) for a full batch. True if it waited."""
        wait = self.limits.max_wait_ms / 1000
        if not wait or self._closing or len(self._pending) >= self.limits.max_batch_rows:
            return False
        oldest = min(self._fifo[i].enqueued for i in range(len(self._fifo)) if not self._fifo[i].taken)
        left = oldest + wait - time.perf_counter()
        if left <= 0:
            return False
        self._cond.wait(left)
        return True

    def _drop_cancelled(self) -> None:
        if any(item.future.cancelled() for item in self._pending):
            kept = [item for item in self._pending if not item.future.cancelled()]
            for item in self._pending:
                if item.future.cancelled():
                    item.taken = True
                    self.dropped += 1
                    if self.metrics:
                        self.metrics.dropped.labels(self.name).inc()
            self._pending = kept
        while self._fifo and self._fifo[0].taken:
            self._fifo.popleft()

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            start = time.perf_counter()
            if self.metrics:
                waited = self.metrics.queue_seconds.labels(self.name)
                for item in batch:
                    waited.observe(start - item.enqueued)
            rows = [item.row for item in batch]
            try:
                with self._lock:
                    t0 = time.perf_counter()
                    outputs = self._run(rows)
                    seconds = time.perf_counter() - t0
            except Exception as e:  # a bug or a broken model: every row of the batch fails, the worker goes on
                log.exception("model %s: a batch of %d rows failed", self.name, len(rows))
                for item in batch:
                    item.loop.call_soon_threadsafe(_fail, item.future, e)
                continue
            if self.metrics:
                self.metrics.observe_run(self.name, seconds, len(rows), len(rows) * max(len(r) for r in rows))
            for item, out in zip(batch, outputs, strict=True):
                item.loop.call_soon_threadsafe(_resolve, item.future, out)


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():  # cancelled while it ran
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
