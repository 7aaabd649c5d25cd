"""``python -m bench --run runs/NAME``: latency of the eager adapter model vs the ONNX export.

Writes RUN/bench/bench.json and RUN/bench/latency.png and prints a table. Both models see the same token ids:
``seq128`` rows are 128 real tokens (dev sentences joined), ``dev`` rows are dev sentences padded to the batch's longest.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from train.errors import EdgetuneError  # noqa: E402

BATCHES = (1, 8, 32)


def timed(fn, budget_s: float, min_iters: int = 10, max_iters: int = 300) -> list[float]:
    """Call ``fn`` (after 3 warm-up calls) until the budget is spent; returns milliseconds per call."""
    for _ in range(3):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < max_iters and (len(times) < min_iters or time.perf_counter() - start < budget_s):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return times


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def make_inputs(tok, texts: list[str], batch: int, kind: str, max_length: int):
    import numpy as np

    if kind == "seq128":
        joined = " ".join(texts)
        words = joined.split()
        rows = []
        for b in range(batch):  # different 128-token windows of real text
            window = " ".join(words[b * 40 : b * 40 + 400])
            rows.append(tok(window, truncation=True, max_length=128, padding="max_length")["input_ids"])
        ids = np.asarray(rows, dtype=np.int64)
        return ids, np.ones_like(ids)
    enc = tok(texts[:batch], padding=True, truncation=True, max_length=max_length, return_tensors="np")
    return enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)


def measure_cell(eager, session, ids, mask, device, budget_s: float) -> tuple[list[float], list[float]]:
    """Milliseconds per call of the eager model and of the onnxruntime session on the same inputs."""
    import torch

    tids, tmask = torch.from_numpy(ids).to(device), torch.from_numpy(mask).to(device)
    feeds = {"input_ids": ids, "attention_mask": mask}

    def run_eager():
        with torch.inference_mode():
            eager(tids, tmask)
        if device.type == "cuda":
            torch.cuda.synchronize()

    return timed(run_eager, budget_s), timed(lambda: session.run(["logits"], feeds), budget_s)


def bench_run(run_dir: Path, budget_s: float = 1.5, batches=BATCHES) -> dict:
    import onnxruntime as ort
    import torch
    from transformers import AutoTokenizer

    from export.__main__ import parity_texts
    from export.eager import load_adapter_model

    export_dir = run_dir / "export"
    if not (export_dir / "model.onnx").is_file():
        raise EdgetuneError(f"{export_dir}/model.onnx is missing (run `make export RUN={run_dir}` first)")
    manifest = json.loads((export_dir / "manifest.json").read_text())
    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    device = torch.device("cuda" if cuda else "cpu")
    eager = load_adapter_model(run_dir / "adapter", manifest["base_model"]).to(device)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(export_dir / "model.onnx"), opts, providers=providers)
    tok = AutoTokenizer.from_pretrained(export_dir)
    texts = parity_texts(run_dir, [], n=256)
    rows = []
    for kind in ("seq128", "dev"):
        for b in batches:
            ids, mask = make_inputs(tok, texts, b, kind, manifest["max_length"])
            e, o = measure_cell(eager, session, ids, mask, device, budget_s)
            row = {
                "inputs": kind,
                "batch": b,
                "seq_len": int(ids.shape[1]),
                "eager_p50_ms": statistics.median(e),
                "eager_p95_ms": pct(e, 0.95),
                "onnx_p50_ms": statistics.median(o),
                "onnx_p95_ms": pct(o, 0.95),
            }
            row["ratio_eager_over_onnx"] = row["eager_p50_ms"] / row["onnx_p50_ms"]
            row["onnx_samples_per_s"] = b / row["onnx_p50_ms"] * 1e3
            row["eager_samples_per_s"] = b / row["eager_p50_ms"] * 1e3
            rows.append(row)
            print(format_row(row), flush=True)
    return {
        "method": manifest["method"],
        "device": gpu_name() if cuda else cpu_name(),
        "provider": session.get_providers()[0],
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "rows": rows,
    }


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def gpu_name() -> str:
    import torch

    return torch.cuda.get_device_name()


HEADER = f"{'inputs':7} {'batch':>5} {'seq':>4} | {'eager p50':>9} {'p95':>8} | {'onnx p50':>9} {'p95':>8} | {'eager/onnx':>10} | {'onnx/s':>8}"


def format_row(r: dict) -> str:
    return (
        f"{r['inputs']:7} {r['batch']:>5} {r['seq_len']:>4} | {r['eager_p50_ms']:9.2f} {r['eager_p95_ms']:8.2f} | "
        f"{r['onnx_p50_ms']:9.2f} {r['onnx_p95_ms']:8.2f} | {r['ratio_eager_over_onnx']:9.2f}x | {r['onnx_samples_per_s']:8.0f}"
    )


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"{r['inputs']}\nb{r['batch']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar([i - 0.2 for i in x], [r["eager_p50_ms"] for r in rows], 0.4, label="eager PyTorch (p50)")
    ax.bar([i + 0.2 for i in x], [r["onnx_p50_ms"] for r in rows], 0.4, label="ONNX Runtime (p50)")
    for i, r in enumerate(rows):
        ax.annotate(
            f"{r['ratio_eager_over_onnx']:.1f}x",
            (i, max(r["eager_p50_ms"], r["onnx_p50_ms"])),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set_ylabel("latency per batch (ms, log)")
    ax.set_title(f"{result['method']}: eager vs ONNX Runtime on {result['device']}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--run", default="runs/default")
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of timing per cell and model")
    args = ap.parse_args(argv)
    run_dir = Path(args.run)
    print(HEADER)
    try:
        result = bench_run(run_dir, args.budget)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix=".bench.", dir=run_dir))
    try:
        (tmp / "bench.json").write_text(json.dumps(result, indent=2))
        plot(result, tmp / "latency.png")
        tmp.chmod(0o755)
        shutil.rmtree(run_dir / "bench", ignore_errors=True)
        tmp.rename(run_dir / "bench")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"device: {result['device']}, provider {result['provider']}; wrote {run_dir}/bench/bench.json and latency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
