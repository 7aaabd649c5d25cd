"""Prometheus metrics (``GET /metrics``), named as text-embeddings-inference names its own with an ``edgetune_`` prefix."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series: they double the output and no dashboard reads them

# seconds: from 100 us (a queue wait on an idle server) to 30 s (a request timeout)
TIME_BUCKETS = (1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (16, 64, 256, 1024, 4096, 16384, 65536)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "edgetune_requests", "HTTP requests by model, route and status", ["model", "route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "edgetune_request_duration_seconds", "Time from request to response", ["model", "route"],
            buckets=TIME_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokenize_seconds = Histogram(
            "edgetune_tokenize_duration_seconds",
            "Time tokenising the requests that arrived together (one call)",
            ["model"],
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "edgetune_queue_duration_seconds",
            "Time a row waited in its model's queue",
            ["model"],
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "edgetune_inference_duration_seconds",
            "Time of one session run (a batch)",
            ["model"],
            buckets=TIME_BUCKETS,
            registry=r,
        )
        self.batch_rows = Histogram("edgetune_batch_size", "Rows per session run", ["model"], buckets=ROW_BUCKETS, registry=r)
        self.batch_tokens = Histogram(
            "edgetune_batch_tokens", "Padded tokens (rows x length) per session run", ["model"], buckets=TOKEN_BUCKETS, registry=r
        )
        self.queue_depth = Gauge("edgetune_queue_size", "Rows waiting in the model's queue", ["model"], registry=r)
        self.in_flight = Gauge("edgetune_requests_in_flight", "Requests admitted and not answered", ["model"], registry=r)
        self.texts = Counter("edgetune_texts", "Texts predicted", ["model"], registry=r)
        self.truncated = Counter("edgetune_texts_truncated", "Texts cut to the model's length", ["model"], registry=r)
        self.dropped = Counter(
            "edgetune_rows_dropped", "Rows cancelled before they ran (client gone, timeout)", ["model"], registry=r
        )
        self.overloaded = Counter("edgetune_requests_overloaded", "Requests refused with 429", ["model"], registry=r)
        self.model_ready = Gauge("edgetune_model_ready", "1 while the model serves", ["model"], registry=r)

    def observe_run(self, model: str, seconds: float, rows: int, tokens: int) -> None:
        self.inference_seconds.labels(model).observe(seconds)
        self.batch_rows.labels(model).observe(rows)
        self.batch_tokens.labels(model).observe(tokens)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
