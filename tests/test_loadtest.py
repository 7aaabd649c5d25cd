"""make loadtest's machinery: every system and cell on a tiny export with tiny durations, and the client's accounting of
statuses, connection errors and its request bound against a test app whose answers are known."""

import contextlib
import json
import threading
import time
from collections import Counter

import pytest

from bench.loadclient import run_cell
from bench.loadtest import bodies, main, serve_flags
from tests.helpers import free_port


def ordered(cell: dict) -> bool:
    return cell["p50_ms"] <= cell["p95_ms"] <= cell["p99_ms"] <= cell["max_ms"]


def test_loadtest_writes_every_cell_json_and_plot(exported, tmp_path, capsys):
    run = exported("tiny", "p_tuning_v2")
    out = tmp_path / "out"
    argv = ["--run", str(run), "--out", str(out), "--duration", "0.4", "--warmup", "0", "--drain", "30", "--texts", "64"]
    assert main([*argv, "--offline-budget", "0.05", "--overload-limit", "2"]) == 0
    result = json.loads((out / "loadtest.json").read_text())
    assert (out / "loadtest.png").stat().st_size > 1000
    flags = serve_flags()
    systems = ["serve", "pipeline"] + (["serve_nobatch"] if "--max-batch-rows" in flags else [])
    if "--max-batch-rows" not in flags:
        assert "skipped" in result["systems"]["serve_nobatch"]
    cells = {(r["system"], r["texts_per_request"], r["concurrency"]) for r in result["rows"]}
    assert cells == {(s, n, c) for s in systems for n in (1, 8) for c in (1, 8, 32, 128)}
    for r in result["rows"]:
        # warm-up 0: every connection's first request is measured, and every request drains
        assert r["requests"] >= r["concurrency"] and r["status"] == {"200": r["requests"]} and not r["errors"], r
        assert ordered(r) and r["p50_ms"] > 0
        assert abs(r["texts_per_s"] - r["requests_per_s"] * r["texts_per_request"]) < 1e-6
        assert r["server_rss_max_mb"] > 10 and r["client_cpu_s"] >= 0
    assert [(r["batch"], r["grouping"]) for r in result["offline"]] == [(1, "in order"), (8, "in order"), (32, "length-grouped")]
    assert all(r["texts_per_s"] > 0 and r["in_process_classify_texts_per_s"] > 0 for r in result["offline"])
    ratios = result["ratios"]
    for key in ("serve_over_pipeline_c32_1text", "serve_over_onnx_offline_best_c32_1text", "serve_p99_over_p50_c8_1text"):
        assert ratios[key] is not None and ratios[key] > 0, key
    assert ratios["serve_p99_over_p50_c8_1text"] >= 1
    assert (ratios["serve_over_serve_nobatch_c32_1text"] is not None) == ("--max-batch-rows" in flags)
    over = result["overload"]
    if "--max-concurrent-requests" in flags:
        at_q, at_4q = over["rows"]
        assert (at_q["concurrency"], at_4q["concurrency"]) == (2, 8)
        assert at_4q["status"].get("200", 0) > 0 and over["rejected_429"] > 0 and over["status_5xx"] == 0
        assert over["rejected_p50_ms"] <= over["rejected_p99_ms"] and over["server_rss_max_mb"] > 10
    else:
        assert "skipped" in over
    printed = capsys.readouterr().out
    assert "texts/s" in printed and "serve_over_pipeline_c32_1text" in printed


@contextlib.contextmanager
def answering_app():
    """A Starlette app on a free port: texts ["reject"] -> 429 (Retry-After), ["boom"] -> 503 closing the connection,
    anything else -> 200. Yields (port, Counter of the statuses it sent)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    sent: Counter = Counter()

    async def predict(request: Request) -> JSONResponse:
        text = json.loads(await request.body())["texts"][0]
        if text == "reject":
            status, headers = 429, {"Retry-After": "1"}
        elif text == "boom":
            status, headers = 503, {"Connection": "close"}
        else:
            status, headers = 200, {}
        sent[status] += 1
        return JSONResponse({"predictions": [{"label": "x", "score": 1.0, "top": []}]}, status_code=status, headers=headers)

    port = free_port()
    app = Starlette(routes=[Route("/predict", predict, methods=["POST"])])
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not srv.started:
        assert time.time() < deadline and thread.is_alive(), "the test app did not start"
        time.sleep(0.05)
    try:
        yield port, sent
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def spec(port: int, texts: list[str], **kw) -> dict:
    base = {"host": "127.0.0.1", "port": port, "bodies": bodies(texts, 1), "concurrency": 4, "warmup_s": 0, "duration_s": 0.5}
    return base | {"max_requests": 100_000, "drain_s": 10, "timeout_s": 10} | kw


def test_client_counts_each_status_as_the_server_sent_it():
    with answering_app() as (port, sent):
        cell = run_cell(spec(port, ["ok", "reject", "boom", "ok", "reject"]))
    assert cell["status"] == {str(k): n for k, n in sorted(sent.items())}
    assert set(cell["status"]) == {"200", "429", "503"} and not cell["errors"]
    assert cell["requests"] == sum(sent.values()) and cell["warmup_requests"] == 0
    assert cell["requests_per_s"] == pytest.approx(cell["answers_in_window"]["200"] / cell["window_s"])
    assert all(0 < n <= cell["status"][s] for s, n in cell["answers_in_window"].items())  # warm-up 0: all measured
    assert all(ordered(cell["by_status"][s]) for s in ("429", "503")) and "200" not in cell["by_status"]
    assert cell["client_cpu_s"] > 0 and 0 < cell["client_cpu_fraction"] < 1.5


def test_client_stops_at_max_requests():
    with answering_app() as (port, sent):
        t = time.perf_counter()
        cell = run_cell(spec(port, ["ok"], duration_s=30, max_requests=40))
    assert cell["requests"] == 40 == sent[200] and time.perf_counter() - t < 20


def test_client_counts_connection_errors_apart_from_statuses():
    cell = run_cell(spec(free_port(), ["ok"], duration_s=0.3))  # nothing listens there
    assert cell["status"] == {} and cell["requests"] == 0 and cell["errors"]["connect"] > 0 and cell["p99_ms"] is None
