"""Batching across requests: one scheduler per model, one session run at a time.

A request hands its texts to the model's worker thread and awaits one future. The worker tokenises what has arrived
(off the event loop, between session runs), queues the rows, and takes the next batch whenever the session is free:
the oldest waiting row, then the waiting rows nearest to it in length, up to ``max_batch_rows`` rows and
``max_batch_tokens`` padded tokens (rows x longest), so that short texts do not pay for long ones and no row waits
behind more than a batch's worth of newer ones. A request's rows may run in several batches; its future resolves once
the last has run. The rows of a request whose future was cancelled (its client went away, or it timed out) are
dropped before they run.
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


@dataclass(eq=False)
class Ticket:
    """One request's texts in the scheduler; its future resolves with (rows, outputs) once every row has run."""

    texts: list[str]
    truncate: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    enqueued: float
    adapter: object = None  # a bank's requests: the adapter every row of the request runs with
    rows: list[Row] = field(default_factory=list)
    outputs: list = field(default_factory=list)
    left: int = 0  # rows not yet run


@dataclass(order=True)
class _Item:
    length: int
    seq: int
    row: Row = field(compare=False)
    ticket: Ticket = field(compare=False)
    index: int = field(compare=False)  # the row's place in its request
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
    """The queue and worker thread of one model. ``tokenize(texts, truncate)`` turns a request's texts into rows (it
    may raise: the request's future gets the error); ``run(rows)`` is the model's batch function. Only the worker calls
    either; ``lock`` serialises runs with those of other models that share the same cores."""

    def __init__(
        self,
        name: str,
        tokenize: Callable[[list[str], bool], list[Row]],
        run: Callable[[list[Row]], list],
        limits: Limits,
        lock: threading.Lock | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.name = name
        self._tokenize = tokenize
        self._run = run
        self.limits = limits
        self._lock = lock or threading.Lock()
        self.metrics = metrics
        self._inbox: list[Ticket] = []  # submitted, not yet tokenised (shared with the event loop, under _cond)
        self._pending: list[_Item] = []  # the worker's: queued rows sorted by (length, arrival)
        self._fifo: deque[_Item] = deque()  # the same rows in arrival order; taken ones are skipped lazily
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closing = False
        self.dropped = 0  # rows cancelled before they ran
        self._thread = threading.Thread(target=self._work, name=f"scheduler-{name}", daemon=True)
        self._thread.start()

    def depth(self) -> int:
        with self._cond:
            return len(self._pending) + sum(len(t.texts) for t in self._inbox)

    def submit(self, texts: list[str], truncate: bool, adapter: object = None) -> asyncio.Future:
        """Queue a request's texts (from the event loop), for a bank with ``adapter``; the future resolves with
        (rows, outputs)."""
        loop = asyncio.get_running_loop()
        ticket = Ticket(texts, truncate, loop.create_future(), loop, time.perf_counter(), adapter)
        with self._cond:
            if self._closing:
                raise RuntimeError(f"scheduler {self.name} is closed")
            self._inbox.append(ticket)
            self._cond.notify()
        return ticket.future

    def close(self) -> None:
        """Run what is queued, then stop the worker (returns once it has)."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join()

    def _work(self) -> None:
        while (arrived := self._arrivals()) is not None:
            self._admit(arrived)
            if self._pending and self._wait_left() > 0:
                continue  # max_wait_ms: the batch may fill yet
            if (batch := self._next_batch()) is not None:
                self._run_batch(batch)

    def _arrivals(self) -> list[Ticket] | None:
        """The requests submitted since the last call, once there is something to do: a new request, or queued rows
        ready to run. None once the scheduler is closed and nothing is left."""
        with self._cond:
            while not self._inbox:
                if self._pending:
                    left = self._wait_left()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                elif self._closing:
                    return None
                else:
                    self._cond.wait()
            arrived, self._inbox = self._inbox, []
            return arrived

    def _admit(self, tickets: list[Ticket]) -> None:
        """Tokenise the requests and queue their rows; a request that fails to tokenise gets the error, and no rows.

        The texts of all the requests that arrived together are tokenised in one call (one per truncation setting):
        per request, the calls cost several times the tokenising itself once the event loop is busy.
        """
        live = []
        for ticket in tickets:
            if ticket.future.done():  # cancelled while it waited
                self._count_dropped(len(ticket.texts))
            else:
                live.append(ticket)
        for truncate in (True, False):
            group = [t for t in live if t.truncate == truncate]
            if not group:
                continue
            t0 = time.perf_counter()
            try:
                rows = self._tokenize([text for t in group for text in t.texts], truncate) if len(group) > 1 else None
            except Exception:  # one request's text is refused: tokenise each request alone to find whose
                rows = None
            if rows is None:
                for ticket in group:
                    try:
                        self._queue(ticket, self._tokenize(ticket.texts, truncate))
                    except Exception as e:  # TextTooLong and the like: the request's answer (a bug answers 500 there)
                        ticket.loop.call_soon_threadsafe(_fail, ticket.future, e)
            else:
                start = 0
                for ticket in group:
                    self._queue(ticket, rows[start : start + len(ticket.texts)])
                    start += len(ticket.texts)
            if self.metrics:
                self.metrics.tokenize_seconds.labels(self.name).observe(time.perf_counter() - t0)

    def _queue(self, ticket: Ticket, rows: list[Row]) -> None:
        ticket.rows, ticket.outputs, ticket.left = rows, [None] * len(rows), len(rows)
        for i, row in enumerate(rows):
            row.adapter = ticket.adapter
            item = _Item(len(row), next(self._seq), row, ticket, i)
            bisect.insort(self._pending, item)
            self._fifo.append(item)

    def _next_batch(self) -> list[_Item] | None:
        self._drop_cancelled()
        if not self._pending:
            return None
        while self._fifo[0].taken:
            self._fifo.popleft()
        lo, hi = pick_batch(self._pending, self._fifo[0], self.limits)
        batch = self._pending[lo:hi]
        del self._pending[lo:hi]
        for item in batch:
            item.taken = True
        return batch

    def _wait_left(self) -> float:
        """Seconds the queued rows may still wait for a fuller batch (max_wait_ms); 0 or less: run now."""
        wait = self.limits.max_wait_ms / 1000
        if not wait or self._closing or len(self._pending) >= self.limits.max_batch_rows:
            return 0.0
        oldest = min(item.ticket.enqueued for item in self._fifo if not item.taken)
        return oldest + wait - time.perf_counter()

    def _drop_cancelled(self) -> None:
        """Drop the rows of requests already answered: cancelled (client gone, timed out) or failed."""
        if any(item.ticket.future.done() for item in self._pending):
            kept = []
            for item in self._pending:
                if item.ticket.future.done():
                    item.taken = True
                    self._count_dropped(1)
                else:
                    kept.append(item)
            self._pending = kept
        while self._fifo and self._fifo[0].taken:
            self._fifo.popleft()

    def _count_dropped(self, rows: int) -> None:
        self.dropped += rows
        if self.metrics:
            self.metrics.dropped.labels(self.name).inc(rows)

    def _run_batch(self, batch: list[_Item]) -> None:
        start = time.perf_counter()
        if self.metrics:
            waited = self.metrics.queue_seconds.labels(self.name)
            for item in batch:
                waited.observe(start - item.ticket.enqueued)
        rows = [item.row for item in batch]
        try:
            with self._lock:
                t0 = time.perf_counter()
                outputs = self._run(rows)
                seconds = time.perf_counter() - t0
        except Exception as e:  # a bug or a broken model: every request of the batch fails, the worker goes on
            log.exception("model %s: a batch of %d rows failed", self.name, len(rows))
            for ticket in {id(item.ticket): item.ticket for item in batch}.values():
                ticket.loop.call_soon_threadsafe(_fail, ticket.future, e)
            return
        if self.metrics:
            self.metrics.observe_run(self.name, seconds, len(rows), len(rows) * max(len(r) for r in rows))
        for item, out in zip(batch, outputs, strict=True):
            ticket = item.ticket
            ticket.outputs[item.index] = out
            ticket.left -= 1
            if ticket.left == 0:
                ticket.loop.call_soon_threadsafe(_resolve, ticket.future, (ticket.rows, ticket.outputs))


def _resolve(future: asyncio.Future, value) -> None:
    if not future.done():  # cancelled while it ran
        future.set_result(value)


def _fail(future: asyncio.Future, error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
