"""``python -m bench.loadtest --run runs/NAME``: load test of the HTTP server against the alternatives, one export.

Every system runs in the same run on RUN/export and the same BANKING77 test sentences, on loopback only:

- ``serve``: ``python -m serve`` (batching across requests, where the server has it) plus ``--server-args``;
- ``serve_nobatch``: the same with ``--max-batch-rows 1`` (skipped, with a note, while the server lacks the flag);
- ``pipeline``: bench/pipeline_server.py, a transformers pipeline on the eager PyTorch adapter model behind the same
  Starlette/uvicorn, the server a user would otherwise write;
- ``onnx_offline``: the ceiling, RUN/export/model.onnx in an onnxruntime session built as the server builds it, on the
  same sentences at batch 1 and 8 and in length-grouped batches of 32, no HTTP.

Each HTTP cell (system x texts per request x concurrency) is one closed-loop run of bench/loadclient.py, one process
driving every connection, after a warm-up that is not counted, bounded by ``--duration`` and ``--max-requests``. Every
server is started on a free port, waited for (``GET /health``), and terminated at the end, on error too. The overload
scenario starts ``serve`` with ``--max-concurrent-requests Q`` and runs it at Q and at 4Q concurrent connections.

Writes RUN/bench/loadtest.json and RUN/bench/loadtest.png (or into ``--out``) and prints a table.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import onnxruntime as ort  # noqa: E402

from adapters.errors import EdgetuneError  # noqa: E402
from bench.timing import cpu_name  # noqa: E402
from serve.runtime import Classifier  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SYSTEMS = ("serve", "serve_nobatch", "pipeline", "onnx_offline")
HTTP_SYSTEMS = SYSTEMS[:3]
REJECT_GOAL_MS = 10.0  # a 429 should cost the client less than this


@dataclass(frozen=True)
class Settings:
    """What one load test runs; every HTTP cell is bounded by ``duration_s`` and ``max_requests``."""

    sizes: tuple[int, ...] = (1, 8)  # texts per request
    concurrency: tuple[int, ...] = (1, 8, 32, 128)
    duration_s: float = 10.0
    warmup_s: float = 1.0
    max_requests: int = 20_000
    drain_s: float = 20.0  # time for requests in flight when a cell's window closes
    timeout_s: float = 60.0  # one request
    texts: int = 512  # distinct test sentences the requests cycle through
    offline_budget_s: float = 3.0  # per offline batch size
    systems: tuple[str, ...] = SYSTEMS
    server_args: tuple[str, ...] = ()
    overload: bool = True
    overload_limit: int = 16
    startup_timeout_s: float = 180.0


# --- inputs -------------------------------------------------------------------------------------------------------


def test_texts(run_dir: Path, n: int) -> list[str]:
    """``n`` test sentences of the run's dataset (BANKING77 for the default run), shuffled with a fixed seed.

    Raises:
        EdgetuneError: the run is a tagger (the load test speaks the classifier's contract) or has no config.
    """
    # lazy: the driver's only torch and transformers imports; keeps `python -m bench.loadtest --help` fast
    from adapters.config import run_config
    from train.data import load_dataset

    cfg = run_config(run_dir)
    if cfg.task == "tagging":
        raise EdgetuneError(f"{run_dir} is a tagging run: the load test serves sequence classifiers")
    texts = list(load_dataset(cfg).test.texts)
    random.Random(0).shuffle(texts)
    return texts[:n]


def bodies(texts: list[str], size: int) -> list[str]:
    """Request bodies of ``size`` consecutive texts each, covering ``texts`` once."""
    return [json.dumps({"texts": texts[i : i + size]}) for i in range(0, len(texts) - size + 1, size)]


def serve_flags() -> set[str]:
    """The options ``python -m serve --help`` lists (to skip rows whose flag the server does not have yet)."""
    out = subprocess.run([sys.executable, "-m", "serve", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    return set(re.findall(r"--[a-z][a-z0-9-]*", out.stdout))


# --- server processes ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class Server:
    name: str
    cmd: list[str]
    port: int
    proc: subprocess.Popen
    startup_s: float = 0.0


@contextlib.contextmanager
def server(name: str, cmd: list[str], port: int, timeout_s: float) -> Iterator[Server]:
    """Start ``cmd`` (a server on 127.0.0.1:``port``), yield once ``GET /health`` is 200, terminate it at the end.

    Raises:
        EdgetuneError: the process exited or did not answer within ``timeout_s``; the message ends with its output.
    """
    with tempfile.TemporaryFile("w+") as log:
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            while not healthy(port):
                if proc.poll() is not None or time.perf_counter() - t > timeout_s:
                    log.seek(0)
                    tail = "".join(log.readlines()[-15:])
                    why = (
                        f"exited with status {proc.returncode}" if proc.poll() is not None else f"no /health in {timeout_s:.0f} s"
                    )
                    raise EdgetuneError(f"{name} server ({shlex.join(cmd)}) {why}:\n{tail}")
                time.sleep(0.2)
            yield Server(name, cmd, port, proc, time.perf_counter() - t)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


class ProcSampler:
    """Samples a process's resident memory (VmRSS) while a cell runs, and its CPU time over the cell (/proc)."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        self.pid, self.every_s = pid, every_s
        self.rss_max_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def rss_mb(self) -> float:
        try:
            for line in open(f"/proc/{self.pid}/status"):
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    def cpu_s(self) -> float:
        try:
            fields = open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
        except (OSError, IndexError, ValueError):
            return 0.0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.rss_max_mb = max(self.rss_max_mb, self.rss_mb())
            self._stop.wait(self.every_s)

    def __enter__(self) -> ProcSampler:
        self._cpu0 = self.cpu_s()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.server_cpu_s = self.cpu_s() - self._cpu0


def system_commands(run_dir: Path, settings: Settings, flags: set[str]) -> dict[str, tuple[list[str] | None, str]]:
    """name -> (command line with a ``{port}`` placeholder, or None when skipped; a note)."""
    export_dir = str(run_dir / "export")
    serve = [sys.executable, "-m", "serve", "--export", export_dir, "--host", "127.0.0.1", "--port", "{port}"]
    batching = "--max-batch-rows" in flags
    out = {
        "serve": (
            [*serve, *settings.server_args],
            "batching across requests" if batching else "no batching across requests in this server (no --max-batch-rows)",
        ),
        "serve_nobatch": (
            [*serve, *settings.server_args, "--max-batch-rows", "1"] if batching else None,
            "--max-batch-rows 1" if batching else "skipped: python -m serve has no --max-batch-rows yet",
        ),
        "pipeline": (
            [sys.executable, "-m", "bench.pipeline_server", "--run", str(run_dir), "--host", "127.0.0.1", "--port", "{port}"],
            "transformers pipeline on the eager adapter model, Starlette thread pool, one request per thread",
        ),
    }
    return {k: v for k, v in out.items() if k in settings.systems}


# --- cells --------------------------------------------------------------------------------------------------------


def run_client(port: int, request_bodies: list[str], concurrency: int, settings: Settings, pid: int) -> dict:
    """One cell: bench/loadclient.py in its own process against 127.0.0.1:``port``, the server ``pid`` sampled."""
    spec = {
        "host": "127.0.0.1",
        "port": port,
        "path": "/predict",
        "bodies": request_bodies,
        "concurrency": concurrency,
        "warmup_s": settings.warmup_s,
        "duration_s": settings.duration_s,
        "max_requests": settings.max_requests,
        "drain_s": settings.drain_s,
        "timeout_s": settings.timeout_s,
    }
    limit = settings.warmup_s + settings.duration_s + settings.drain_s + 60
    with ProcSampler(pid) as sampler:
        try:
            out = subprocess.run(
                [sys.executable, "-m", "bench.loadclient"],
                cwd=ROOT,
                input=json.dumps(spec),
                capture_output=True,
                text=True,
                timeout=limit,
            )
        except subprocess.TimeoutExpired:
            raise EdgetuneError(f"the load client did not finish in {limit:.0f} s") from None
    if out.returncode != 0:
        raise EdgetuneError(f"the load client failed (status {out.returncode}):\n{out.stderr[-2000:]}")
    cell = json.loads(out.stdout)
    cell["server_rss_max_mb"] = sampler.rss_max_mb
    cell["server_cpu_s"] = sampler.server_cpu_s
    cell["loadavg_1m"] = os.getloadavg()[0]  # at the cell's end: other work on a shared machine shows here
    return cell


def http_row(system: str, size: int, cell: dict) -> dict:
    ok = cell["status"].get("200", 0)
    return {
        "system": system,
        "texts_per_request": size,
        **cell,
        "texts_per_s": cell["requests_per_s"] * size,
        "status_5xx": sum(n for s, n in cell["status"].items() if s.startswith("5")),
        "server_cpu_ms_per_text": cell["server_cpu_s"] / max(ok * size, 1) * 1e3,
    }


# --- the ceiling: the graph alone ---------------------------------------------------------------------------------


def offline_ceiling(export_dir: Path, texts: list[str], server_args: tuple[str, ...], budget_s: float) -> list[dict]:
    """texts/s of the ONNX graph alone (session.run on pre-tokenised feeds) and of the in-process classify() (tokenise,
    run, softmax, labels), at batch 1 and 8 over ``texts`` in order, and in length-grouped batches of 32. The session is
    the server's own: serve.runtime.Classifier with the precision, provider, max length and threads of ``server_args``
    (threads: the server's default, the cores this process may use, where the Classifier takes a thread count)."""
    ap = argparse.ArgumentParser(add_help=False)
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--provider", default="auto")
    ap.add_argument("--max-length", type=int, default=None)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    known, _ = ap.parse_known_args(list(server_args))
    kw = {"threads": known.threads} if "threads" in inspect.signature(Classifier).parameters else {}
    clf = Classifier(export_dir, providers=known.provider, max_length=known.max_length, precision=known.precision, **kw)
    by_length = sorted(texts, key=lambda t: len(clf.tokenizer.encode(t).ids))
    groups = [("in order", 1, texts), ("in order", 8, texts), ("length-grouped", 32, by_length)]
    rows = []
    for grouping, b, pool in groups:
        chunks = [pool[i : i + b] for i in range(0, len(pool) - b + 1, b)]
        feeds = [clf.encode(c) for c in chunks]
        graph = throughput(lambda i, f=feeds: clf.session.run(["logits"], f[i % len(f)]), b, budget_s)
        full = throughput(lambda i, c=chunks: clf.classify(c[i % len(c)]), b, budget_s)
        rows.append(
            {
                "system": "onnx_offline",
                "batch": b,
                "grouping": grouping,
                "threads": kw.get("threads", "onnxruntime default"),
                "mean_padded_tokens": sum(f["input_ids"].shape[1] for f in feeds) / len(feeds),
                "texts_per_s": graph,
                "in_process_classify_texts_per_s": full,
                "loadavg_1m": os.getloadavg()[0],
            }
        )
    return rows


def throughput(fn, batch: int, budget_s: float) -> float:
    """texts/s of ``fn(i)`` (i = 0, 1, ...) over ``budget_s`` seconds, after 3 uncounted calls."""
    for i in range(3):
        fn(i)
    n, start = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - start < budget_s:
        fn(n)
        n += 1
    return n * batch / (time.perf_counter() - start)


# --- the run ------------------------------------------------------------------------------------------------------


def run_system(name: str, cmd: list[str], settings: Settings, cells: list[tuple[int, int, list[str]]]) -> tuple[dict, list[dict]]:
    """Start one server, run ``cells`` (texts per request, concurrency, bodies) against it; (system info, rows)."""
    port = free_port()
    cmd = [a.replace("{port}", str(port)) for a in cmd]
    rows = []
    with server(name, cmd, port, settings.startup_timeout_s) as srv:
        for size, conc, request_bodies in cells:
            row = http_row(name, size, run_client(port, request_bodies, conc, settings, srv.proc.pid))
            rows.append(row)
            print(format_row(row), flush=True)
    info = {
        "cmd": shlex.join(cmd),
        "startup_s": srv.startup_s,
        "rss_max_mb": max((r["server_rss_max_mb"] for r in rows), default=0),
    }
    return info, rows


def overload(run_dir: Path, settings: Settings, flags: set[str], texts: list[str]) -> dict:
    """``serve --max-concurrent-requests Q`` at Q, then 4Q, concurrent 1-text requests: how fast rejections are, what
    happens to the accepted requests' p99, 5xx answers, resident memory. Rejected clients retry at once (closed loop,
    Retry-After not honoured): the worst case for the server."""
    q = settings.overload_limit
    if "--max-concurrent-requests" not in flags:
        return {"skipped": "python -m serve has no --max-concurrent-requests yet", "limit": q}
    cmd, _ = system_commands(run_dir, Settings(systems=("serve",), server_args=settings.server_args), flags)["serve"]
    cmd = [*cmd, "--max-concurrent-requests", str(q)]
    info, (at_q, at_4q) = run_system("serve_overload", cmd, settings, [(1, q, bodies(texts, 1)), (1, 4 * q, bodies(texts, 1))])
    rejected = at_4q["by_status"].get("429", {})
    return {
        "limit": q,
        **info,
        "rows": [at_q, at_4q],
        "rejected_429": at_4q["status"].get("429", 0),
        "rejected_p50_ms": rejected.get("p50_ms"),
        "rejected_p99_ms": rejected.get("p99_ms"),
        "rejected_goal_ms": REJECT_GOAL_MS,
        "rejected_within_goal": rejected.get("p99_ms") is not None and rejected["p99_ms"] < REJECT_GOAL_MS,
        "accepted_p99_ms_at_q": at_q["p99_ms"],
        "accepted_p99_ms_at_4q": at_4q["p99_ms"],
        "accepted_p99_ratio_4q_over_q": ratio(at_4q["p99_ms"], at_q["p99_ms"]),
        "status_5xx": at_q["status_5xx"] + at_4q["status_5xx"],
        "server_rss_max_mb": info["rss_max_mb"],
    }


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def ratios(rows: list[dict], offline: list[dict]) -> dict:
    """texts/s of serve over each alternative at concurrency 32 with 1-text requests; serve's p99/p50 at concurrency 8."""

    def cell(system: str, size: int, conc: int) -> dict:
        return next((r for r in rows if (r["system"], r["texts_per_request"], r["concurrency"]) == (system, size, conc)), {})

    serve32 = cell("serve", 1, 32).get("texts_per_s")
    best = max((r["texts_per_s"] for r in offline), default=None)
    b1 = next((r["texts_per_s"] for r in offline if r["batch"] == 1), None)
    out = {
        "serve_over_serve_nobatch_c32_1text": ratio(serve32, cell("serve_nobatch", 1, 32).get("texts_per_s")),
        "serve_over_pipeline_c32_1text": ratio(serve32, cell("pipeline", 1, 32).get("texts_per_s")),
        "serve_over_onnx_offline_best_c32_1text": ratio(serve32, best),
        "serve_over_onnx_offline_batch1_c32_1text": ratio(serve32, b1),
    }
    for size in (1, 8):
        c8 = cell("serve", size, 8)
        out[f"serve_p99_over_p50_c8_{size}text"] = ratio(c8.get("p99_ms"), c8.get("p50_ms"))
    return out


def breakdown(rows: list[dict], offline: list[dict]) -> dict:
    """Where one 1-text request's time goes, serve at concurrency 1 (ms): the graph run alone, the in-process
    classify() (plus tokenising and reading back), the server process's CPU per request, and the client's p50."""
    b1 = next((r for r in offline if r["batch"] == 1), None)
    c1 = next((r for r in rows if (r["system"], r["texts_per_request"], r["concurrency"]) == ("serve", 1, 1)), None)
    return {
        "graph_ms": 1e3 / b1["texts_per_s"] if b1 else None,
        "in_process_classify_ms": 1e3 / b1["in_process_classify_texts_per_s"] if b1 else None,
        "server_cpu_ms_per_request": c1["server_cpu_ms_per_text"] if c1 else None,
        "http_p50_ms": c1["p50_ms"] if c1 else None,
    }


def loadtest(run_dir: Path, settings: Settings) -> dict:
    """Run every system and the overload scenario; returns the result that save() writes."""
    export_dir = run_dir / "export"
    if not (export_dir / "model.onnx").is_file():
        raise EdgetuneError(f"{export_dir}/model.onnx is missing (run `make export RUN={run_dir}` first)")
    if "pipeline" in settings.systems and not (run_dir / "adapter").is_dir():
        raise EdgetuneError(f"{run_dir}/adapter is missing: the pipeline server loads the eager adapter model")
    texts = test_texts(run_dir, settings.texts)
    flags = serve_flags()
    cells = [(size, conc, bodies(texts, size)) for size in settings.sizes for conc in settings.concurrency]
    systems, rows = {}, []
    print(HEADER, flush=True)
    for name, (cmd, note) in system_commands(run_dir, settings, flags).items():
        if cmd is None:
            print(f"{name}: {note}", flush=True)
            systems[name] = {"skipped": note}
            continue
        info, got = run_system(name, cmd, settings, cells)
        systems[name] = {"note": note, **info}
        rows += got
    offline = []
    if "onnx_offline" in settings.systems:
        offline = offline_ceiling(export_dir, texts, settings.server_args, settings.offline_budget_s)
        for r in offline:
            print(format_offline(r), flush=True)
        systems["onnx_offline"] = {"note": "the graph alone (session.run on pre-tokenised feeds), this process, no HTTP"}
    over = overload(run_dir, settings, flags, texts) if settings.overload else {"skipped": "--no-overload"}
    if over.get("skipped"):
        print(f"overload: {over['skipped']}", flush=True)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    return {
        "run": str(run_dir),
        "method": manifest["method"],
        "device": cpu_name(),
        "cpu_count": os.cpu_count(),
        "onnxruntime": ort.__version__,
        "texts": {"source": "test split of the run's dataset, shuffled (seed 0)", "distinct": len(texts)},
        "settings": asdict(settings),
        "client": "bench/loadclient.py: one process, asyncio streams, HTTP/1.1 keep-alive, closed loop per connection",
        "systems": systems,
        "rows": rows,
        "offline": offline,
        "overload": over,
        "ratios": ratios(rows, offline),
        "breakdown_1text": breakdown(rows, offline),
        "client_cpu_s_total": sum(r["client_cpu_s"] for r in rows + over.get("rows", [])),
    }


# --- report -------------------------------------------------------------------------------------------------------

HEADER = (
    f"{'system':15} {'texts':>5} {'conc':>4} | {'req/s':>8} {'texts/s':>8} | {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} | "
    f"{'srv cpu':>7} {'rss MB':>6} {'cli cpu':>7} | statuses, errors"
)


def format_row(r: dict) -> str:
    def ms(x):
        return f"{x:8.1f}" if x is not None else f"{'-':>8}"

    statuses = " ".join(f"{s}:{n}" for s, n in r["status"].items()) or "none"
    errors = " ".join(f"{k}:{n}" for k, n in r["errors"].items())
    return (
        f"{r['system']:15} {r['texts_per_request']:>5} {r['concurrency']:>4} | {r['requests_per_s']:8.1f} {r['texts_per_s']:8.1f} | "
        f"{ms(r['p50_ms'])} {ms(r['p95_ms'])} {ms(r['p99_ms'])} | {r['server_cpu_ms_per_text']:5.2f}ms {r['server_rss_max_mb']:6.0f} "
        f"{r['client_cpu_fraction']:6.0%} | {statuses}{' ' + errors if errors else ''}"
    )


def format_offline(r: dict) -> str:
    return (
        f"{'onnx_offline':15} {r['batch']:>5} {'-':>4} | {'':8} {r['texts_per_s']:8.1f} | {r['grouping']}, "
        f"{r['mean_padded_tokens']:.1f} tokens per row; in-process classify() {r['in_process_classify_texts_per_s']:.1f} texts/s"
    )


def summary_lines(result: dict) -> list[str]:
    lines = []
    for k, v in result["ratios"].items():
        lines.append(f"{k}: {v:.2f}" if v is not None else f"{k}: - (a system was skipped)")
    o = result["overload"]
    if not o.get("skipped"):

        def ms(x):
            return f"{x:.1f} ms" if x is not None else "-"

        lines.append(
            f"overload (limit {o['limit']}, {4 * o['limit']} connections): {o['rejected_429']} x 429 at p50 {ms(o['rejected_p50_ms'])}, "
            f"p99 {ms(o['rejected_p99_ms'])} (goal < {o['rejected_goal_ms']:.0f} ms); accepted p99 {ms(o['accepted_p99_ms_at_4q'])} vs "
            f"{ms(o['accepted_p99_ms_at_q'])} at {o['limit']}; 5xx: {o['status_5xx']}; server RSS max {o['server_rss_max_mb']:.0f} MB"
        )
    b = result["breakdown_1text"]
    if all(v is not None for v in b.values()):
        lines.append(
            f"serve, 1 text, concurrency 1: graph {b['graph_ms']:.2f} ms, in-process classify {b['in_process_classify_ms']:.2f} ms, "
            f"server CPU {b['server_cpu_ms_per_request']:.2f} ms per request, HTTP p50 {b['http_p50_ms']:.2f} ms"
        )
    lines.append(f"client CPU: {result['client_cpu_s_total']:.1f} s over all cells")
    return lines


def plot(result: dict, path: Path) -> None:
    """texts/s (top) and p99 latency (bottom) against concurrency, per system, one column per request size."""
    # optional: matplotlib is the [bench] extra, only the plot needs it
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")

    sizes = sorted({r["texts_per_request"] for r in result["rows"]}) or [1]
    fig, axes = plt.subplots(2, len(sizes), figsize=(5.5 * len(sizes), 7), squeeze=False)
    for j, size in enumerate(sizes):
        top, bottom = axes[0][j], axes[1][j]
        for system in HTTP_SYSTEMS:
            rows = sorted(
                (r for r in result["rows"] if r["system"] == system and r["texts_per_request"] == size),
                key=lambda r: r["concurrency"],
            )
            if not rows:
                continue
            x = [r["concurrency"] for r in rows]
            top.plot(x, [r["texts_per_s"] for r in rows], "o-", label=system)
            bottom.plot(x, [r["p99_ms"] if r["p99_ms"] is not None else float("nan") for r in rows], "o-", label=system)
        for r, style in zip(result["offline"], (":", "--", "-."), strict=False):
            top.axhline(
                r["texts_per_s"], color="gray", linestyle=style, label=f"onnx_offline batch {r['batch']} ({r['grouping']})"
            )
        top.set_title(f"{size} text(s) per request", fontsize=10)
        top.set_ylabel("texts/s (200 answers)")
        bottom.set_ylabel("p99 latency (ms, log)")
        bottom.set_yscale("log")
        conc = sorted({r["concurrency"] for r in result["rows"]})
        for ax in (top, bottom):
            ax.set_xscale("log", base=2)
            ax.set_xticks(conc, [str(c) for c in conc])
            ax.minorticks_off()
            ax.set_xlabel("concurrent connections (closed loop)")
            ax.grid(alpha=0.3)
        top.legend(fontsize=7)
    fig.suptitle(f"{result['method']}: load test on {result['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(out_dir: Path, result: dict) -> None:
    """out_dir/loadtest.json and loadtest.png, each written beside its place and renamed into it (RUN/bench may
    hold make bench's files: they are left alone)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, write in (
        ("loadtest.json", lambda p: p.write_text(json.dumps(result, indent=2))),
        ("loadtest.png", lambda p: plot(result, p)),
    ):
        tmp = out_dir / f".{name}.{os.getpid()}.tmp{Path(name).suffix}"
        try:
            write(tmp)
            os.replace(tmp, out_dir / name)
        finally:
            tmp.unlink(missing_ok=True)


def csv_ints(s: str) -> tuple[int, ...]:
    try:
        values = tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{s!r}: give positive integers")
    return values


def csv_systems(s: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in s.split(",") if x.strip())
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown system(s) {unknown}; choose from {','.join(SYSTEMS)}")
    return names


def main(argv: list[str] | None = None) -> int:
    d = Settings()
    ap = argparse.ArgumentParser(
        prog="python -m bench.loadtest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--run", default="runs/default", help="run folder with export/ (and adapter/ for the pipeline server)")
    ap.add_argument("--out", default=None, help="folder for loadtest.json and loadtest.png (default: RUN/bench)")
    ap.add_argument("--duration", type=float, default=d.duration_s, help="measured seconds per cell (default %(default)s)")
    ap.add_argument("--warmup", type=float, default=d.warmup_s, help="uncounted seconds before each cell (default %(default)s)")
    ap.add_argument(
        "--max-requests", type=int, default=d.max_requests, help="measured requests per cell at most (default %(default)s)"
    )
    ap.add_argument(
        "--drain", type=float, default=d.drain_s, help="seconds for requests in flight at a cell's end (default %(default)s)"
    )
    ap.add_argument("--timeout", type=float, default=d.timeout_s, help="seconds one request may take (default %(default)s)")
    ap.add_argument("--concurrency", type=csv_ints, default=d.concurrency, help="connections per cell (default 1,8,32,128)")
    ap.add_argument("--sizes", type=csv_ints, default=d.sizes, help="texts per request (default 1,8)")
    ap.add_argument("--texts", type=int, default=d.texts, help="distinct test sentences to cycle through (default %(default)s)")
    ap.add_argument("--systems", type=csv_systems, default=d.systems, help=f"subset of {','.join(SYSTEMS)} (default: all)")
    ap.add_argument("--server-args", default="", help="extra arguments for python -m serve, one shell-quoted string")
    ap.add_argument(
        "--offline-budget", type=float, default=d.offline_budget_s, help="seconds per offline batch size (default %(default)s)"
    )
    ap.add_argument("--overload", action=argparse.BooleanOptionalAction, default=True, help="the overload scenario (default: on)")
    ap.add_argument(
        "--overload-limit", type=int, default=d.overload_limit, help="--max-concurrent-requests Q of the overload scenario"
    )
    ap.add_argument(
        "--startup-timeout", type=float, default=d.startup_timeout_s, help="seconds a server may take to answer /health"
    )
    args = ap.parse_args(argv)
    settings = Settings(
        sizes=args.sizes,
        concurrency=args.concurrency,
        duration_s=args.duration,
        warmup_s=args.warmup,
        max_requests=args.max_requests,
        drain_s=args.drain,
        timeout_s=args.timeout,
        texts=args.texts,
        offline_budget_s=args.offline_budget,
        systems=args.systems,
        server_args=tuple(shlex.split(args.server_args)),
        overload=args.overload,
        overload_limit=args.overload_limit,
        startup_timeout_s=args.startup_timeout,
    )
    run_dir = Path(args.run)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # a terminated load test still stops its servers
    try:
        result = loadtest(run_dir, settings)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for line in summary_lines(result):
        print(line)
    out_dir = Path(args.out) if args.out else run_dir / "bench"
    save(out_dir, result)
    print(f"device: {result['device']}; wrote {out_dir}/loadtest.json and loadtest.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
