"""Load an export folder once and classify texts with onnxruntime + tokenizers + numpy (no torch)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

# the custom-op library for model.prefix_op.onnx (make kernels); EDGETUNE_KERNELS overrides the path
KERNELS_LIBRARY = Path(__file__).resolve().parents[1] / "build" / "kernels" / "libedgetune_ort.so"


class ServeError(Exception):
    """A problem with the export folder or a request; the message says what is wrong."""


def pick_providers(requested: str = "auto", tf32: bool = False) -> list:
    """CUDA when onnxruntime-gpu is installed (or asked for), else CPU.

    onnxruntime's CUDA provider computes fp32 MatMuls in TF32 unless told otherwise: measured on an H100, that moved
    the default run's logits by 8.9e-3 (same argmax on 82 dev sentences) against 1.3e-5 without it, for 1.0-1.7x speed.
    So TF32 is off unless asked for.
    """
    available = ort.get_available_providers()
    if requested == "cpu":
        return ["CPUExecutionProvider"]
    if requested == "cuda" and "CUDAExecutionProvider" not in available:
        raise ServeError(f"CUDA was asked for but this onnxruntime has only {available} (install onnxruntime-gpu)")
    if "CUDAExecutionProvider" in available:
        if hasattr(ort, "preload_dlls"):  # onnxruntime-gpu: load CUDA/cuDNN from the nvidia-* wheels if present
            ort.preload_dlls()
        return [("CUDAExecutionProvider", {"use_tf32": int(tf32)}), "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


class Classifier:
    """The exported model, its tokenizer and labels. ``classify(texts)`` -> one dict per text."""

    def __init__(
        self,
        export_dir: str | Path,
        providers: str = "auto",
        max_length: int | None = None,
        precision: str = "fp32",
        tf32: bool = False,
        kernels: str | Path | None = None,
    ) -> None:
        d = Path(export_dir)
        if precision not in ("fp32", "int8"):
            raise ServeError(f"precision {precision!r} must be fp32 or int8")
        model = "model.onnx" if precision == "fp32" else "model.int8.onnx"
        for name in (model, "tokenizer.json", "labels.json", "manifest.json"):
            if not (d / name).is_file():
                hint = "export without --no-int8" if name == "model.int8.onnx" else "run `make export` first"
                raise ServeError(f"export folder {d} has no {name} ({hint})")
        self.export_dir = d
        self.precision = precision
        self.manifest = json.loads((d / "manifest.json").read_text())
        self.labels = json.loads((d / "labels.json").read_text())
        self.max_length = int(max_length or self.manifest.get("max_length", 128))
        if self.max_length > int(self.manifest.get("max_positions", 512)):
            raise ServeError(f"max_length {self.max_length} exceeds the model's {self.manifest['max_positions']} positions")
        self.tokenizer = Tokenizer.from_file(str(d / "tokenizer.json"))
        self.tokenizer.enable_truncation(self.max_length)
        config_path = d / "tokenizer_config.json"
        pad = json.loads(config_path.read_text()).get("pad_token") if config_path.is_file() else None
        pad = (pad.get("content") if isinstance(pad, dict) else pad) or "[PAD]"
        pad_id = self.tokenizer.token_to_id(pad)
        if pad_id is None:
            raise ServeError(f"the tokenizer has no padding token {pad!r}")
        self.tokenizer.enable_padding(pad_id=pad_id, pad_token=pad)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        chosen = pick_providers(providers, tf32)
        library = Path(kernels or os.environ.get("EDGETUNE_KERNELS") or KERNELS_LIBRARY)
        on_cuda = chosen[0] != "CPUExecutionProvider"
        if precision == "fp32" and on_cuda and (d / "model.prefix_op.onnx").is_file() and library.is_file():
            # the prefix graph with the PrefixAttention Triton kernel. The library registers the op for the CUDA provider
            # only (and nothing on a machine without a CUDA device); on a GPU machine it must stay out of CPU sessions:
            # there its op would shadow the node's function body and have no kernel.
            opts.register_custom_ops_library(str(library))
            model = "model.prefix_op.onnx"
        self.graph = model
        self.session = ort.InferenceSession(str(d / model), opts, providers=chosen)

    @property
    def provider(self) -> str:
        return self.session.get_providers()[0]

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        enc = self.tokenizer.encode_batch(texts)
        return {
            "input_ids": np.asarray([e.ids for e in enc], dtype=np.int64),
            "attention_mask": np.asarray([e.attention_mask for e in enc], dtype=np.int64),
        }

    def logits(self, texts: list[str]) -> np.ndarray:
        return self.session.run(["logits"], self.encode(texts))[0]

    def predict(self, texts: list[str], top_k: int = 1) -> list[dict]:
        return self.classify(texts, top_k)

    def classify(self, texts: list[str], top_k: int = 1) -> list[dict]:
        probs = softmax(self.logits(texts).astype(np.float64))
        out = []
        for row in probs:
            order = np.argsort(-row)[:top_k]
            out.append(
                {
                    "label": self.labels[order[0]],
                    "score": float(row[order[0]]),
                    "top": [{"label": self.labels[i], "score": float(row[i])} for i in order],
                }
            )
        return out


def load_model(export_dir: str | Path, **kw) -> Classifier:
    """The right runtime for an export folder: a Classifier, or a Tagger for a token-classification export."""
    manifest = Path(export_dir) / "manifest.json"
    task = json.loads(manifest.read_text()).get("task") if manifest.is_file() else None
    if task == "token-classification":
        from serve.tags import Tagger

        return Tagger(export_dir, **kw)
    return Classifier(export_dir, **kw)
