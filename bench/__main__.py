"""``python -m bench --run runs/NAME``: latency of the eager adapter model vs the ONNX export.

Writes RUN/bench/bench.json and RUN/bench/latency.png and prints a table. Both models see the same token ids:
``seq128`` rows are 128 real tokens (dev sentences joined), ``dev`` rows are dev sentences padded to the batch's longest.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from adapters.errors import EdgetuneError  # noqa: E402
from bench.latency import HEADER, bench_run, save  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--run", default="runs/default")
    ap.add_argument("--budget", type=float, default=1.5, help="seconds of timing per cell and model")
    ap.add_argument("--no-peft", action="store_true", help="leave out the PEFT baseline")
    args = ap.parse_args(argv)
    run_dir = Path(args.run)
    print(HEADER)
    try:
        result = bench_run(run_dir, args.budget, with_peft=not args.no_peft)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    save(run_dir, result)
    print(f"device: {result['device']}, provider {result['provider']}; wrote {run_dir}/bench/bench.json and latency.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
