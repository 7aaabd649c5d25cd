"""The HTTP service: POST /predict, GET /health, GET /ready. One exception boundary turns failures into JSON errors."""

from __future__ import annotations

import json
import logging

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from serve.runtime import Classifier, ServeError

log = logging.getLogger("edgetune.serve")
MAX_TEXTS = 256
MAX_CHARS = 20_000


class BadRequest(Exception):
    pass


def _parse(body: bytes) -> tuple[list[str], int]:
    try:
        payload = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise BadRequest('body is not valid JSON; send {"texts": ["..."]}') from None
    if not isinstance(payload, dict) or "texts" not in payload:
        raise BadRequest('body must be a JSON object with a "texts" list')
    texts = payload["texts"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise BadRequest('"texts" must be a non-empty list of strings')
    if len(texts) > MAX_TEXTS:
        raise BadRequest(f'"texts" holds {len(texts)} items; at most {MAX_TEXTS} per request')
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BadRequest(f"texts[{i}] is a {type(t).__name__}, not a string")
        if len(t) > MAX_CHARS:
            raise BadRequest(f"texts[{i}] has {len(t)} characters; at most {MAX_CHARS}")
    top_k = payload.get("top_k", 1)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise BadRequest('"top_k" must be a positive integer')
    return texts, top_k


def create_app(classifier: Classifier) -> Starlette:
    """The Starlette app around one loaded classifier (loaded once, shared by all requests)."""

    async def predict(request: Request) -> JSONResponse:
        try:
            texts, top_k = _parse(await request.body())
            results = await run_in_threadpool(classifier.predict, texts, min(top_k, len(classifier.labels)))
        except (BadRequest, ServeError) as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except Exception as e:  # the one boundary: log it, answer 500, keep serving
            log.exception("predict failed")
            return JSONResponse({"error": f"internal error: {type(e).__name__}: {e}"}, status_code=500)
        return JSONResponse({"predictions": results})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def ready(request: Request) -> JSONResponse:
        m = classifier.manifest
        return JSONResponse(
            {
                "status": "ready",
                "method": m["method"],
                "task": m.get("task", "sequence-classification"),
                "provider": classifier.provider,
                "precision": classifier.precision,
                "graph": classifier.graph,
                "labels": len(classifier.labels),
                "adapter_sha256": m["adapter_sha256"],
            }
        )

    return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health), Route("/ready", ready)])
