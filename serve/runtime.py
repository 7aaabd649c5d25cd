"""Load an export folder once and classify texts with onnxruntime + tokenizers + numpy (no torch).

A request's texts become rows (token ids, truncated or not); rows of any requests run together in one padded batch
(``run``); each row's output becomes its prediction (``result``). ``classify`` / ``predict`` do all three at once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from serve.buckets import BucketRunner
from text.words import pad

# the custom-op library for model.prefix_op.onnx (make kernels); EDGETUNE_KERNELS overrides the path
KERNELS_LIBRARY = Path(__file__).resolve().parents[1] / "build" / "kernels" / "libedgetune_ort.so"
GRAPHS = {"fp32": "model.onnx", "int8": "model.int8.onnx", "fp16": "model.fp16.onnx"}
PRECISIONS = ("auto", *GRAPHS)  # auto: fp16 on the CUDA provider where the export has it, else fp32
# how onnxruntime's intra-op threads wait for work: "run" spins inside a run and sleeps once it returns, so that
# between runs the cores go to the HTTP side and the tokeniser; "always" is onnxruntime's default (spin after a run
# too); "never" sleeps between the parallel parts of a run as well
SPIN = {"run": {"session.force_spinning_stop": "1"}, "always": {}, "never": {"session.intra_op.allow_spinning": "0"}}


class ServeError(Exception):
    """A problem with the export folder or a request; the message says what is wrong."""


class TextTooLong(ServeError):
    """A text over the model's token limit, with truncation off."""

    def __init__(self, index: int, tokens: int, limit: int) -> None:
        super().__init__(f'texts[{index}] has {tokens} tokens; the model takes at most {limit} (send "truncate": true)')
        self.index, self.tokens, self.limit = index, tokens, limit


@dataclass
class Row:
    """One text, tokenised: what the scheduler batches. Taggers also keep the words and their first word pieces."""

    ids: list[int]
    truncated: bool
    words: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # the first word piece of each kept word
    kept: list[int] = field(default_factory=list)  # which word each of those is
    adapter: object = None  # a bank's rows: the adapter they run with (serve.bank.Adapter)

    def __len__(self) -> int:
        return len(self.ids)


