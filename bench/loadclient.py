"""``python -m bench.loadclient < spec.json``: one closed-loop load cell against one HTTP server; prints a JSON result.

One process drives every connection with asyncio and raw HTTP/1.1 keep-alive over asyncio streams: the request
bytes are encoded once, and of each response only the status line and the Content-Length (or chunked framing) are
parsed, so that the client costs little CPU beside a server on the same cores. The result reports the client's own
CPU seconds, for that reason.

spec: ``{"host", "port", "path", "bodies": [str, ...], "concurrency", "warmup_s", "duration_s", "max_requests",
"drain_s", "timeout_s"}``. Each of ``concurrency`` connections sends its next request when the previous answer has
arrived, cycling through ``bodies`` (each client starting at its own offset). Requests started during the warm-up
are not measured. The measured window closes after ``duration_s`` or once ``max_requests`` measured requests have
been started, whichever comes first; requests still in flight then get ``drain_s`` more seconds to finish, and
those that do not are counted as ``unfinished``. Latencies and status counts are those of the requests sent in the
window; requests/s counts the 200 answers that arrived in it (as wrk does), so that neither the warm-up's requests
in flight at its start nor the drain at its end distort the rate.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time


def request_bytes(host: str, port: int, path: str, body: str) -> bytes:
    """One pre-encoded keep-alive POST of a JSON body."""
    data = body.encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    return head.encode("ascii") + data


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bool]:
    """Read one response; returns (status, server asked to close). Raises ConnectionError on a broken stream."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/"):
        raise ConnectionError(f"bad status line {lines[0][:60]!r}")
    status = int(parts[1])
    length, chunked, close = -1, False, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            close = b"close" in value.lower()
    if chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            await reader.readexactly(size + 2)  # the chunk and its CRLF
            if size == 0:
                break
    elif length >= 0:
        await reader.readexactly(length)
    else:  # no framing: the body runs to the end of the connection
        await reader.read()
        close = True
    return status, close


class Cell:
    """The shared state of one cell: the window, the counters and every measured latency."""

    def __init__(self, spec: dict) -> None:
        self.spec = spec
        self.requests = [request_bytes(spec["host"], spec["port"], spec.get("path", "/predict"), b) for b in spec["bodies"]]
        self.t0 = self.t1 = 0.0  # the measured window, set when the warm-up ends
        self.started = 0  # measured requests started
        self.closed = False  # no more requests are started once set
        self.latencies: dict[int, list[float]] = {}  # status -> seconds
        self.errors: dict[str, int] = {}  # "connect", "reset", "timeout", "unfinished"
        self.warmup_requests = 0
        self.in_window: dict[int, int] = {}  # status -> answers that arrived inside the window, whenever sent

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    async def connect(self):
        return await asyncio.open_connection(self.spec["host"], self.spec["port"])

    async def client(self, k: int) -> None:
        """One closed-loop connection: send, wait for the whole answer, send the next."""
        timeout = self.spec.get("timeout_s", 60.0)
        i = k * 7919  # a different offset per client, so that concurrent requests differ
        conn = None
        while not self.closed:
            if conn is None:
                try:
                    conn = await self.connect()
                except OSError:
                    if self.t0:
                        self.error("connect")
                    await asyncio.sleep(0.05)
                    continue
            reader, writer = conn
            start = time.perf_counter()
            measured = self.t0 > 0
            if measured:
                if self.started >= self.spec["max_requests"]:
                    self.closed = True
                    break
                self.started += 1
            payload = self.requests[i % len(self.requests)]
            i += 1
            status, close = 0, True
            try:
                async with asyncio.timeout(timeout):  # a timer handle, cheaper than wait_for's task
                    writer.write(payload)
                    status, close = await read_response(reader)
            except TimeoutError:
                failure = "timeout"
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                failure = "reset"
            except asyncio.CancelledError:  # the drain ran out with this request in flight
                if measured:
                    self.error("unfinished")
                writer.close()
                raise
            done = time.perf_counter()
            if status and 0 < self.t0 <= done and (not self.t1 or done <= self.t1):
                self.in_window[status] = self.in_window.get(status, 0) + 1
            if not status:
                if measured:
                    self.error(failure)
            elif measured:
                self.latencies.setdefault(status, []).append(done - start)
            else:
                self.warmup_requests += 1
            if close:
                writer.close()
                conn = None
        if conn is not None:
            conn[1].close()

    async def run(self) -> None:
        s = self.spec
        if s["warmup_s"] <= 0:  # every request is measured
            self.t0 = time.perf_counter()
        tasks = [asyncio.create_task(self.client(k)) for k in range(s["concurrency"])]
        if s["warmup_s"] > 0:
            await asyncio.sleep(s["warmup_s"])
            self.t0 = time.perf_counter()
        cpu0 = time.process_time()
        deadline = self.t0 + s["duration_s"]
        while time.perf_counter() < deadline and not self.closed:
            await asyncio.sleep(min(0.05, max(0.0, deadline - time.perf_counter())))
        self.closed = True
        self.t1 = time.perf_counter()
        _, pending = await asyncio.wait(tasks, timeout=s.get("drain_s", 30.0))
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        self.cpu_s = time.process_time() - cpu0
        self.end = time.perf_counter()


def percentile(xs: list[float], q: float) -> float:
    """The nearest-rank ``q`` quantile (0..1) of ``xs``."""
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, int(round(q * (len(xs) - 1)))))]


def summary(cell: Cell) -> dict:
    """Counts per status and latency percentiles (ms) of the requests sent in the window (those in flight at its end
    included once they finish); requests/s of the 200 answers that arrived in the window, whenever they were sent."""
    ok = cell.latencies.get(200, [])
    done = sum(len(v) for v in cell.latencies.values())
    span = max(cell.t1 - cell.t0, 1e-9)

    def pcts(xs: list[float]) -> dict:
        if not xs:
            return {"p50_ms": None, "p95_ms": None, "p99_ms": None, "max_ms": None}
        return {f"p{q}_ms": percentile(xs, q / 100) * 1e3 for q in (50, 95, 99)} | {"max_ms": max(xs) * 1e3}

    return {
        "concurrency": cell.spec["concurrency"],
        "requests": done,
        "status": {str(k): len(v) for k, v in sorted(cell.latencies.items())},
        "errors": dict(sorted(cell.errors.items())),
        "window_s": span,
        "requests_per_s": cell.in_window.get(200, 0) / span,  # 200 answers only
        "responses_per_s": sum(cell.in_window.values()) / span,
        "answers_in_window": {str(k): n for k, n in sorted(cell.in_window.items())},
        **pcts(ok),
        "all": pcts([x for v in cell.latencies.values() for x in v]),
        "by_status": {str(k): pcts(v) for k, v in sorted(cell.latencies.items()) if k != 200},
        "warmup_requests": cell.warmup_requests,
        "client_cpu_s": cell.cpu_s,
        "client_cpu_fraction": cell.cpu_s / max(cell.end - cell.t0, 1e-9),
        "client_cpu_us_per_request": cell.cpu_s / max(done, 1) * 1e6,
    }


def run_cell(spec: dict) -> dict:
    """Run one cell in this process (uvloop is not used: the stock asyncio loop, as everywhere here)."""
    cell = Cell(spec)
    asyncio.run(cell.run())
    return summary(cell)


def main() -> int:
    print(json.dumps(run_cell(json.load(sys.stdin))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
