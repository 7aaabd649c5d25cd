"""``python -m train --run runs/NAME [--config FILE] [key=value ...]``: fine-tune and write RUN/adapter."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from adapters.errors import EdgetuneError  # noqa: E402
from train import dist  # noqa: E402
from train.run import DEFAULT_CONFIG, run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    ap.add_argument(
        "--run", "--run-dir", dest="run", default="runs/default",
        help="run folder to write (default: runs/default); under torchrun spell it --run-dir (torchrun takes --run for its --run-path)",
    )  # fmt: skip
    ap.add_argument("--config", default=None, help="YAML config (default: train/configs/default.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        m = run(Path(args.run), Path(args.config) if args.config else DEFAULT_CONFIG, args.overrides)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        dist.teardown()
    if not dist.is_main():
        return 0
    score = f"entity F1 {m['test_entity_f1']:.4f}" if m["task"] == "tagging" else f"macro F1 {m['test_macro_f1']:.4f}"
    print(
        f"{m['method']}: test accuracy {m['test_accuracy']:.4f}, {score}, "
        f"best epoch {m['best_epoch']}, {m['seconds_per_epoch']:.1f} s/epoch, total {time.perf_counter() - t0:.0f} s "
        f"-> {args.run}/adapter"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
