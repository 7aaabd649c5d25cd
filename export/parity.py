"""The parity gate: onnxruntime must reproduce the eager PyTorch adapter model, and the adapter must matter.

Two fp32 evaluations of one function (onnxruntime's fused graph and eager PyTorch) differ by their rounding errors,
and how large those are depends on the CPU's kernels (AVX-512 or AVX2 GEMM blocking, FMA contraction, oneDNN or MKL).
So the gate measures them on the machine it runs on: the eager model is also evaluated in float64 (its own error,
~1e-16 relative, is nine orders below fp32's) and the error of eager fp32 against it, ``reference_error``, sets how
far apart the two fp32 results may be (``fp32_bound``). The default tolerance is the larger of 1e-4 and that bound, so
the gate holds on any CPU without being looser than 1e-4 where fp32 is that accurate.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import numpy as np
import torch

from adapters.crf import decode_tags
from adapters.errors import ParityError
from text.words import first_pieces
from train.tagging import collate_words, gather_words

BATCH_SIZES = (1, 8, 32, 1, 8, 32)  # 82 sentences, each size twice
DEFAULT_TOLERANCE = 1e-4
FP32_EPS = float(np.finfo(np.float32).eps)
ERROR_FACTOR = 4.0  # a second fp32 evaluation of the same function, in another order, may carry 4x the first's error
FLOOR_ULPS = 8.0  # and a few units in the last place of the largest value, for when the first happens to be exact


def fp32_bound(reference_error: float, scale: float, eps: float = FP32_EPS) -> float:
    """The largest error against float64 accepted from an fp32 evaluation of a function, given the error of another
    fp32 evaluation of it (``reference_error``, measured on this machine) and the magnitude of its values (``scale``,
    max |float64 value|). A dropped, doubled or mis-scaled adapter moves the values by orders of magnitude more.
    ``eps``: the machine epsilon of another precision (float16's, for an fp16 graph against fp16 PyTorch)."""
    return ERROR_FACTOR * reference_error + FLOOR_ULPS * eps * scale


def diff_bound(reference_error: float, scale: float) -> float:
    """The largest |a - b| between that evaluation and the reference one: the sum of the two errors' bounds."""
    return reference_error + fp32_bound(reference_error, scale)


def float64_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same model in float64: the exact reference of the fp32 one (weights are fp32 values, so exact in float64)."""
    return copy.deepcopy(model).double().eval()


@dataclass(frozen=True)
class Parity:
    max_abs_diff: float  # onnxruntime vs eager adapter model, logits
    argmax_agree: float  # fraction of samples with the same predicted class
    n_samples: int
    batch_sizes: list[int]
    adapter_effect: float  # max |logits(adapter) - logits(bare base with the same head)|
    tolerance: float  # the bound max_abs_diff was held to
    provider: str
    reference_error: float  # eager fp32 vs the same model in float64: fp32's own rounding on this machine
    max_abs_error: float  # onnxruntime vs the float64 model
    scale: float  # max |logit| of the float64 model

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
    tolerance: float | None = None,
    batch_sizes: tuple[int, ...] = BATCH_SIZES,
    require_effect: bool = True,
) -> Parity:
    """Compare onnxruntime with the eager model on real sentences, each batch padded to its longest row.

    ``tolerance`` None: the larger of 1e-4 and the bound that this machine's fp32 rounding implies (``diff_bound``).

    Raises:
        ParityError: logits differ by more than the tolerance, an argmax differs, or the adapter changes the logits
            by less than 10x the tolerance (then the gate could not tell a dropped adapter from a kept one).
    """
    need = sum(batch_sizes)
    if len(texts) < need:
        texts = (texts * (need // max(len(texts), 1) + 1))[:need]
    exact_model = float64_copy(eager)
    diffs, ref_errs, errs, scale, agree, effect, n = [], [], [], 0.0, 0, 0.0, 0
    for batch in _batches(texts, batch_sizes):
        enc = tokenizer(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        ort_logits = session.run(["logits"], feeds)[0]
        device = next(eager.parameters()).device
        ids, mask = torch.from_numpy(feeds["input_ids"]).to(device), torch.from_numpy(feeds["attention_mask"]).to(device)
        ref = eager(ids, mask).float().cpu().numpy()
        exact = exact_model(ids, mask).cpu().numpy()
        base = bare(ids, mask).float().cpu().numpy()
        diffs.append(float(np.abs(ort_logits - ref).max()))
        ref_errs.append(float(np.abs(ref - exact).max()))
        errs.append(float(np.abs(ort_logits - exact).max()))
        scale = max(scale, float(np.abs(exact).max()))
        agree += int((ort_logits.argmax(-1) == ref.argmax(-1)).sum())
        effect = max(effect, float(np.abs(ref - base).max()))
        n += len(batch)
    if tolerance is None:
        tolerance = max(DEFAULT_TOLERANCE, diff_bound(max(ref_errs), scale))
    result = Parity(
        max(diffs),
        agree / n,
        n,
        list(batch_sizes),
        effect,
        tolerance,
        session.get_providers()[0],
        max(ref_errs),
        max(errs),
        scale,
    )
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


@dataclass(frozen=True)
class TagParity(Parity):
    paths_agree: float = 1.0  # fraction of sentences whose decoded tag path equals the eager PyTorch decode


@torch.inference_mode()
def check_tagging_parity(
    session,
    eager,
    bare,
    tokenizer,
    sentences: list[list[str]],
    max_length: int,
    tolerance: float | None = None,
    require_effect: bool = True,
) -> TagParity:
    """Every sentence, in batches of 1, 8 and then 32: the graph's word emissions within ``tolerance`` of the eager
    model's, and its decoded tags (in the graph, or decoded here from an emissions-only graph with the same CRF) equal
    to the eager decode (the CRF's Viterbi path, or the argmax).

    Raises:
        ParityError: as check_parity, with paths instead of argmax.
    """

    sizes = [1, 8] + [32] * max(0, -(-(len(sentences) - 9) // 32))
    outputs = [o.name for o in session.get_outputs()]
    device = next(eager.parameters()).device
    exact_model = float64_copy(eager)
    diffs, ref_errs, errs, scale, agree, effect, n, start = [], [], [], 0.0, 0, 0.0, 0, 0
    for size in sizes:
        batch = sentences[start : start + size]
        start += size
        if not batch:
            break
        enc = tokenizer(
            batch, is_split_into_words=True, padding=True, truncation=True, max_length=max_length, return_tensors="np"
        )
        word_index, word_mask, _ = collate_words([first_pieces(enc.word_ids(i))[0] for i in range(len(batch))])
        feeds = {
            "input_ids": enc["input_ids"].astype(np.int64),
            "attention_mask": enc["attention_mask"].astype(np.int64),
            "word_index": word_index.numpy(),
            "word_mask": word_mask.long().numpy(),
        }
        inputs = {i.name for i in session.get_inputs()}  # an emissions-only graph has no word_mask input
        got = dict(zip(outputs, session.run(outputs, {k: v for k, v in feeds.items() if k in inputs}), strict=True))
        ids, mask = torch.from_numpy(feeds["input_ids"]).to(device), torch.from_numpy(feeds["attention_mask"]).to(device)
        ref = gather_words(eager(ids, mask).float(), word_index.to(device))
        exact = gather_words(exact_model(ids, mask), word_index.to(device))
        base = gather_words(bare(ids, mask).float(), word_index.to(device))
        wm = word_mask.to(device)
        ours = torch.from_numpy(got["emissions"]).to(device)
        tags = torch.from_numpy(got["tags"]).to(device) if "tags" in got else decode_tags(eager.crf, ours, wm)
        diffs.append(float((ours - ref).abs()[wm].max()) if wm.any() else 0.0)
        ref_errs.append(float((ref.double() - exact).abs()[wm].max()) if wm.any() else 0.0)
        errs.append(float((ours.double() - exact).abs()[wm].max()) if wm.any() else 0.0)
        scale = max(scale, float(exact.abs()[wm].max()) if wm.any() else 0.0)
        agree += int((tags == decode_tags(eager.crf, ref, wm)).all(dim=1).sum())
        effect = max(effect, float((ref - base).abs()[wm].max()) if wm.any() else 0.0)
        n += len(batch)
    if tolerance is None:
        tolerance = max(DEFAULT_TOLERANCE, diff_bound(max(ref_errs), scale))
    result = TagParity(
        max(diffs), agree / n, n, sizes[: len(diffs)], effect, tolerance, session.get_providers()[0], max(ref_errs), max(errs),
        scale, agree / n,
    )  # fmt: skip
    if not result.max_abs_diff <= tolerance:
        raise ParityError(
            f"parity gate failed: onnxruntime emissions differ from eager PyTorch by {result.max_abs_diff:.3g} "
            f"(tolerance {tolerance:g}); the export is not kept"
        )
    if agree < n:
        raise ParityError(f"parity gate failed: the decoded tags differ on {n - agree} of {n} sentences; the export is not kept")
    if require_effect and result.adapter_effect < 10 * tolerance:
        raise ParityError(f"parity gate failed: the adapter changes the emissions by only {effect:.3g} (is the adapter trained?)")
    return result
