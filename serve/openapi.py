"""The server's whole HTTP API as an OpenAPI 3.0 document (``GET /openapi.json``), kept true by the fuzz test."""

from __future__ import annotations


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int) -> dict:
    text = {
        400: "Malformed: not JSON, not UTF-8, or not the protocol's shape",
        401: "Missing or wrong API key",
        404: "Unknown model",
        413: "Body over the payload limit",
        422: "Validation: wrong types, empty, too many texts, or a text over the token limit with truncation off",
        429: "The model's queue is full (Retry-After)",
        503: "Not ready: starting, draining, or the model is not loaded",
        504: "The request timed out",
    }
    return {str(s): {"description": text[s], "content": _json(_ref("Error"))} for s in statuses}


GUARDED = (401,)  # with --api-key
INFER_ERRORS = (400, 401, 404, 413, 422, 429, 503, 504)
NAME = {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}
VERSION_PARAM = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}, "example": "1"}

SCHEMAS = {
    "Error": {
        "type": "object",
        "required": ["error", "error_type"],
        "properties": {"error": {"type": "string"}, "error_type": {"type": "string"}},
    },
    "PredictRequest": {
        "type": "object",
        "required": ["texts"],
        "properties": {
            "texts": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1}]},
            "top_k": {"type": "integer", "minimum": 1, "default": 1},
            "model": {"type": "string", "nullable": True, "description": "which model, when several are served"},
            "truncate": {
                "type": "boolean",
                "nullable": True,
                "description": "cut texts over the model's length (default: --truncate)",
            },
        },
    },
    "Prediction": {
        "type": "object",
        "description": "A classifier's label, score and top labels, or a tagger's words, tags and entities",
        "properties": {
            "label": {"type": "string"},
            "score": {"type": "number"},
            "top": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["label", "score"],
                    "properties": {"label": {"type": "string"}, "score": {"type": "number"}},
                },
            },
            "words": {"type": "array", "items": {"type": "string"}},
            "tags": {"type": "array", "items": {"type": "string"}},
            "entities": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["type", "text", "start_word", "end_word"],
                    "properties": {
                        "type": {"type": "string"},
                        "text": {"type": "string"},
                        "start_word": {"type": "integer"},
                        "end_word": {"type": "integer"},
                    },
                },
            },
            "truncated": {"type": "boolean", "description": "present (true) when the text was cut to the model's length"},
        },
    },
    "PredictResponse": {
        "type": "object",
        "required": ["predictions"],
        "properties": {"predictions": {"type": "array", "items": _ref("Prediction")}},
    },
    "Tensor": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "properties": {
            "name": {"type": "string"},
            "datatype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "parameters": {"type": "object"},
            "data": {"type": "array"},
        },
    },
    "TextInput": {
        "type": "object",
        "required": ["name", "datatype", "shape"],
        "description": "the texts; data (or the binary part) holds as many strings as shape[0]",
        "properties": {
            "name": {"type": "string", "enum": ["text"]},
            "datatype": {"type": "string", "enum": ["BYTES"]},
            "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1, "maxItems": 2},
            "parameters": {"type": "object"},
            "data": {"type": "array"},
        },
    },
    "InferRequest": {
        "type": "object",
        "required": ["inputs"],
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object"},
            "inputs": {"type": "array", "items": _ref("TextInput"), "minItems": 1, "maxItems": 1},
            "outputs": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {"name": {"type": "string"}, "parameters": {"type": "object"}},
                },
            },
        },
    },
    "InferResponse": {
        "type": "object",
        "required": ["model_name", "outputs"],
        "properties": {
            "model_name": {"type": "string"},
            "model_version": {"type": "string"},
            "id": {"type": "string"},
            "outputs": {"type": "array", "items": _ref("Tensor")},
        },
    },
    "ModelMetadata": {
        "type": "object",
        "required": ["name", "versions", "platform", "inputs", "outputs"],
        "properties": {
            "name": {"type": "string"},
            "versions": {"type": "array", "items": {"type": "string"}},
            "platform": {"type": "string"},
            "inputs": {"type": "array", "items": _ref("Tensor")},
            "outputs": {"type": "array", "items": _ref("Tensor")},
            "parameters": {"type": "object"},
        },
    },
    "RepositoryIndex": {
        "type": "array",
        "items": {
            "type": "object",
            "required": ["name", "state"],
            "properties": {
                "name": {"type": "string"},
                "version": {"type": "string"},
                "state": {"type": "string", "enum": ["READY", "UNAVAILABLE"]},
                "reason": {"type": "string"},
            },
        },
    },
}


def _op(summary: str, ok: dict | None, errors: tuple[int, ...], body: str | None = None, params: list | None = None) -> dict:
    op: dict = {
        "summary": summary,
        "responses": {"200": {"description": "OK", **({"content": ok} if ok else {})}, **_errors(*errors)},
    }
    if body:
        op["requestBody"] = {"required": True, "content": _json(_ref(body))}
    if params:
        op["parameters"] = params
    return op


def openapi(version: str, example_model: str = "") -> dict:
    """The document; ``example_model`` (a served model's name) is the example of every model-name parameter."""
    obj = {"type": "object"}
    name = {**NAME, "example": example_model} if example_model else NAME
    infer = _op("Open Inference Protocol v2 inference: BYTES input 'text', typed outputs", _json(_ref("InferResponse")),
                INFER_ERRORS, "InferRequest", [name])  # fmt: skip
    infer_v = {**infer, "parameters": [name, VERSION_PARAM]}
    meta = _op("Model metadata", _json(_ref("ModelMetadata")), (401, 404, 503), params=[name])
    model_ready = _op("Model readiness", _json(obj), (401, 404, 503), params=[name])
    paths = {
        "/predict": {"post": _op("Predict texts", _json(_ref("PredictResponse")), INFER_ERRORS, "PredictRequest")},
        "/health": {"get": _op("Liveness", _json(obj), ())},
        "/ready": {"get": _op("Readiness, with the model's details", _json(obj), (401, 404, 422, 503))},
        "/metrics": {"get": _op("Prometheus metrics", {"text/plain": {"schema": {"type": "string"}}}, GUARDED)},
        "/openapi.json": {"get": _op("This document", _json(obj), GUARDED)},
        "/v2": {"get": _op("Server metadata", _json(obj), GUARDED)},
        "/v2/health/live": {"get": _op("Liveness", _json(obj), ())},
        "/v2/health/ready": {"get": _op("Readiness", _json(obj), (503,))},
        "/v2/models/{name}": {"get": meta},
        "/v2/models/{name}/versions/{version}": {"get": {**meta, "parameters": [name, VERSION_PARAM]}},
        "/v2/models/{name}/ready": {"get": model_ready},
        "/v2/models/{name}/versions/{version}/ready": {"get": {**model_ready, "parameters": [name, VERSION_PARAM]}},
        "/v2/models/{name}/infer": {"post": infer},
        "/v2/models/{name}/versions/{version}/infer": {"post": infer_v},
        "/v2/repository/index": {"post": _op("Every model and its state", _json(_ref("RepositoryIndex")), (401, 413))},
        "/v2/repository/models/{name}/load": {
            "post": _op("Load or reload a model (swapped in once ready)", _json(obj), (401, 404, 413, 422), params=[name])
        },
        "/v2/repository/models/{name}/unload": {
            "post": _op("Unload a model (requests in flight finish)", _json(obj), (401, 404, 413, 422), params=[name])
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "edgetune server", "version": version},
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }
