"""``model.fp16.onnx``: the optimised fp32 graph in float16 for the GPU fast path, gated against the fp32 graph.

The conversion is onnxruntime.transformers' float16 converter on ``model.onnx``: every float weight and activation in
float16, while the graph's inputs stay int64 and its float outputs float32 (``keep_io_types``), so a caller feeds and
reads it as it does ``model.onnx``. Kept in fp32 (``op_block_list``): the converter's default list (ML ops with no
float16 kernel anywhere) and ``Loop``: a tagger's Viterbi decode sums path scores over the whole sentence, and in fp16
their spacing grows with that sum until near paths tie; it runs once per word on (B, T, T) scores, nothing beside the
encoder. The fused LayerNormalization / SkipLayerNormalization and Attention (its softmax inside) compute their
statistics in fp32 on fp16 tensors in onnxruntime's kernels, so they convert whole.

onnxruntime's CPU provider has float16 kernels for a few of these ops only (LayerNormalization,
SkipLayerNormalization, Gather, Cast, Shape among them); before the other nodes (MatMul, Gemm, Attention, BiasGelu, Add,
...) it inserts Casts and runs them in fp32, so the session opens and runs. The CPU gate therefore measures fp16's
storage rounding (of every weight, and of the activations between nodes), not fp16 arithmetic: the CUDA provider's
fp16 GEMMs (fp32 accumulation) add their own rounding, which only a GPU run can measure.

A model can be beyond fp16 while its fp32 graph is exact: attention scores of large magnitude (a LoRA update far larger
than the base weights, say) turn fp16's rounding of the query/key weights into a softmax that moves by percents. The
export then writes no fp16 graph and says why in the manifest (export/run.py): the fp32 graph, the export's
contract, has passed its own gate, and a GPU server without ``model.fp16.onnx`` serves that.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST
from onnxruntime.transformers.onnx_model import OnnxModel

from adapters.errors import ExportError, ParityError
from export.quantize import logits_onnx
from text.words import first_pieces
from train.tagging import collate_words

FILE = "model.fp16.onnx"
KEEP_FP32 = ("Loop",)  # beyond the converter's default block list; see the module docstring
# The house parity ladder's fp16 rung: ten times float16's machine epsilon (2**-10), room for the rounding of the
# weights and of the activations at every layer's boundaries. It depends on the format, not on the CPU: a dropped,
# doubled or mis-scaled layer moves the outputs by a relative order one.
TOLERANCE = 1e-2
# The share of dev sentences that may change class (tagger: decoded path). With every logit within d of fp32's, a class
# can change only where fp32's top two logits are within 2d: a near tie, where either class is the model's answer. On
# 1,000 dev sentences such ties exist, so demanding none would refuse a sound graph now and then (1 of 1,000 in a
# default run); a broken graph moves the logits past TOLERANCE first. Below 1 / MAX_CHANGED sentences: none may.
MAX_CHANGED = 0.005


def convert_fp16(src: Path, dst: Path) -> list[str]:
    """Write ``dst``, the fp16 conversion of the fp32 graph ``src``; return the op types it keeps in fp32.

    Raises:
        ExportError: the converted graph changed the graph's inputs or outputs, or a weight read by a converted node
            is still fp32 (then the graph would not be the fp16 graph it claims to be).
    """

    block = [*DEFAULT_OP_BLOCK_LIST, *KEEP_FP32]
    fp32 = onnx.load(str(src))
    converted = OnnxModel(onnx.load(str(src)))
    converted.convert_float_to_float16(keep_io_types=True, op_block_list=block)
    converted.topological_sort()  # the converter appends its Casts at the end of the graph
    model = converted.model
    _check_fp16(fp32, model, set(block))
    onnx.save(model, str(dst))
    onnx.checker.check_model(str(dst))
    return sorted({n.op_type for n in model.graph.node if n.op_type in KEEP_FP32})


def _io(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)]


def _check_fp16(fp32: onnx.ModelProto, fp16: onnx.ModelProto, block: set[str]) -> None:
    if _io(fp16) != _io(fp32):
        raise ExportError(f"fp16 conversion changed the graph's inputs/outputs: {_io(fp32)} -> {_io(fp16)}")
    floats = {i.name for i in fp16.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    left = sorted({i for n in fp16.graph.node if n.op_type not in block for i in n.input if i in floats})
    if left:
        raise ExportError(f"fp16 conversion left {len(left)} fp32 weights on converted nodes, e.g. {left[:3]}")


def open_fp16(path: Path):
    """A CPU onnxruntime session on the fp16 graph.

    Raises:
        ExportError: the CPU provider cannot create it (naming what it lacks), with what to do.
    """

    try:
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own pybind classes (Fail, NotImplemented, InvalidGraph)
        raise ExportError(f"onnxruntime's CPU provider cannot run {path.name}: {e}; export again with --no-fp16") from e


@dataclass(frozen=True)
class Fp16Gate:
    file: str
    output: str  # what was compared: logits (classifier) or emissions at every real word (tagger)
    max_rel_diff: float  # max |fp16 - fp32| / max |fp32|, both maxima over every dev sentence (see relative_diff)
    max_abs_diff: float
    scale: float  # max |fp32 output|
    argmax_agree: float  # fraction of sentences with the fp32 graph's class (tagger: its whole decoded tag path)
    max_changed: float  # the share of sentences allowed another class (MAX_CHANGED)
    n_samples: int
    tolerance: float
    provider: str
    kept_fp32: list[str]  # op types the fp16 graph keeps in fp32

    def to_dict(self) -> dict:
        return asdict(self)


def relative_diff(fp16: np.ndarray, fp32: np.ndarray) -> tuple[float, float, float]:
    """(max |fp16 - fp32| / max |fp32|, max |fp16 - fp32|, max |fp32|), over the whole set, not row by row.

    fp16 rounds each weight and activation to 2**-11 of its own magnitude, so the error it leaves in an output scales
    with the magnitudes of the hidden states and weights that produce it: a property of the model, the same for every
    row. Per row, a sentence whose logits are all small (an uncertain prediction) would be held to a bound set by its
    own small values instead of by the computation's scale. The argmax (decode) check is per sentence. Not finite
    (an fp16 overflow) -> inf.
    """
    a, b = fp16.astype(np.float64), fp32.astype(np.float64)
    diff = float(np.abs(a - b).max(initial=0.0))
    scale = float(np.abs(b).max(initial=0.0))
    if not np.isfinite(a).all():
        return float("inf"), float("inf"), scale
    return (diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))), diff, scale


def check_fp16(
    fp32: np.ndarray, fp16: np.ndarray, agree: int, n: int, kept: list[str], output: str, provider: str,
    tolerance: float = TOLERANCE, max_changed: float = MAX_CHANGED,
) -> Fp16Gate:  # fmt: skip
    """The gate on outputs already computed: ``agree`` of ``n`` sentences with the same class (decoded tags).

    Raises:
        ParityError: the relative difference exceeds ``tolerance``, or more than ``max_changed`` of the sentences
            (rounded down) change class (tag path).
    """
    rel, diff, scale = relative_diff(fp16, fp32)
    gate = Fp16Gate(FILE, output, rel, diff, scale, agree / max(n, 1), max_changed, n, tolerance, provider, kept)
    what = "predicted class" if output == "logits" else "decoded tags"
    if not rel <= tolerance:
        raise ParityError(
            f"fp16 gate failed: {FILE} {output} differ from the fp32 graph's by {rel:.3g} of their largest magnitude "
            f"(max |diff| {diff:.3g}, max |fp32| {scale:.3g}; tolerance {tolerance:g})"
        )
    if n - agree > int(max_changed * n):
        raise ParityError(
            f"fp16 gate failed: the {what} differ from the fp32 graph's on {n - agree} of {n} dev sentences "
            f"(at most {int(max_changed * n)} may: {max_changed:.1%})"
        )
    return gate


def gate_classifier(fp32_session, fp16_session, tokenizer, texts: list[str], max_length: int, kept: list[str]) -> Fp16Gate:
    """Logits of both graphs on ``texts`` (batches of similar length, as the int8 gate), then check_fp16."""

    l32 = logits_onnx(fp32_session, tokenizer, texts, max_length)
    l16 = logits_onnx(fp16_session, tokenizer, texts, max_length)
    agree = int((l16.argmax(-1) == l32.argmax(-1)).sum())
    return check_fp16(l32, l16, agree, len(texts), kept, "logits", fp16_session.get_providers()[0])


def gate_tagger(
    fp32_session, fp16_session, tokenizer, sentences: list[list[str]], max_length: int, kept: list[str],
    decode: Callable[[np.ndarray, np.ndarray], np.ndarray], batch_size: int = 32,
) -> Fp16Gate:  # fmt: skip
    """Emissions at every real word and the decoded tags of both graphs on pre-split ``sentences``, then check_fp16.
    ``decode(emissions, word_mask)`` -> tags decodes an emissions-only graph's output (the server's CRF)."""

    e32, e16, agree = [], [], 0
    for start in range(0, len(sentences), batch_size):
        batch = sentences[start : start + batch_size]
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
        mask = word_mask.numpy()
        paths = []
        for session, emissions in ((fp32_session, e32), (fp16_session, e16)):
            names = [o.name for o in session.get_outputs()]
            inputs = {i.name for i in session.get_inputs()}  # an emissions-only graph has no word_mask input
            got = dict(zip(names, session.run(names, {k: v for k, v in feeds.items() if k in inputs}), strict=True))
            emissions.append(got["emissions"][mask])  # (words, T): real words only
            paths.append(np.where(mask, got["tags"], -1) if "tags" in got else decode(got["emissions"], mask))
        agree += int((paths[0] == paths[1]).all(axis=1).sum())
    return check_fp16(
        np.concatenate(e32), np.concatenate(e16), agree, len(sentences), kept, "emissions", fp16_session.get_providers()[0]
    )