def pick_providers(requested: str = "auto", tf32: bool = False, cuda_graph: bool = False) -> list:
    """CUDA when onnxruntime-gpu is installed (or asked for), else CPU.

    onnxruntime's CUDA provider computes fp32 MatMuls in TF32 unless told otherwise, which moves the logits by ~1e-2
    (docs/BENCHMARKS.md); so TF32 is off unless asked for.
    """
    available = ort.get_available_providers()
    if requested == "cpu":
        return ["CPUExecutionProvider"]
    if requested == "cuda" and "CUDAExecutionProvider" not in available:
        raise ServeError(f"CUDA was asked for but this onnxruntime has only {available} (install onnxruntime-gpu)")
    if "CUDAExecutionProvider" in available:
        if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu: load CUDA/cuDNN from the nvidia-* wheels if present
            ort.preload_dlls()
        return [("CUDAExecutionProvider", {"use_tf32": int(tf32), "enable_cuda_graph": int(cuda_graph)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Classifier:
    """The exported model, its tokenizer and labels. ``classify(texts)`` -> one dict per text."""

    FILES = ("tokenizer.json", "labels.json", "manifest.json")  # besides the graph
    BUCKETS = True  # on the CUDA provider, run through fixed-shape buckets (serve/buckets.py)

    def __init__(
        self,
        export_dir: str | Path,
        providers: str = "auto",
        max_length: int | None = None,
        precision: str = "fp32",
        tf32: bool = False,
        kernels: str | Path | None = None,
        threads: int = 0,
        max_rows: int = 32,
        cuda_graphs: bool = True,
        spin: str = "run",
    ) -> None:
        d = Path(export_dir)
        if precision not in PRECISIONS:
            raise ServeError(f"precision {precision!r} must be one of {', '.join(PRECISIONS)}")
        if spin not in SPIN:
            raise ServeError(f"spin {spin!r} must be one of {', '.join(SPIN)}")
        chosen = pick_providers(providers)
        on_cuda = chosen[0] != "CPUExecutionProvider"
        if precision == "auto":
            precision = "fp16" if on_cuda and (d / GRAPHS["fp16"]).is_file() else "fp32"
        model = GRAPHS[precision]
        for name in (model, *self.FILES):
            if not (d / name).is_file():
                hint = {"model.int8.onnx": "export without --no-int8", "model.fp16.onnx": "export without --no-fp16 (see manifest"
                        " fp16_skipped)"}.get(name, "run `make export` first")  # fmt: skip
                raise ServeError(f"export folder {d} has no {name} ({hint})")
        self.export_dir = d
        self.precision = precision
        self.manifest = read_json(d / "manifest.json")
        self.labels = self.read_labels(d)
        self.max_length = int(max_length or self.manifest.get("max_length", 128))
        if self.max_length > int(self.manifest.get("max_positions", 512)):
            raise ServeError(f"max_length {self.max_length} exceeds the model's {self.manifest['max_positions']} positions")
        try:
            self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        except Exception as e:  # tokenizers raises its own Exception type for a malformed file
            raise ServeError(f"{d / 'tokenizer.json'} is not a tokenizer: {e}") from None
        self.tokenizer.no_padding()  # rows are padded per batch (pad), not per request
        self.full_tokenizer = Tokenizer.from_str(self.tokenizer.to_str())  # untruncated: counts a refused text's tokens
        self.full_tokenizer.no_truncation()
        self.tokenizer.enable_truncation(self.max_length)
        config_path = d / "tokenizer_config.json"
        pad_token = read_json(config_path).get("pad_token") if config_path.is_file() else None
        pad_token = (pad_token.get("content") if isinstance(pad_token, dict) else pad_token) or "[PAD]"
        pad_id = self.tokenizer.token_to_id(pad_token)
        if pad_id is None:
            raise ServeError(f"the tokenizer has no padding token {pad_token!r}")
        self.pad_id = pad_id
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:  # the cores this model's runs may use; one run at a time, so no inter-op pool
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        for key, value in SPIN[spin].items():
            opts.add_session_config_entry(key, value)
        chosen = pick_providers(providers, tf32, cuda_graph=on_cuda and cuda_graphs)
        library = Path(kernels or os.environ.get("EDGETUNE_KERNELS") or KERNELS_LIBRARY)
        if precision == "fp32" and on_cuda and (d / "model.prefix_op.onnx").is_file() and library.is_file():
            # the prefix graph with the PrefixAttention Triton kernel. The library registers the op for the CUDA provider
            # only (and nothing on a machine without a CUDA device); on a GPU machine it must stay out of CPU sessions:
            # there its op would shadow the node's function body and have no kernel.
            opts.register_custom_ops_library(str(library))
            model = "model.prefix_op.onnx"
        self.graph = model
        try:
            self.session = ort.InferenceSession(str(d / model), opts, providers=chosen)
        except Exception as e:  # onnxruntime's own exception types: a truncated or foreign file
            raise ServeError(f"{d / model} does not load in onnxruntime: {e}") from None
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.runner = None  # on the CUDA provider: fixed-shape buckets, I/O binding, CUDA graphs (serve/buckets.py)
        if on_cuda and self.BUCKETS:
            self.runner = BucketRunner(
                self.session, "cuda", max_rows, self.max_length, self.pad_id, len(self.labels), cuda_graphs
            )
            try:
                self.runner.warm_up()
            except Exception as e:  # onnxruntime's own types: a node that cannot be captured, or out of memory
                hint = " (try --no-cuda-graphs)" if cuda_graphs else ""
                raise ServeError(f"{d / model} does not run at fixed shapes on CUDA{hint}: {e}") from None

    def read_labels(self, d: Path) -> list[str]:
        labels = read_json(d / "labels.json")
        if not isinstance(labels, list) or not labels or not all(isinstance(x, str) for x in labels):
            raise ServeError(f"{d / 'labels.json'} must be a non-empty list of label names")
        return labels

    def labels_of(self, row: Row) -> list[str]:
        """The label names of a row's output."""
        return self.labels

    def session_run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self.runner.run(names, feeds) if self.runner else self.session.run(names, feeds)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    @property
    def task(self) -> str:
        return self.manifest.get("task", "sequence-classification")

    # rows: tokenise, batch, read back

    def rows(self, texts: list[str], truncate: bool = True) -> list[Row]:
        """Token ids of each text, cut to max_length; with ``truncate`` off, a text over it raises TextTooLong."""
        out = []
        for i, e in enumerate(self.tokenizer.encode_batch(texts)):
            if e.overflowing and not truncate:
                raise TextTooLong(i, len(self.full_tokenizer.encode(texts[i]).ids), self.max_length)
            out.append(Row(e.ids, bool(e.overflowing)))
        return out

    def feeds(self, rows: list[Row]) -> dict[str, np.ndarray]:
        ids = pad([r.ids for r in rows], self.pad_id)
        return {"input_ids": ids, "attention_mask": pad([[1] * len(r) for r in rows])}

    def run(self, rows: list[Row]) -> list[np.ndarray]:
        """One session run over rows of any lengths (padded to the longest): each row's logits."""
        return list(self.session_run(["logits"], self.feeds(rows))[0])

    def result(self, row: Row, out: np.ndarray, top_k: int = 1) -> dict:
        labels = self.labels_of(row)
        probs = softmax(out.astype(np.float64))
        order = np.argsort(-probs)[: max(1, min(top_k, len(labels)))]
        pred = {
            "label": labels[order[0]],
            "score": float(probs[order[0]]),
            "top": [{"label": labels[i], "score": float(probs[i])} for i in order],
        }
        if row.truncated:
            pred["truncated"] = True
        return pred

    # the whole path at once

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        return self.feeds(self.rows(texts))

    def logits(self, texts: list[str]) -> np.ndarray:
        return np.stack(self.run(self.rows(texts)))

    def predict(self, texts: list[str], top_k: int = 1, truncate: bool = True) -> list[dict]:
        rows = self.rows(texts, truncate)
        return [self.result(r, o, top_k) for r, o in zip(rows, self.run(rows), strict=True)]

    def classify(self, texts: list[str], top_k: int = 1) -> list[dict]:
        return self.predict(texts, top_k)


def read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServeError(f"{path} is not readable JSON: {e}") from None
