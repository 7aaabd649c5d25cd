"""The Open Inference Protocol v2 over REST (KServe, Triton): request parsing and typed responses, JSON and binary.

Text goes in as a ``BYTES`` tensor named ``text`` of shape [N] (or [N, 1]). A classifier answers ``label`` (BYTES [N]),
``score`` (FP32 [N]) and ``logits`` (FP32 [N, labels]); a tagger ``tags`` (BYTES [N], one space-separated tag per
whitespace-split word) and ``entities`` (BYTES [N], each a JSON list of {type, text, start_word, end_word}). Both
also answer ``truncated`` (BOOL [N]).

Triton's binary tensor extension is understood both ways, as ``tritonclient`` uses it by default: the body starts
with ``Inference-Header-Content-Length`` bytes of JSON, inputs with ``parameters.binary_data_size`` follow as raw bytes
(a BYTES element as a 4-byte little-endian length, then its bytes), and outputs asked for with ``binary_data``
(or all of them, with the request's ``binary_data_output``) come back the same way.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from serve.errors import ApiError

TEXT_INPUT = "text"
CLASSIFIER_OUTPUTS = {"label": ("BYTES", 1), "score": ("FP32", 1), "logits": ("FP32", 2), "truncated": ("BOOL", 1)}
TAGGER_OUTPUTS = {"tags": ("BYTES", 1), "entities": ("BYTES", 1), "truncated": ("BOOL", 1)}
NUMPY = {"FP32": np.float32, "BOOL": np.bool_}


def outputs_of(task: str) -> dict[str, tuple[str, int]]:
    return TAGGER_OUTPUTS if task == "token-classification" else CLASSIFIER_OUTPUTS


def metadata(name: str, task: str, num_labels: int, platform: str) -> dict:
    outputs = [
        {"name": out, "datatype": dtype, "shape": [-1, num_labels] if rank == 2 else [-1]}
        for out, (dtype, rank) in outputs_of(task).items()
    ]
    return {
        "name": name,
        "versions": ["1"],
        "platform": platform,
        "inputs": [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": outputs,
    }


def parse_infer(body: bytes, header_length: str | None) -> tuple[dict, list[str]]:
    """(the request's JSON, its texts) from an infer body; ApiError naming what is wrong."""
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise ApiError("malformed", f"Inference-Header-Content-Length {header_length!r} is not a number") from None
        if not 0 < n <= len(body):
            raise ApiError("malformed", f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
        head, binary = body[:n], body[n:]
    else:
        head, binary = body, b""
    try:
        request = json.loads(head)
    except UnicodeDecodeError:
        raise ApiError("malformed", "the request is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise ApiError("malformed", f"the request is not valid JSON: {e}") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list) or not request["inputs"]:
        raise ApiError("malformed", 'the request must be a JSON object with a non-empty "inputs" list')
    offset, texts = 0, None
    for i, tensor in enumerate(request["inputs"]):
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise ApiError("malformed", f"inputs[{i}] must be an object with a name")
        params = tensor.get("parameters") or {}
        if not isinstance(params, dict):
            raise ApiError("malformed", f"inputs[{i}].parameters must be an object")
        size = params.get("binary_data_size")
        raw = None
        if size is not None:
            if not isinstance(size, int) or isinstance(size, bool) or size < 0 or offset + size > len(binary):
                raise ApiError("malformed", f"inputs[{i}].binary_data_size {size!r} runs past the body's binary part")
            raw, offset = binary[offset : offset + size], offset + size
        if tensor["name"] != TEXT_INPUT:
            raise ApiError("validation", f"unknown input {tensor['name']!r}: the model takes one BYTES input named 'text'")
        texts = _texts(tensor, raw)
    if texts is None:
        raise ApiError("validation", "no input named 'text'")
    if offset != len(binary):
        raise ApiError("malformed", f"{len(binary) - offset} bytes of binary data follow the inputs unclaimed")
    return request, texts


def _texts(tensor: dict, raw: bytes | None) -> list[str]:
    if tensor.get("datatype") != "BYTES":
        raise ApiError("validation", f"input 'text' has datatype {tensor.get('datatype')!r}; send BYTES")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
        or len(shape) not in (1, 2)
        or (len(shape) == 2 and shape[1] != 1)
    ):
        raise ApiError("validation", f"input 'text' has shape {shape!r}; send [N] or [N, 1]")
    n = shape[0]
    if raw is not None:
        items = _unpack_bytes(raw)
    else:
        data = tensor.get("data")
        if not isinstance(data, list):
            raise ApiError("validation", "input 'text' has no data list")
        items = _flatten(data)
    if len(items) != n:
        raise ApiError("validation", f"input 'text' has shape {shape} but {len(items)} elements")
    texts = []
    for i, item in enumerate(items):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError:
                raise ApiError("validation", f"text[{i}] is not valid UTF-8") from None
        if not isinstance(item, str):
            raise ApiError("validation", f"text[{i}] is a {type(item).__name__}, not a string")
        texts.append(item)
    return texts


def _flatten(data: list) -> list:
    out = []
    for x in data:
        out.extend(_flatten(x) if isinstance(x, list) else [x])
    return out


def _unpack_bytes(raw: bytes) -> list[bytes]:
    items, i = [], 0
    while i < len(raw):
        if i + 4 > len(raw):
            raise ApiError("malformed", "a BYTES element's 4-byte length is cut short")
        (n,) = struct.unpack_from("<I", raw, i)
        if i + 4 + n > len(raw):
            raise ApiError("malformed", f"a BYTES element of {n} bytes runs past the tensor's data")
        items.append(raw[i + 4 : i + 4 + n])
        i += 4 + n
    return items


def _pack_bytes(items: list[str]) -> bytes:
    parts = []
    for s in items:
        b = s.encode("utf-8")
        parts.append(struct.pack("<I", len(b)) + b)
    return b"".join(parts)


def output_tensors(task: str, predictions: list[dict], logits: list[np.ndarray] | None) -> dict[str, tuple[str, list, object]]:
    """name -> (datatype, shape, values) for every output the model has."""
    n = len(predictions)
    truncated = [bool(p.get("truncated", False)) for p in predictions]
    if task == "token-classification":
        return {
            "tags": ("BYTES", [n], [" ".join(p["tags"]) for p in predictions]),
            "entities": ("BYTES", [n], [json.dumps(p["entities"]) for p in predictions]),
            "truncated": ("BOOL", [n], truncated),
        }
    stacked = np.stack(logits).astype(np.float32)
    return {
        "label": ("BYTES", [n], [p["label"] for p in predictions]),
        "score": ("FP32", [n], [p["score"] for p in predictions]),
        "logits": ("FP32", list(stacked.shape), stacked),
        "truncated": ("BOOL", [n], truncated),
    }


def infer_response(name: str, request: dict, tensors: dict[str, tuple[str, list, object]]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers: the outputs asked for (all when none are), JSON or binary as asked."""
    params = request.get("parameters") if isinstance(request.get("parameters"), dict) else {}
    binary_all = bool(params.get("binary_data_output", False))
    asked = request.get("outputs")
    if asked is None:
        wanted = [(out, binary_all) for out in tensors]
    else:
        if not isinstance(asked, list):
            raise ApiError("malformed", '"outputs" must be a list')
        wanted = []
        for i, o in enumerate(asked):
            if not isinstance(o, dict) or o.get("name") not in tensors:
                got = o.get("name") if isinstance(o, dict) else o
                raise ApiError("validation", f"outputs[{i}] names {got!r}; this model's outputs are {', '.join(tensors)}")
            p = o.get("parameters") if isinstance(o.get("parameters"), dict) else {}
            wanted.append((o["name"], bool(p.get("binary_data", binary_all))))
    outputs, blobs = [], []
    for out, binary in wanted:
        dtype, shape, values = tensors[out]
        entry = {"name": out, "datatype": dtype, "shape": shape}
        if binary:
            blob = _pack_bytes(values) if dtype == "BYTES" else np.asarray(values, dtype=NUMPY[dtype]).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            entry["data"] = np.asarray(values).reshape(-1).tolist() if dtype != "BYTES" else list(values)
        outputs.append(entry)
    head = {"model_name": name, "model_version": "1", "outputs": outputs}
    if "id" in request:
        head["id"] = request["id"]
    encoded = json.dumps(head, allow_nan=False).encode()
    if not blobs:
        return encoded, {}
    return encoded + b"".join(blobs), {"Inference-Header-Content-Length": str(len(encoded))}
