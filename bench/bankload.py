"""``python -m bench.bankload --bank DIR --single RUN/export --run RUN``: what a bank costs against separate exports.

Both are served by ``python -m serve --models`` on loopback, on the same sentences (RUN's test split), in one run:

- memory: the server's resident memory (VmRSS) after the same warm-up of 100 requests spread over its models (every
  adapter answers at least one), for a bank of 1, 10 and 100 adapters and for 1 and 10 (``--separate``) separate
  single-adapter exports of the same base model;
- parity: the bank run by the server's runtime (the CUDA provider on a GPU host) against each adapter's own export;
- throughput: the load client (bench/loadclient.py, closed loop, 1-text requests) at concurrency 32 against the
  single export, and against the bank with the requests spread evenly over 1, 10 and 100 of its adapters.

A bank of N adapters is the exported bank's graph with N slots, filled from its adapters in turn (named
``ADAPTER.k``): the graph is the same for any N, and its cost does not depend on the values in the slots. Separate
exports are hard-linked copies of ``--single``. Each system runs ``--rounds`` times, the systems in turn; the tables
give each figure's median. Writes OUT/bankload.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

from adapters.errors import EdgetuneError
from bank import layout
from bench.loadtest import ProcSampler, Settings, free_port, run_client, server, test_texts
from serve.bank import BankClassifier
from serve.runtime import Classifier

SIZES = (1, 10, 100)
WARM = 100  # requests before the memory is read


def resized(bank: Path, n: int, out: Path) -> Path:
    """A copy of the bank folder ``bank`` at ``out`` with ``n`` slots, filled from its adapters in turn."""
    spec, entries, tensors = layout.read(bank)
    out.mkdir(parents=True)
    for f in bank.iterdir():
        if f.is_file() and f.name not in (layout.FILE, layout.ADAPTERS):
            os.link(f, out / f.name)
    picks = [i % len(entries) for i in range(n)]
    names = [f"{entries[i].name}.{k}" for k, i in enumerate(picks)]
    chosen = [
        layout.Entry(name, entries[i].labels, entries[i].sha256, entries[i].source) for name, i in zip(names, picks, strict=True)
    ]
    layout.write(out, spec, chosen, {k: v[picks] for k, v in tensors.items()})
    return out


def separate(single: Path, n: int, root: Path) -> list[str]:
    """``n`` hard-linked copies of the export folder ``single`` under ``root``; their model names."""
    names = []
    for k in range(n):
        d = root / f"single{k}"
        d.mkdir(parents=True)
        for f in single.iterdir():
            if f.is_file():
                os.link(f, d / f.name)
        names.append(d.name)
    return names


def post(port: int, body: dict) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/predict", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        r.read()


def serve_cmd(repo: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "serve", "--models", str(repo), "--host", "127.0.0.1", "--port", str(port)]


def measure(repo: Path, models: list[str], texts: list[str], settings: Settings, load: bool) -> dict:
    """Serve ``repo``; WARM requests cycling over ``models`` (every model answers at least one), then the RSS is read;
    with ``load``, one closed-loop cell at concurrency 32 with 1-text requests cycling over ``models``."""
    port = free_port()
    with server(repo.name, serve_cmd(repo, port), port, settings.startup_timeout_s) as s:
        for i in range(max(WARM, len(models))):  # the same warm-up for every system: the arena grows with it
            post(port, {"texts": [texts[i % len(texts)]], "model": models[i % len(models)]})
        time.sleep(0.5)
        row = {"models": len(models), "rss_mb": ProcSampler(s.proc.pid).rss_mb(), "startup_s": round(s.startup_s, 1)}
        if load:
            bodies = [json.dumps({"texts": [t], "model": models[i % len(models)]}) for i, t in enumerate(texts)]
            cell = run_client(port, bodies, 32, settings, s.proc.pid)
            row.update({"texts_per_s": cell["requests_per_s"], "p50_ms": cell["p50_ms"], "p99_ms": cell["p99_ms"],
                        "status": cell["status"], "loadavg_1m": cell["loadavg_1m"]})  # fmt: skip
            row["rss_max_mb"] = cell["server_rss_max_mb"]
    return row


def served_parity(bank: Path, texts: list[str], rows: int = 32) -> dict:
    """The bank as the server runs it (serve.bank, the best provider here: CUDA on a GPU host), ``rows`` texts per
    adapter shuffled into batches of 32 that mix adapters, against each adapter's own export (RUN/export beside
    RUN/adapter) on the CPU provider: the largest |logit difference| and the rows whose class differs."""
    served = BankClassifier(bank)
    want, items = {}, []
    for entry in served.state.entries:
        own = Path(entry.source).parent / "export"
        if Path(entry.source).name == "adapter" and (own / "model.onnx").is_file():
            single = Classifier(own, providers="cpu")
            want[entry.name] = single.run(single.rows(texts[:rows]))
            adapter = served.adapter(entry.name)
            for i, row in enumerate(served.rows(texts[:rows])):
                row.adapter = adapter
                items.append((entry.name, i, row))
    random.Random(0).shuffle(items)
    worst, differ = 0.0, 0
    for start in range(0, len(items), 32):
        batch = items[start : start + 32]
        for (name, i, _), got in zip(batch, served.run([row for _, _, row in batch]), strict=True):
            worst = max(worst, float(np.abs(got - want[name][i]).max()))
            differ += int(got.argmax() != want[name][i].argmax())
    return {
        "provider": served.provider,
        "max_abs_diff": worst,
        "argmax_differ": differ,
        "rows": len(items),
        "adapters": sorted(want),
    }


def bankload(
    bank: Path, single: Path, run: Path, sizes: tuple[int, ...], separates: tuple[int, ...], settings: Settings, rounds: int = 1
) -> dict:
    """Every system ``rounds`` times, in turn (each round starting one system later), and each figure's median."""
    texts = test_texts(run, settings.texts)
    result = {"bank": str(bank), "single": str(single), "sizes": list(sizes), "rounds": rounds}
    result["served_parity"] = served_parity(bank, texts)
    print(f"served bank vs own exports: {result['served_parity']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bankload-", dir=bank.parent) as tmp:
        systems = []  # (kind, count, repo, model names, load)
        for n in sizes:
            repo = Path(tmp) / f"bank{n}"
            resized(bank, n, repo / "bank")
            systems.append(("adapters", n, repo, [f"bank/{e.name}" for e in layout.read(repo / "bank")[1]], True))
        for n in separates:
            repo = Path(tmp) / f"separate{n}"
            systems.append(("exports", n, repo, separate(single, n, repo), n == 1))
        runs: dict[int, list[dict]] = {i: [] for i in range(len(systems))}
        for r in range(rounds):
            for k in range(len(systems)):
                i = (k + r) % len(systems)
                kind, n, repo, names, load = systems[i]
                row = measure(repo, names, texts, settings, load)
                runs[i].append(row)
                print(
                    f"round {r + 1}, {n} {'adapters in a bank' if kind == 'adapters' else 'separate exports'}: {row}", flush=True
                )
    result["bank_rows"], result["separate_rows"] = [], []
    for i, (kind, n, _, _, _) in enumerate(systems):
        rows = runs[i]
        med = {
            k: float(np.median([row[k] for row in rows])) for k in ("rss_mb", "texts_per_s", "p50_ms", "p99_ms") if k in rows[0]
        }
        entry = {kind: n, **med, "each_round": rows}
        result["bank_rows" if kind == "adapters" else "separate_rows"].append(entry)
    one = result["separate_rows"][0] if result["separate_rows"] else None
    if one:
        for r in result["bank_rows"]:
            r["throughput_vs_single_export"] = round(r["texts_per_s"] / one["texts_per_s"], 3) if one.get("texts_per_s") else None
            r["rss_vs_single_export"] = round(r["rss_mb"] / one["rss_mb"], 3)
    return result


