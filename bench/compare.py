"""``python -m bench.compare``: train, export and time every method of bench/compare.yaml; write a report.

Writes OUT/NAME/ (a normal run folder: adapter, metrics, export, bench) for each entry, then OUT/report.md and
OUT/compare.png. Stages whose outputs already match (same config, same adapter) are reused, so an interrupted
comparison picks up where it stopped; ``--fresh`` redoes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import yaml  # noqa: E402

from adapters.config import load_config  # noqa: E402
from adapters.errors import EdgetuneError  # noqa: E402
from adapters.peft_io import load_adapter  # noqa: E402
from bench.latency import bench_run, save  # noqa: E402
from export.run import export_run  # noqa: E402
from train.run import run as train_run  # noqa: E402

SPEC = Path(__file__).with_name("compare.yaml")


def load_spec(path: Path) -> list[dict]:
    try:
        runs = yaml.safe_load(path.read_text())["runs"]
    except (OSError, KeyError, TypeError, yaml.YAMLError) as e:
        raise EdgetuneError(f"{path} is not a comparison spec (a YAML mapping with a 'runs' list): {e}") from None
    for r in runs:
        if not {"name", "config"} <= set(r):
            raise EdgetuneError(f"{path}: every run needs a name and a config, got {r}")
    return runs


def _trained(run_dir: Path, cfg) -> bool:
    done = run_dir / "metrics.json"
    return done.is_file() and (run_dir / "config.yaml").is_file() and load_config(run_dir / "config.yaml") == cfg


def _exported(run_dir: Path) -> bool:
    manifest = run_dir / "export" / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text())["adapter_sha256"] == load_adapter(run_dir / "adapter").sha256


def _benched(run_dir: Path) -> bool:
    bench, manifest = run_dir / "bench" / "bench.json", run_dir / "export" / "manifest.json"
    return bench.is_file() and bench.stat().st_mtime > manifest.stat().st_mtime


def run_all(spec: Path, out: Path, fresh: bool = False, budget_s: float = 0.6) -> list[dict]:
    """Train, export and bench each entry (reusing finished stages unless ``fresh``); returns one row per entry."""
    rows = []
    for entry in load_spec(spec):
        run_dir = out / entry["name"]
        overrides = [str(o) for o in entry.get("overrides", [])]
        cfg = load_config(Path(entry["config"]), overrides)
        t0 = time.perf_counter()
        if fresh or not _trained(run_dir, cfg):
            print(f"== {entry['name']}: train", flush=True)
            train_run(run_dir, Path(entry["config"]), overrides)
        if fresh or not _exported(run_dir):
            print(f"== {entry['name']}: export", flush=True)
            export_run(run_dir)
        if fresh or not _benched(run_dir):
            print(f"== {entry['name']}: bench", flush=True)
            save(run_dir, bench_run(run_dir, budget_s, batches=(1, 32), with_peft=False, rounds=2))
        rows.append(row(entry["name"], run_dir))
        print(f"== {entry['name']}: done ({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def row(name: str, run_dir: Path) -> dict:
    m = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((run_dir / "export" / "manifest.json").read_text())
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    cells = {r["batch"]: r for r in bench["rows"] if r["inputs"] == "seq128"}
    tagging = m.get("task") == "tagging"
    return {
        "name": name,
        "method": m["method"],
        "task": "NER (WNUT-16)" if tagging else "intent (BANKING77)",
        "head": m.get("head", "linear"),
        "trainable_params": m["trainable_params"],
        "trainable_pct": 100 * m["trainable_params"] / m["total_params"],
        "train_seconds": sum(h["seconds"] for h in m["history"]),
        "epochs": m["epochs_run"],
        "best_epoch": m["best_epoch"],
        "metric": "entity F1" if tagging else "accuracy",
        "dev": m["dev_entity_f1"] if tagging else m["dev_accuracy"],
        "test": m["test_entity_f1"] if tagging else m["test_accuracy"],
        "onnx_mb": (run_dir / "export" / "model.onnx").stat().st_size / 2**20,
        "parity": manifest["parity"]["max_abs_diff"],
        **{f"onnx_b{b}_ms": cells[b]["onnx_p50_ms"] for b in cells},
        **{f"eager_b{b}_ms": cells[b]["eager_p50_ms"] for b in cells},
        **{f"ratio_b{b}": cells[b]["ratio_eager_over_onnx"] for b in cells},
        "device": bench["device"],
    }


def _shown(path: Path) -> str:
    """``path`` relative to the working directory where it lies below it (the report names no checkout's location)."""
    try:
        return str(path.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def report(rows: list[dict], spec: Path) -> str:
    lines = [
        "# Method comparison",
        "",
        f"Reproduce: `make compare` (budget: `{_shown(spec)}`). Device: {rows[0]['device'] if rows else '-'}. "
        "Latency: onnxruntime fp32 (CPU provider) vs the eager PyTorch adapter model in the same run, batch x 128 real "
        "tokens, p50; ratio = eager / onnxruntime. Parity: max |logit or emission diff| of the export gate.",
        "",
        "| run | method | task | head | trainable | train s (epochs) | dev | test | ONNX MB | parity | ORT b1 ms | eager/ORT b1 | ORT b32 ms | eager/ORT b32 |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['name']} | {r['method']} | {r['task']} | {r['head']} | {r['trainable_params']:,} ({r['trainable_pct']:.2f}%) | "
            f"{r['train_seconds']:.0f} ({r['epochs']}) | {r['metric']} {100 * r['dev']:.2f} | {100 * r['test']:.2f} | "
            f"{r['onnx_mb']:.1f} | {r['parity']:.1e} | {r.get('onnx_b1_ms', float('nan')):.2f} | {r.get('ratio_b1', float('nan')):.2f}x | "
            f"{r.get('onnx_b32_ms', float('nan')):.1f} | {r.get('ratio_b32', float('nan')):.2f}x |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    # optional: matplotlib is the [bench] extra, only the plot needs it
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for task, marker in (("intent (BANKING77)", "o"), ("NER (WNUT-16)", "s")):
        mine = [r for r in rows if r["task"] == task]
        axes[0].scatter([r["trainable_params"] for r in mine], [100 * r["test"] for r in mine], marker=marker, label=task)
        # labels alternate above and below their points, left to right, so neighbours at similar accuracy stay apart
        for i, r in enumerate(sorted(mine, key=lambda r: r["trainable_params"])):
            at = (r["trainable_params"], 100 * r["test"])
            axes[0].annotate(r["name"], at, fontsize=7, xytext=(3, 3 if i % 2 == 0 else -9), textcoords="offset points")
    axes[0].set_xscale("log")
    axes[0].set_xlabel("trainable parameters (log)")
    axes[0].set_ylabel("test accuracy / entity F1 (%)")
    axes[0].legend(fontsize=8)
    x = range(len(rows))
    axes[1].bar([i - 0.2 for i in x], [r.get("eager_b1_ms", 0) for r in rows], 0.4, label="eager PyTorch")
    axes[1].bar([i + 0.2 for i in x], [r.get("onnx_b1_ms", 0) for r in rows], 0.4, label="onnxruntime")
    axes[1].set_xticks(list(x), [r["name"] for r in rows], rotation=60, ha="right", fontsize=7)
    axes[1].set_ylabel("ms, batch 1 x 128 tokens (p50)")
    axes[1].legend(fontsize=8)
    fig.suptitle(f"edgetune methods on {rows[0]['device'] if rows else ''}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__)
    ap.add_argument("--spec", default=str(SPEC), help="runs to compare (default: bench/compare.yaml)")
    ap.add_argument("--out", default="runs/compare", help="folder for the runs and the report (default: runs/compare)")
    ap.add_argument("--fresh", action="store_true", help="retrain, re-export and re-time every run")
    ap.add_argument("--budget", type=float, default=0.6, help="seconds of timing per cell and model")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        rows = run_all(Path(args.spec), out, args.fresh, args.budget)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    text = report(rows, Path(args.spec))
    (out / "report.md").write_text(text)
    (out / "rows.json").write_text(json.dumps(rows, indent=2))
    plot(rows, out / "compare.png")
    print(text)
    print(f"wrote {out}/report.md, {out}/compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
