"""The parity gate: onnxruntime must reproduce the eager PyTorch adapter model, and the adapter must matter."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from train.errors import ParityError

BATCH_SIZES = (1, 8, 32, 1, 8, 32)  # 82 sentences, each size twice


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float  # onnxruntime vs eager adapter model, logits
    argmax_agree: float  # fraction of samples with the same predicted class
    n_samples: int
    batch_sizes: list[int]
    adapter_effect: float  # max |logits(adapter) - logits(bare base with the same head)|
    tolerance: float
    provider: str

    def to_dict(self) -> dict:
        return asdict(self)


def _batches(texts: list[str], sizes: tuple[int, ...]):
    start = 0
    for size in sizes:
        yield texts[start : start + size]
        start += size


@torch.inference_mode()
def check_parity(
    session,
    eager,
    bare,
    tokenizer,
    texts: list[str],
    max_length: int,
    tolerance: float = 1e-4,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    require_effect: bool = True,
) -> Parity:
    """Compare onnxruntime with the eager model on real sentences, each batch padded to its longest row.

    Raises:
        ParityError: logits differ by more than ``tolerance``, an argmax differs, or the adapter changes the logits
            by less than 10x the tolerance (then the gate could not tell a dropped adapter from a kept one).
    """
    need = sum(batch_sizes)
    if len(texts) < need:
        texts = (texts * (need // max(len(texts), 1) + 1))[:need]
    diffs, agree, effect, n = [], 0, 0.0, 0
    for batch in _batches(texts, batch_sizes):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        ort_logits = session.run(["logits"], feeds)[0]
        device = next(eager.parameters()).device
        ids, mask = torch.from_numpy(feeds["input_ids"]).to(device), torch.from_numpy(feeds["attention_mask"]).to(device)
        ref = eager(ids, mask).float().cpu().numpy()
        base = bare(ids, mask).float().cpu().numpy()
        diffs.append(float(np.abs(ort_logits - ref).max()))
        agree += int((ort_logits.argmax(-1) == ref.argmax(-1)).sum())
        effect = max(effect, float(np.abs(ref - base).max()))
        n += len(batch)
    result = Parity(max(diffs), agree / n, n, list(batch_sizes), effect, tolerance, session.get_providers()[0])
    if not result.max_abs_diff <= tolerance:
        raise ParityError(
            f"parity gate failed: onnxruntime logits differ from eager PyTorch by {result.max_abs_diff:.3g} "
            f"(tolerance {tolerance:g}); the export is not kept"
        )
    if result.argmax_agree < 1.0:
        raise ParityError(f"parity gate failed: predicted class differs on {n - agree} of {n} samples; the export is not kept")
    if require_effect and result.adapter_effect < 10 * tolerance:
        raise ParityError(
            f"parity gate failed: the adapter changes the logits by only {effect:.3g}, too little to check "
            "that the export kept it (is the adapter trained?)"
        )
    return result