def tables(result: dict) -> list[str]:
    lines = [
        "| bank adapters | server RSS MB | vs 1 export | texts/s at c32 | vs 1 export | p50 ms | p99 ms |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in result["bank_rows"]:
        lines.append(
            f"| {r['adapters']} | {r['rss_mb']:.0f} | {r.get('rss_vs_single_export')} | {r.get('texts_per_s', 0):.0f} | "
            f"{r.get('throughput_vs_single_export')} | {r.get('p50_ms', 0):.1f} | {r.get('p99_ms', 0):.1f} |"
        )
    lines += ["", "| separate exports | server RSS MB | texts/s at c32 |", "|---|---|---|"]
    for r in result["separate_rows"]:
        lines.append(
            f"| {r['exports']} | {r['rss_mb']:.0f} | {r['texts_per_s']:.0f} |"
            if "texts_per_s" in r
            else f"| {r['exports']} | {r['rss_mb']:.0f} | - |"
        )
    return lines


def csv_ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bankload", description=__doc__.split("\n\n")[0])
    ap.add_argument("--bank", type=Path, required=True, help="a bank export folder (python -m export --bank)")
    ap.add_argument("--single", type=Path, required=True, help="one adapter's own export folder, of the same base model")
    ap.add_argument("--run", type=Path, required=True, help="the run whose test sentences the requests send")
    ap.add_argument("--sizes", type=csv_ints, default=SIZES, help="bank sizes (default 1,10,100)")
    ap.add_argument("--separate", type=csv_ints, default=(1, 10), help="numbers of separate exports (default 1,10)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds per load cell")
    ap.add_argument("--rounds", type=int, default=3, help="times each system runs, in turn (medians are reported)")
    ap.add_argument("--out", type=Path, default=None, help="folder for bankload.json (default: the bank's parent)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    settings = Settings(duration_s=args.duration)
    try:
        result = bankload(args.bank, args.single, args.run, args.sizes, args.separate, settings, args.rounds)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = args.out or args.bank.parent
    out.mkdir(parents=True, exist_ok=True)
    (out / "bankload.json").write_text(json.dumps(result, indent=2))
    print("\n".join(tables(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
