"""The HTTP service: ``POST /predict``, the Open Inference Protocol v2 (with its repository extension), ``/metrics``,
``/openapi.json`` and the health routes, over a Repository of models with a batching scheduler each.

One boundary (``endpoint``) checks the API key, counts the request, and turns every failure into a JSON error of its
kind; anything unexpected is a 500 logged with the request id, and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import itertools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from bank import layout
from serve import protocol
from serve.bank import Adapter, BankClassifier
from serve.errors import ApiError
from serve.metrics import Metrics
from serve.openapi import openapi
from serve.repository import Entry, Repository, overload_error
from serve.runtime import ServeError

log = logging.getLogger("edgetune.serve")
VERSION = "0.1.0"


@dataclass(frozen=True)
class ServerLimits:
    payload_limit: int = 2_000_000  # bytes of request body
    max_client_batch: int = 256  # texts per request
    max_concurrent_requests: int = 512  # requests in flight per model; more get 429
    request_timeout: float = 30.0  # seconds; then 504 and the request's rows are cancelled
    truncate: bool = True  # default for requests that do not say


class State:
    """What the routes share: the repository, the limits, the API key, and whether the server is draining."""

    def __init__(self, repo: Repository, limits: ServerLimits, api_key: str | None) -> None:
        self.repo = repo
        self.limits = limits
        self.api_key = api_key
        self.draining = False
        self.metrics: Metrics = repo.metrics

    def ready(self) -> bool:
        return not self.draining and bool(self.repo.entries)


_ids = itertools.count()
_ID_PREFIX = os.urandom(4).hex()  # this process's; the counter makes each request's unique within it


def next_id() -> str:
    """A request id for a request that brought none (16 hex digits, as a client's X-Request-Id usually is)."""
    return f"{_ID_PREFIX}{next(_ids):08x}"


def error_response(e: ApiError, request_id: str) -> Response:
    headers = {**e.headers, "X-Request-Id": request_id}
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


Handler = Callable[[Request, State], Awaitable[Response]]
OPEN_ROUTES = ("/health", "/v2/health/live", "/v2/health/ready")  # no API key: probes


def endpoint(route: str, handler: Handler, state: State) -> Callable[[Request], Awaitable[Response]]:
    async def serve(request: Request) -> Response:
        t0 = time.perf_counter()
        request_id = request.headers.get("x-request-id") or next_id()
        request.state.model = request.path_params.get("name", "")
        try:
            if state.api_key and route not in OPEN_ROUTES:
                check_key(request, state.api_key)
            response = await handler(request, state)
        except ApiError as e:
            response = error_response(e, request_id)
        except Exception:  # a bug: log it with the request id, answer 500, keep serving
            log.exception("request %s %s %s failed", request_id, request.method, request.url.path)
            response = error_response(ApiError("internal", f"internal error (request id {request_id})"), request_id)
        response.headers.setdefault("X-Request-Id", request_id)
        model = request.state.model
        state.metrics.requests.labels(model, route, str(response.status_code)).inc()
        state.metrics.request_seconds.labels(model, route).observe(time.perf_counter() - t0)
        return response

    return serve


def key_matches(given: str, key: str) -> bool:
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def check_key(request: Request, key: str) -> None:
    if not key_matches(request.headers.get("authorization", ""), key):
        raise ApiError("unauthorized", "missing or wrong API key: send Authorization: Bearer <key>",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to be over the limit (Content-Length, or the bytes so far)."""
    length = request.headers.get("content-length")
    if length is not None:
        if not length.isdigit():
            raise ApiError("malformed", f"Content-Length {length!r} is not a number")
        if int(length) > limit:
            raise ApiError("payload_too_large", f"the body has {int(length)} bytes; the limit is {limit} (--payload-limit)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError("payload_too_large", f"the body is over the {limit}-byte limit (--payload-limit)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> object:
    try:
        return json.loads(body)
    except UnicodeDecodeError:
        raise ApiError("malformed", "the body is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError("malformed", f'the body is not valid JSON ({e}); send {{"texts": ["..."]}}') from None


def check_texts(texts: object, limit: int) -> list[str]:
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not texts:
        raise ApiError("validation", '"texts" must be a non-empty list of strings')
    if len(texts) > limit:
        raise ApiError("validation", f'"texts" holds {len(texts)} items; at most {limit} per request (--max-client-batch)')
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise ApiError("validation", f"texts[{i}] is a {type(t).__name__}, not a string")
    return texts


def flag(payload: dict, key: str, default: bool) -> bool:
    value = payload.get(key, default)
    if not isinstance(value, bool):
        raise ApiError("validation", f'"{key}" must be true or false')
    return value


async def infer(
    request: Request, state: State, entry: Entry, texts: list[str], truncate: bool, adapter: Adapter | None = None
) -> tuple[list, list]:
    """(rows, outputs) of texts on a model (a bank: with ``adapter``): admitted (or 429), handed to its scheduler
    (which tokenises them off the event loop and batches their rows), awaited until done, the client goes away (rows
    dropped), or the request times out (504, rows dropped)."""
    m, name = state.metrics, entry.name
    state.repo.acquire(entry, state.limits.max_concurrent_requests)
    try:
        done = entry.scheduler.submit(texts, truncate, adapter)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            finished, _ = await asyncio.wait(
                {done, gone}, timeout=state.limits.request_timeout or None, return_when="FIRST_COMPLETED"
            )
        finally:
            gone.cancel()
        if done not in finished:
            done.cancel()
            if gone in finished:
                raise ApiError("malformed", "the client went away")  # nobody reads this answer
            raise ApiError("timeout", f"the request took over {state.limits.request_timeout:g} s (--request-timeout)")
        try:
            rows, outputs = done.result()
        except ServeError as e:  # TextTooLong, or a text the tokenizer refuses
            raise ApiError("validation", str(e)) from None
        m.texts.labels(name).inc(len(rows))
        if n := sum(r.truncated for r in rows):
            m.truncated.labels(name).inc(n)
        return rows, outputs
    finally:
        state.repo.release(entry)


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class FrontDoor:
    """The ASGI entry for inference: ``POST /predict`` and the v2 infer routes go straight to their endpoint, past
    Starlette's router and exception layers (the endpoint answers every error itself), and a request for a model at its
    limit is answered 429 before its body is read.

    Under load these requests are nearly all the traffic, and every layer they skip is CPU left to the model; under
    overload the refusals far outnumber the admitted requests. The 429 path knows the model from the URL (the v2 infer
    routes, or ``/predict`` while one model is served) and checks nothing else; a request whose key is wrong, or whose
    server is draining, goes the usual way. ``infer`` still checks admission for the rest. Every other request goes to
    the Starlette app.
    """

    def __init__(self, app, state: State, endpoints: dict[str, Callable[[Request], Awaitable[Response]]]) -> None:
        self.app = app
        self.state = state
        self.endpoints = endpoints  # route -> endpoint, for the inference routes
        self._refusals: dict[tuple[str, int, str], tuple] = {}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and (hit := self._match(scope["path"])) is not None:
            route, params = hit
            if (entry := self._full(scope, route, params)) is not None:
                await self._refuse(scope, receive, send, entry, route)
                return
            scope["path_params"] = params
            response = await self.endpoints[route](Request(scope, receive))
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _match(path: str) -> tuple[str, dict[str, str]] | None:
        """(route, path parameters) of an inference route, or None."""
        if path == "/predict":
            return path, {}
        if path.startswith("/v2/models/") and path.endswith("/infer"):
            parts = path.split("/")  # "", v2, models, name, [adapter,] [versions, version,] infer
            if len(parts) in (6, 8) and parts[4] != "versions" and parts[4]:  # a bank's adapter: name BANK/ADAPTER
                parts = [*parts[:3], f"{parts[3]}/{parts[4]}", *parts[5:]]
            if len(parts) == 5 and parts[3]:
                return "/v2/models/{name}/infer", {"name": parts[3]}
            if len(parts) == 7 and parts[3] and parts[4] == "versions" and parts[5]:
                return "/v2/models/{name}/versions/{version}/infer", {"name": parts[3], "version": parts[5]}
        return None

    def _full(self, scope, route: str, params: dict[str, str]) -> Entry | None:
        """The model, when the request is inference on a model at its limit that may be refused from the URL alone."""
        state = self.state
        if route == "/predict":
            if len(state.repo.entries) != 1:
                return None  # the model is named in the body
            entry = next(iter(state.repo.entries.values()))
        elif params.get("version", "1") == "1":
            entry = state.repo.entries.get(params["name"].partition("/")[0])
        else:
            return None  # 404 the usual way
        if entry is None or entry.in_flight < state.limits.max_concurrent_requests or state.draining:
            return None
        if state.api_key:
            given = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            if not key_matches(given, state.api_key):
                return None  # 401 the usual way
        return entry

    async def _refuse(self, scope, receive, send, entry: Entry, route: str) -> None:
        t0 = time.perf_counter()
        status, body, headers, counters = self._refusal(entry, route)
        request_id = dict(scope["headers"]).get(b"x-request-id") or next_id().encode("ascii")
        await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"x-request-id", request_id)]})
        await send({"type": "http.response.body", "body": body})
        refused, requests, seconds = counters
        refused.inc()
        requests.inc()
        seconds.observe(time.perf_counter() - t0)

    def _refusal(self, entry: Entry, route: str):
        """The 429's status, body and headers as the routes' error response renders them, and its metric series,
        built once per (model, requests in flight, route): under overload the same refusal is sent thousands of times
        a second."""
        key = (entry.name, entry.in_flight, route)
        if (hit := self._refusals.get(key)) is None:
            e = overload_error(entry)
            rendered = JSONResponse(e.body(), status_code=e.status, headers=e.headers)
            m = self.state.metrics
            counters = (m.overloaded.labels(entry.name), m.requests.labels(entry.name, route, "429"),
                        m.request_seconds.labels(entry.name, route))  # fmt: skip
            hit = self._refusals[key] = (e.status, rendered.body, rendered.raw_headers, counters)
        return hit


# routes


async def predict(request: Request, state: State) -> Response:
    if not state.ready():
        raise ApiError("unavailable", "the server is not ready (starting or draining)")
    payload = parse_json(await read_body(request, state.limits.payload_limit))
    if not isinstance(payload, dict) or "texts" not in payload:
        raise ApiError("validation", 'the body must be a JSON object with a "texts" list')
    texts = check_texts(payload["texts"], state.limits.max_client_batch)
    top_k = payload.get("top_k", 1)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 1:
        raise ApiError("validation", '"top_k" must be a positive integer')
    name = payload.get("model")
    if name is not None and not isinstance(name, str):
        raise ApiError("validation", '"model" must be a string')
    entry, adapter = state.repo.target(name)
    request.state.model = entry.name
    rows, outputs = await infer(request, state, entry, texts, flag(payload, "truncate", state.limits.truncate), adapter)
    model = entry.model
    return JSONResponse({"predictions": [model.result(r, o, top_k) for r, o in zip(rows, outputs, strict=True)]})


async def health(request: Request, state: State) -> Response:
    return JSONResponse({"status": "ok"})


async def ready(request: Request, state: State) -> Response:
    if not state.ready():
        raise ApiError("unavailable", "the server is not ready (starting or draining)")
    entry = state.repo.get(request.query_params.get("model"))
    c, m = entry.model, entry.model.manifest
    return JSONResponse(
        {
            "status": "ready", "model": entry.name, "method": m["method"], "task": c.task, "provider": c.provider,
            "precision": c.precision, "graph": c.graph, "labels": len(c.labels), "adapter_sha256": m.get("adapter_sha256"),
            **({"adapters": len(c.names)} if isinstance(c, BankClassifier) else {}),
        }
    )  # fmt: skip


async def v2_server(request: Request, state: State) -> Response:
    return JSONResponse({"name": "edgetune", "version": VERSION, "extensions": ["model_repository", "binary_tensor_data"]})


async def v2_live(request: Request, state: State) -> Response:
    return JSONResponse({"live": True})


async def v2_ready(request: Request, state: State) -> Response:
    if not state.ready():
        raise ApiError("unavailable", "the server is not ready (starting or draining)")
    return JSONResponse({"ready": True})


def _name(request: Request) -> str:
    """The model a v2 route names: NAME, or BANK/ADAPTER for an adapter of a bank."""
    p = request.path_params
    return f"{p['name']}/{p['adapter']}" if "adapter" in p else p["name"]


def _entry(request: Request, state: State, bank_itself: bool = False) -> tuple[Entry, Adapter | None]:
    version = request.path_params.get("version")
    if version not in (None, "1"):
        raise ApiError("not_found", f"model {_name(request)!r} has version 1 only, not {version!r}")
    if bank_itself and "adapter" not in request.path_params:  # metadata and readiness of the bank as a whole
        return state.repo.get(_name(request)), None
    return state.repo.target(_name(request))


async def v2_model(request: Request, state: State) -> Response:
    entry, adapter = _entry(request, state, bank_itself=True)
    c = entry.model
    if isinstance(c, BankClassifier) and adapter is None:
        meta = protocol.metadata(entry.name, c.task, 0, "edgetune_onnxruntime")
        meta["parameters"] = {"method": c.manifest["method"], "adapters": c.names, "max_length": c.max_length}
        return JSONResponse(meta)
    labels = adapter.labels if adapter else c.labels
    meta = protocol.metadata(_name(request), c.task, len(labels), "edgetune_onnxruntime")
    meta["parameters"] = {"method": c.manifest["method"], "labels": labels, "max_length": c.max_length}
    return JSONResponse(meta)


async def v2_model_ready(request: Request, state: State) -> Response:
    _entry(request, state, bank_itself=True)
    if state.draining:
        raise ApiError("unavailable", "the server is draining")
    return JSONResponse({"name": _name(request), "ready": True})


async def v2_infer(request: Request, state: State) -> Response:
    if not state.ready():
        raise ApiError("unavailable", "the server is not ready (starting or draining)")
    entry, adapter = _entry(request, state)
    body = await read_body(request, state.limits.payload_limit)
    req, texts = protocol.parse_infer(body, request.headers.get("inference-header-content-length"))
    texts = check_texts(texts, state.limits.max_client_batch)
    params = req.get("parameters") if isinstance(req.get("parameters"), dict) else {}
    rows, outputs = await infer(request, state, entry, texts, flag(params, "truncate", state.limits.truncate), adapter)
    c = entry.model
    top = len(adapter.labels if adapter else c.labels) if c.task != "token-classification" else 1
    preds = [c.result(r, o, top) for r, o in zip(rows, outputs, strict=True)]
    tensors = protocol.output_tensors(c.task, preds, outputs if c.task != "token-classification" else None)
    data, headers = protocol.infer_response(_name(request), req, tensors)
    media = "application/octet-stream" if headers else "application/json"
    return Response(data, media_type=media, headers=headers)


async def v2_index(request: Request, state: State) -> Response:
    await read_body(request, state.limits.payload_limit)
    return JSONResponse(state.repo.index())


def _adapter_params(body: bytes) -> dict | None:
    """The request's ``parameters`` when they name a bank's adapter (``{"parameters": {"adapter": NAME, ...}}``)."""
    if not body.strip():
        return None
    payload = parse_json(body)
    params = payload.get("parameters") if isinstance(payload, dict) else None
    if not isinstance(params, dict) or "adapter" not in params:
        return None
    if not isinstance(params["adapter"], str):
        raise ApiError("validation", '"parameters.adapter" must be a string')
    return params


async def v2_load(request: Request, state: State) -> Response:
    """Load or reload a model; with ``parameters.adapter``, add (or replace) that adapter of a bank from
    ``parameters.path`` (a PEFT adapter folder on the server) or ``parameters.files`` (its files, base64)."""
    params = _adapter_params(await read_body(request, state.limits.payload_limit))
    if params is None:
        await state.repo.load(request.path_params["name"])
        return JSONResponse({})
    bank = state.repo.bank(request.path_params["name"])
    name = params["adapter"]
    try:
        if isinstance(params.get("path"), str):
            entry = await asyncio.to_thread(bank.add, name, params["path"])
        elif isinstance(params.get("files"), dict):
            entry = await asyncio.to_thread(bank.add_files, name, decode_files(params["files"]))
        else:
            raise ApiError("validation", 'name the adapter\'s folder ("parameters.path") or send its files ("parameters.files")')
    except ServeError as e:
        raise ApiError("validation", str(e)) from None
    log.info("bank %s: adapter %s from %s (%d labels)", request.path_params["name"], name, entry.source, len(entry.labels))
    return JSONResponse({"adapter": entry.name, "labels": len(entry.labels), "adapters": len(bank.names)})


async def v2_unload(request: Request, state: State) -> Response:
    """Unload a model; with ``parameters.adapter``, remove that adapter of a bank."""
    params = _adapter_params(await read_body(request, state.limits.payload_limit))
    if params is None:
        await state.repo.unload(request.path_params["name"])
        return JSONResponse({})
    bank = state.repo.bank(request.path_params["name"])
    try:
        await asyncio.to_thread(bank.remove, params["adapter"])
    except KeyError:
        raise ApiError("not_found", f"bank {request.path_params['name']!r} has no adapter {params['adapter']!r}") from None
    except ServeError as e:
        raise ApiError("validation", str(e)) from None
    return JSONResponse({"adapters": len(bank.names)})


def decode_files(files: dict) -> dict[str, bytes]:
    out = {}
    for name, data in files.items():
        try:
            out[name] = base64.b64decode(data, validate=True)
        except (TypeError, ValueError, binascii.Error):
            raise ApiError("validation", f'"parameters.files.{name}" must be base64') from None
    return out


async def metrics(request: Request, state: State) -> Response:
    data, content_type = state.metrics.render()
    return Response(data, media_type=content_type)


async def openapi_json(request: Request, state: State) -> Response:
    return JSONResponse(openapi(VERSION, min(state.repo.entries, default="")))


class AdapterName(Convertor):
    """A bank adapter's name in a v2 path: never one of the words the model routes end in (ready, infer, ...)."""

    regex = f"(?!(?:{'|'.join(layout.RESERVED)})(?:/|$))[A-Za-z0-9][A-Za-z0-9_.-]{{0,63}}"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("adapter", AdapterName())

ROUTES = [
    ("/predict", predict, ["POST"]),
    ("/health", health, ["GET"]),
    ("/ready", ready, ["GET"]),
    ("/metrics", metrics, ["GET"]),
    ("/openapi.json", openapi_json, ["GET"]),
    ("/v2", v2_server, ["GET"]),
    ("/v2/health/live", v2_live, ["GET"]),
    ("/v2/health/ready", v2_ready, ["GET"]),
    ("/v2/models/{name}", v2_model, ["GET"]),
    ("/v2/models/{name}/versions/{version}", v2_model, ["GET"]),
    ("/v2/models/{name}/ready", v2_model_ready, ["GET"]),
    ("/v2/models/{name}/versions/{version}/ready", v2_model_ready, ["GET"]),
    ("/v2/models/{name}/{adapter:adapter}", v2_model, ["GET"]),  # a bank's adapter
    ("/v2/models/{name}/{adapter:adapter}/ready", v2_model_ready, ["GET"]),
    ("/v2/models/{name}/infer", v2_infer, ["POST"]),
    ("/v2/models/{name}/versions/{version}/infer", v2_infer, ["POST"]),
    ("/v2/repository/index", v2_index, ["POST"]),
    ("/v2/repository/models/{name}/load", v2_load, ["POST"]),
    ("/v2/repository/models/{name}/unload", v2_unload, ["POST"]),
]


def create_app(repo: Repository, limits: ServerLimits | None = None, api_key: str | None = None) -> Starlette:
    """The Starlette app over a loaded repository."""
    state = State(repo, limits or ServerLimits(), api_key)
    routes = [Route(path, endpoint(path, handler, state), methods=methods) for path, handler, methods in ROUTES]

    async def http_error(request: Request, exc: Exception) -> Response:  # unknown routes and wrong methods
        assert isinstance(exc, HTTPException)
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "malformed")
        allowed = exc.headers or {}
        message = f"{request.method} {request.url.path}: {exc.detail}"
        response = error_response(ApiError(kind, message, headers=dict(allowed)), request.headers.get("x-request-id", ""))
        state.metrics.requests.labels("", "other", str(response.status_code)).inc()
        return response

    fast = {route.path: route.endpoint for route in routes if route.path.endswith(("/predict", "/infer"))}
    app = Starlette(
        routes=routes, exception_handlers={HTTPException: http_error},
        middleware=[Middleware(FrontDoor, state=state, endpoints=fast)],
    )  # fmt: skip
    app.state.edgetune = state
    return app
