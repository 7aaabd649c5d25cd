"""``python -m serve --export RUN/export [--port 8080]``: serve an exported model over HTTP."""

from __future__ import annotations

import argparse
import sys

from serve.runtime import ServeError, load_model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m serve", description=__doc__)
    ap.add_argument("--export", default="runs/default/export", help="export folder (default: runs/default/export)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    ap.add_argument(
        "--precision",
        choices=("fp32", "int8"),
        default="fp32",
        help="fp32: the parity-gated graph; int8: the CPU graph that passed the dev-accuracy gate (about 2x faster on CPU)",
    )
    ap.add_argument(
        "--tf32",
        action="store_true",
        help="CUDA: let fp32 MatMuls use TF32 (faster at large batches, ~1e-2 off the gated logits)",
    )
    ap.add_argument(
        "--kernels",
        default=None,
        help="CUDA: the PrefixAttention custom-op library (default: $EDGETUNE_KERNELS or build/kernels/libedgetune_ort.so)",
    )
    ap.add_argument("--max-length", type=int, default=None, help="truncate texts to this many tokens (default: as trained)")
    args = ap.parse_args(argv)
    try:
        classifier = load_model(
            args.export,
            providers=args.provider,
            max_length=args.max_length,
            precision=args.precision,
            tf32=args.tf32,
            kernels=args.kernels,
        )
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import uvicorn

    from serve.app import create_app

    print(
        f"serving {args.export} ({classifier.manifest['method']}, {len(classifier.labels)} labels) on "
        f"{classifier.provider} ({classifier.precision}) at http://{args.host}:{args.port}",
        flush=True,
    )
    uvicorn.run(create_app(classifier), host=args.host, port=args.port, log_level="warning", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
