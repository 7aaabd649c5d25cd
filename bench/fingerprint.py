"""``python -m bench.fingerprint OUT [--only NAME,...]``: short seeded runs of every ``make compare`` row, exported,
with a hash of each result: what a change that must not move any result (a refactor) is checked with.

Each row of bench/compare.yaml trains for one epoch on 320 sentences (160 for dev and test) on the real base model and
data, then exports (int8 gate off, no Triton repository). Printed per row, one JSON line: the sha256 (first 16 hex
digits) of the adapter weights and of ``model.onnx``, dev and test accuracy, the parity figure and the int8 / fp16
gates' figures. Run it before and after the change on the same machine and compare the lines: training and export are
deterministic there, so a refactor leaves every line as it was, to the bit.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

SMOKE = ["max_train_samples=320", "max_eval_samples=160", "epochs=1"]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def fingerprint(run: Path, config: str, overrides: list[str]) -> dict:
    """Train and export one row into ``run``; its line of figures and hashes (or what failed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "train", "--run", str(run), "--config", config, *overrides, *SMOKE]
    trained = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if trained.returncode:
        return {"train": "failed", "stderr": trained.stderr[-400:]}
    cmd = [sys.executable, "-m", "export", "--run", str(run), "--int8-max-drop", "1.0", "--no-triton"]
    exported = subprocess.run(cmd, capture_output=True, text=True, env=env)
    metrics = json.loads((run / "metrics.json").read_text())
    weights = run / "adapter" / "adapter_model.safetensors"  # full and head-only runs: a whole model folder
    line = {
        "adapter": sha(weights if weights.is_file() else run / "adapter" / "model.safetensors"),
        "dev": metrics["dev_accuracy"],
        "test": metrics["test_accuracy"],
    }
    if exported.returncode:
        return {**line, "export": "failed", "stderr": exported.stderr[-400:]}
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    return {
        **line,
        "onnx": sha(run / "export" / "model.onnx"),
        "parity": manifest["parity"]["max_abs_diff"],
        "int8": (manifest.get("int8") or {}).get("dev_accuracy_int8"),
        "fp16": (manifest.get("fp16") or {}).get("max_rel_diff"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.fingerprint", description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="folder for the runs (one subfolder per row)")
    ap.add_argument("--only", default="", help="comma-separated row names of bench/compare.yaml (default: all)")
    ap.add_argument("--rows", default="bench/compare.yaml", help="the rows to run (default: %(default)s)")
    args = ap.parse_args(argv)
    rows = yaml.safe_load(Path(args.rows).read_text())["runs"]
    only = set(filter(None, args.only.split(",")))
    for row in rows:
        if only and row["name"] not in only:
            continue
        line = fingerprint(Path(args.out) / row["name"], row["config"], list(row.get("overrides", [])))
        print(json.dumps({"name": row["name"], **line}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
