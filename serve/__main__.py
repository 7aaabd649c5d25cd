"""``python -m serve --models DIR | --export DIR [--port 8080]``: serve exported models over HTTP.

``--models DIR`` serves every export folder directly under DIR, each named by its folder; ``--export DIR`` serves one.
SIGTERM (or Ctrl-C) stops accepting, answers readiness 503, finishes the requests in flight and exits 0 within
``--drain-timeout``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from serve.app import ServerLimits, create_app
from serve.batching import Limits
from serve.metrics import Metrics
from serve.repository import ModelOptions, Repository
from serve.runtime import PRECISIONS, SPIN


def single_name(export: Path) -> str:
    """A single export's model name: its folder's name, or its run's for a RUN/export folder."""
    resolved = export.resolve()
    return resolved.parent.name if resolved.name == "export" else resolved.name


def positive(kind):
    def parse(text: str):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return value

    return parse


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    where = ap.add_mutually_exclusive_group()
    where.add_argument("--models", default=None, help="model repository: serve every export folder directly under DIR")
    where.add_argument("--export", default=None, help="serve one export folder (default: runs/default/export)")
    ap.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    ap.add_argument("--port", type=int, default=8080)
    ap.add_argument("--api-key", default=os.environ.get("EDGETUNE_API_KEY"),
                    help="require Authorization: Bearer KEY on every route but the health probes (default: $EDGETUNE_API_KEY)")  # fmt: skip
    models = ap.add_argument_group("models")
    models.add_argument("--provider", choices=("auto", "cpu", "cuda"), default="auto")
    models.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="fp32: the parity-gated graph; int8: the CPU graph that passed the dev-accuracy gate; fp16: the "
                             "graph gated against fp32; auto (default): fp16 on the CUDA provider where exported, else fp32")  # fmt: skip
    models.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false",
                        help="CUDA: run each bucket through I/O binding without capturing it as a CUDA graph")  # fmt: skip
    models.add_argument("--tf32", action="store_true", help="CUDA: let fp32 MatMuls use TF32 (~1e-2 off the gated logits)")
    models.add_argument("--kernels", default=None,
                        help="CUDA: the PrefixAttention custom-op library (default: $EDGETUNE_KERNELS or build/kernels/libedgetune_ort.so)")  # fmt: skip
    models.add_argument("--max-length", type=positive(int), default=None, help="tokens per text (default: as trained)")
    models.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="onnxruntime threads per model run (default: the cores this process may use)")  # fmt: skip
    models.add_argument("--spin", choices=tuple(SPIN), default="run",
                        help="onnxruntime's threads: spin while a run lasts, then sleep (run, default); spin after it too "
                             "(always: onnxruntime's own default); never spin")  # fmt: skip
    batching = ap.add_argument_group("batching")
    batching.add_argument("--max-batch-rows", type=positive(int), default=32, help="texts per session run (1: no batching)")
    batching.add_argument("--max-batch-tokens", type=positive(int), default=16384, help="padded tokens (rows x length) per run")
    batching.add_argument("--max-padding", type=float, default=0.25,
                          help="a text joins a run only while the run's padding stays within this share of its real tokens")  # fmt: skip
    batching.add_argument(
        "--max-wait-ms", type=float, default=0.0, help="wait up to this long for a fuller batch (default: none)"
    )
    limits = ap.add_argument_group("limits")
    limits.add_argument("--payload-limit", type=positive(int), default=2_000_000, help="request body bytes (413 beyond)")
    limits.add_argument("--max-client-batch", type=positive(int), default=256, help="texts per request (422 beyond)")
    limits.add_argument("--max-concurrent-requests", type=positive(int), default=512,
                        help="requests in flight per model (429 with Retry-After beyond)")  # fmt: skip
    limits.add_argument("--request-timeout", type=positive(float), default=30.0, help="seconds per request (504 beyond)")
    limits.add_argument("--truncate", action=argparse.BooleanOptionalAction, default=True,
                        help="cut texts over the model's length (default) or refuse them with 422 (--no-truncate)")  # fmt: skip
    limits.add_argument("--drain-timeout", type=positive(float), default=30.0, help="seconds to finish requests on SIGTERM")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # each model's worker tokenises between its runs; tokenizers' own thread pool would contend with onnxruntime's
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    options = ModelOptions(args.provider, args.precision, args.tf32, args.kernels, args.max_length, args.threads,
                           args.max_batch_rows, args.cuda_graphs, args.spin)  # fmt: skip
    limits = Limits(args.max_batch_rows, args.max_batch_tokens, args.max_padding, args.max_wait_ms)
    if args.models:
        root = Path(args.models)
        if not root.is_dir():
            print(f"error: model repository {root} is not a folder", file=sys.stderr)
            return 2
        repo = Repository(root, options, limits, Metrics())
    else:
        export = Path(args.export or "runs/default/export")
        repo = Repository(None, options, limits, Metrics(), single=export, single_name=single_name(export))
    repo.load_all()
    if repo.root is None and not repo.entries:  # one export that does not load stops the server, as before
        print(f"error: {repo.failures[repo.single_name]}", file=sys.stderr)
        return 2
    server_limits = ServerLimits(args.payload_limit, args.max_client_batch, args.max_concurrent_requests,
                                 args.request_timeout, args.truncate)  # fmt: skip
    app = create_app(repo, server_limits, args.api_key)
    for entry in repo.entries.values():
        c = entry.model
        print(f"serving {entry.name}: {entry.folder} ({c.manifest['method']}, {len(c.labels)} labels) on {c.provider} "
              f"({c.precision})", flush=True)  # fmt: skip
    for name, reason in repo.failures.items():
        print(f"not serving {name}: {reason}", flush=True)
    print(f"listening on http://{args.host}:{args.port}", flush=True)
    serve_forever(app, args.host, args.port, args.drain_timeout)
    repo.close()
    return 0


def serve_forever(app, host: str, port: int, drain_timeout: float) -> None:
    """uvicorn until SIGTERM or SIGINT: readiness goes false at once, then requests in flight finish."""
    import uvicorn  # the server process only: the app itself is importable without it

    state = app.state.edgetune

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.draining = True
            super().handle_exit(sig, frame)

        @contextlib.contextmanager
        def capture_signals(self):  # uvicorn's re-raises the signal after the drain; a drained server exits 0
            before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in before.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=drain_timeout,
        http="httptools", loop="uvloop", lifespan="off",
    )  # fmt: skip
    Server(config).run()


if __name__ == "__main__":
    sys.exit(main())
