"""Dynamic int8 quantisation for CPU serving, judged by task accuracy rather than logit difference.

fp32 onnxruntime on a small CPU is compute-bound on the same GEMMs as eager PyTorch; int8 (VNNI) halves that. Its
logits move by more than the fp32 parity tolerance, so the gate is the dev accuracy: the int8 graph may lose at most
``max_drop`` of the fp32 graph's dev accuracy.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnxruntime.quantization import QuantType, quantize_dynamic

from adapters.errors import ParityError


def quantize_int8(src: Path, dst: Path) -> None:
    """Weights of every MatMul with a constant weight, and of onnxruntime's fused Attention (QAttention), to int8
    per output channel; activations are quantised at run time (the variants compared: docs/BENCHMARKS.md, "int8
    variants").
    """

    root = logging.getLogger()  # the quantizer logs "consider pre-processing" advice on the root logger on every call
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=["MatMul", "Attention"],
            extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    finally:
        root.setLevel(level)


def logits_onnx(session, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Logits (N, labels) from an onnxruntime session, in the order of ``texts``, run in batches of similar length."""
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    logits = None
    for j in range(0, len(order), batch_size):
        idx = order[j : j + batch_size]
        enc = tokenizer([texts[i] for i in idx], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        out = session.run(["logits"], feeds)[0]
        if logits is None:
            logits = np.empty((len(texts), out.shape[-1]), dtype=out.dtype)
        logits[idx] = out
    return logits if logits is not None else np.empty((0, 0), dtype=np.float32)


def predict_onnx(session, tokenizer, texts: list[str], max_length: int, batch_size: int = 64) -> np.ndarray:
    """Class ids from an onnxruntime session, batches of similar length."""
    logits = logits_onnx(session, tokenizer, texts, max_length, batch_size)
    return logits.argmax(-1).astype(np.int64) if len(logits) else np.empty(0, dtype=np.int64)


@dataclass(frozen=True)
class Int8Gate:
    file: str
    dev_accuracy_fp32: float
    dev_accuracy_int8: float
    argmax_agree_with_fp32: float
    n_samples: int
    max_drop: float

    def to_dict(self) -> dict:
        return asdict(self)


def check_int8(
    fp32_session,
    int8_session,
    tokenizer,
    texts: list[str],
    labels: np.ndarray,
    max_length: int,
    max_drop: float,
    file: str = "model.int8.onnx",
) -> Int8Gate:
    """Compare dev accuracy of the int8 graph with the fp32 graph.

    Raises:
        ParityError: int8 loses more than ``max_drop`` accuracy.
    """
    p32 = predict_onnx(fp32_session, tokenizer, texts, max_length)
    p8 = predict_onnx(int8_session, tokenizer, texts, max_length)
    gate = Int8Gate(
        file, float((p32 == labels).mean()), float((p8 == labels).mean()), float((p32 == p8).mean()), len(texts), max_drop
    )
    if gate.dev_accuracy_int8 < gate.dev_accuracy_fp32 - max_drop:
        raise ParityError(
            f"int8 gate failed: dev accuracy {gate.dev_accuracy_int8:.4f} vs fp32 {gate.dev_accuracy_fp32:.4f} "
            f"(allowed drop {max_drop}); export again with --no-int8 or a larger --int8-max-drop"
        )
    return gate
