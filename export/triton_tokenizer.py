"""Triton python-backend model: ``TEXT`` (BYTES, one string per batch row) -> the exported graph's inputs.

``python -m export`` copies this file to ``RUN/export/triton/NAME_tokenizer/1/model.py`` beside the export's
``tokenizer.json``. It runs inside Triton's python backend (``triton_python_backend_utils`` exists only there) and needs
``tokenizers`` and ``numpy`` in that Python. The tokenisation, ``encode``, is plain numpy and is that of the edgetune
server (serve/runtime.py, serve/tags.py): truncation at ``max_length``; a tagger's text split into words on
whitespace, each word at its first word piece (``word_index``, ``word_mask``). Each request's rows are padded to a
multiple of ``pad_to_multiple_of`` tokens (and words), at most ``max_length`` tokens: Triton's dynamic batcher joins
requests of one shape only, and buckets give it more to join. Padding is masked, so it leaves the outputs as they are.

Parameters (config.pbtxt ``parameters``): ``max_length``, ``pad_token``, ``pad_to_multiple_of``; the outputs it writes
are the config's ``output`` names (INT64).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from tokenizers import Tokenizer

TEXT = "TEXT"
WORD_INPUTS = ("word_index", "word_mask")


def load_tokenizer(path: Path, max_length: int, pad_token: str) -> Tokenizer:
    """tokenizer.json with truncation at ``max_length`` and padding to the longest row with ``pad_token``."""
    tokenizer = Tokenizer.from_file(str(path))
    pad_id = tokenizer.token_to_id(pad_token)
    if pad_id is None:
        raise ValueError(f"the tokenizer has no padding token {pad_token!r}")
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(pad_id=pad_id, pad_token=pad_token)
    return tokenizer


def first_pieces(word_ids: list[int | None]) -> list[int]:
    """The position of each word's first word piece in a tokenizer's ``word_ids`` list (words cut off are absent)."""
    positions, prev = [], None
    for pos, w in enumerate(word_ids):
        if w is not None and w != prev:
            positions.append(pos)
        prev = w
    return positions


def _bucket(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _pad(a: np.ndarray, width: int, value: int) -> np.ndarray:
    return np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=value)


def encode(
    tokenizer: Tokenizer, texts: list[str], outputs: list[str], max_length: int, multiple: int = 1
) -> dict[str, np.ndarray]:
    """The graph inputs named in ``outputs`` for ``texts`` (int64, (B, S) and, for a tagger, (B, W))."""
    tagger = any(name in WORD_INPUTS for name in outputs)
    enc = tokenizer.encode_batch([t.split() for t in texts], is_pretokenized=True) if tagger else tokenizer.encode_batch(texts)
    ids = np.asarray([e.ids for e in enc], dtype=np.int64)  # (B, S): rows padded to the longest
    mask = np.asarray([e.attention_mask for e in enc], dtype=np.int64)
    width = max(ids.shape[1], min(_bucket(ids.shape[1], multiple), max_length))
    pad_id = tokenizer.padding["pad_id"] if tokenizer.padding else 0
    arrays = {"input_ids": _pad(ids, width, pad_id), "attention_mask": _pad(mask, width, 0)}
    if tagger:
        pieces = [first_pieces(e.word_ids) for e in enc]
        words = _bucket(max(1, max((len(p) for p in pieces), default=0)), multiple)
        arrays["word_index"] = np.zeros((len(texts), words), dtype=np.int64)  # (B, W)
        arrays["word_mask"] = np.zeros((len(texts), words), dtype=np.int64)
        for i, p in enumerate(pieces):
            arrays["word_index"][i, : len(p)] = p
            arrays["word_mask"][i, : len(p)] = 1
    return {name: arrays[name] for name in outputs}


class TritonPythonModel:
    """TEXT -> input_ids, attention_mask (and word_index, word_mask for a tagger), one response per request."""

    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        self.outputs = [o["name"] for o in config["output"]]
        wrong = [o["name"] for o in config["output"] if o["data_type"] != "TYPE_INT64"]
        if wrong:
            raise ValueError(f"outputs {wrong} must be TYPE_INT64 (the graph's inputs are int64)")
        self.max_length = int(params["max_length"])
        self.multiple = int(params.get("pad_to_multiple_of", "1"))
        self.tokenizer = load_tokenizer(Path(__file__).resolve().parent / "tokenizer.json", self.max_length, params["pad_token"])

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, TEXT).as_numpy().reshape(-1)  # (B,) of bytes
                texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in raw]
                arrays = encode(self.tokenizer, texts, self.outputs, self.max_length, self.multiple)
                tensors = [pb_utils.Tensor(name, arrays[name]) for name in self.outputs]
                responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            except (UnicodeDecodeError, ValueError) as e:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))))
        return responses
