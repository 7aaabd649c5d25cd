"""``model.prefix_op.onnx``: the prefix graph with each layer's attention core as one ``edgetune.PrefixAttention`` node.

The node carries an ONNX model-local function body of standard ops, so plain onnxruntime runs it on any provider;
where the custom-op library ``build/kernels/libedgetune_ort.so`` (kernels/ort/) is registered with the CUDA provider,
its Triton kernel runs instead of the body. The graph is ``model.onnx`` with each ``com.microsoft.Attention`` node
(prefix as ``past``, see export/attention.py) rewritten as MatMul + Add + Split -> PrefixAttention, and one
``lengths`` tensor computed from the attention mask for all layers.

Node contract, domain ``edgetune``, version 1:
  inputs:
    q, k, v         T (B, S, H): the Q/K/V projections with bias, H = num_heads * D
    prefix_key      T (1, N, P, D): the layer's prefix keys (an initializer), shared by the batch; or (B, N, P, D),
                    each row's own (a bank's graph, the rows' adapters gathered)
    prefix_value    T (1 or B, N, P, D): its values
    lengths         int32 (B,): row b's tokens are 0 .. lengths[b]-1 (right padding); = ReduceSum(attention_mask)
  attributes: num_heads (int), scale (float, usually D ** -0.5), causal (int: 1 = query i sees sequence keys j <= i)
  output: T (B, S, H), the attention of each query over [prefix; sequence keys j < lengths[b]] before the output
    projection; prefix keys are always visible, a row with no visible key is zero. T is float or float16.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from adapters.errors import ExportError
from export.graph import OPSET
from export.parity import Parity

DOMAIN = "edgetune"
OP = "PrefixAttention"
FILE = "model.prefix_op.onnx"
MASKED = -30000.0  # replaces masked scores: finite in float16, exp() of it underflows to 0 in both precisions


def _const(name: str, values, dtype=np.int64) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.asarray(values, dtype=dtype), name))


def _from_attr(name: str, attr: str, kind: int) -> onnx.NodeProto:
    """Constant whose value is the calling node's attribute ``attr`` (kind: AttributeProto.INT or FLOAT)."""
    field = {onnx.AttributeProto.INT: "value_int", onnx.AttributeProto.FLOAT: "value_float"}[kind]
    node = helper.make_node("Constant", [], [name])
    node.attribute.append(onnx.AttributeProto(name=field, type=kind, ref_attr_name=attr))
    return node


def prefix_attention_function() -> onnx.FunctionProto:
    """The function body of ``edgetune.PrefixAttention`` in standard opset-17 ops (see the module docstring)."""
    n = helper.make_node
    nodes = [
        _from_attr("heads", "num_heads", onnx.AttributeProto.INT),
        _from_attr("scale_f", "scale", onnx.AttributeProto.FLOAT),
        _from_attr("causal_i", "causal", onnx.AttributeProto.INT),
        _const("ax0", [0]),
        _const("ax1", [1]),
        _const("ax12", [1, 2]),
        _const("zero", 0),
        _const("one", 1),
        _const("keep_ss", [0, 0]),
        _const("minus1", [-1]),
        _const("ones111", [1, 1, 1]),
        _const("true11", [[True]], np.bool_),
        _const("masked_f", MASKED, np.float32),
        _const("zero_f", 0.0, np.float32),
        n("Unsqueeze", ["heads", "ax0"], ["heads1"]),
        n("Concat", ["keep_ss", "heads1", "minus1"], ["bsnd"], axis=0),  # (4,): B, S, N, D
        n("Reshape", ["q", "bsnd"], ["q4"]),
        n("Transpose", ["q4"], ["qh"], perm=[0, 2, 1, 3]),  # (B, N, S, D)
        n("Reshape", ["k", "bsnd"], ["k4"]),
        n("Transpose", ["k4"], ["kt"], perm=[0, 2, 3, 1]),  # (B, N, D, S)
        n("Reshape", ["v", "bsnd"], ["v4"]),
        n("Transpose", ["v4"], ["vh"], perm=[0, 2, 1, 3]),  # (B, N, S, D)
        n("Shape", ["q"], ["b1"], start=0, end=1),  # (1,) B
        n("Shape", ["q"], ["s1"], start=1, end=2),  # (1,) S
        n("Shape", ["prefix_key"], ["p1"], start=2, end=3),  # (1,) P
        n("Concat", ["b1", "ones111"], ["b111"], axis=0),
        n("Expand", ["prefix_key", "b111"], ["pk"]),  # (B, N, P, D)
        n("Transpose", ["pk"], ["pkt"], perm=[0, 1, 3, 2]),  # (B, N, D, P)
        n("Concat", ["pkt", "kt"], ["keys_t"], axis=3),  # (B, N, D, P+S)
        n("Expand", ["prefix_value", "b111"], ["pv"]),  # (B, N, P, D)
        n("Concat", ["pv", "vh"], ["values"], axis=2),  # (B, N, P+S, D)
        n("MatMul", ["qh", "keys_t"], ["raw"]),  # (B, N, S, P+S)
        n("CastLike", ["scale_f", "q"], ["scale_t"]),
        n("Mul", ["raw", "scale_t"], ["scores"]),
        # keep (B, 1, S, P+S): prefix keys always; sequence key j when j < lengths[b] (and j <= i when causal)
        n("Squeeze", ["s1"], ["s"]),
        n("Range", ["zero", "s", "one"], ["pos"]),  # (S,)
        n("Cast", ["lengths"], ["len64"], to=TensorProto.INT64),
        n("Unsqueeze", ["len64", "ax1"], ["len_col"]),  # (B, 1)
        n("Less", ["pos", "len_col"], ["in_row"]),  # (B, S)
        n("Unsqueeze", ["in_row", "ax1"], ["in_row3"]),  # (B, 1, S)
        n("Unsqueeze", ["pos", "ax1"], ["pos_col"]),  # (S, 1)
        n("LessOrEqual", ["pos", "pos_col"], ["tri"]),  # (S, S): key j <= query i
        n("Cast", ["causal_i"], ["causal"], to=TensorProto.BOOL),
        n("Not", ["causal"], ["bidirectional"]),
        n("Or", ["tri", "bidirectional"], ["seen"]),  # (S, S)
        n("And", ["in_row3", "seen"], ["keep_seq"]),  # (B, S, S)
        n("Shape", ["keep_seq"], ["bs_"], start=0, end=2),  # (2,): B, S
        n("Concat", ["bs_", "p1"], ["bsp"], axis=0),
        n("Expand", ["true11", "bsp"], ["keep_pre"]),  # (B, S, P)
        n("Concat", ["keep_pre", "keep_seq"], ["keep3"], axis=2),  # (B, S, P+S)
        n("Unsqueeze", ["keep3", "ax1"], ["keep"]),  # (B, 1, S, P+S)
        n("CastLike", ["masked_f", "q"], ["masked"]),
        n("Where", ["keep", "scores", "masked"], ["scores_m"]),
        n("Softmax", ["scores_m"], ["weights_all"], axis=-1),
        n("CastLike", ["zero_f", "q"], ["zero_t"]),
        n("Where", ["keep", "weights_all", "zero_t"], ["weights"]),  # a row with no visible key -> 0
        n("MatMul", ["weights", "values"], ["ctx"]),  # (B, N, S, D)
        n("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),  # (B, S, N, D)
        _const("bs_minus1", [0, 0, -1]),
        n("Reshape", ["ctx_t", "bs_minus1"], ["out"]),  # (B, S, H)
    ]
    return helper.make_function(
        DOMAIN,
        OP,
        inputs=["q", "k", "v", "prefix_key", "prefix_value", "lengths"],
        outputs=["out"],
        nodes=nodes,
        opset_imports=[helper.make_opsetid("", OPSET)],
        attributes=["num_heads", "scale", "causal"],
    )


def _prune(graph: onnx.GraphProto) -> None:
    """Drop nodes whose outputs nothing reads, then initializers no node reads."""
    while True:
        used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
        dead = [node for node in graph.node if not any(out in used for out in node.output)]
        if not dead:
            break
        for node in dead:
            graph.node.remove(node)
    used = {name for node in graph.node for name in node.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


def build_prefix_op_graph(fused: onnx.ModelProto, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None) -> onnx.ModelProto:
    """Rewrite the fused prefix graph (model.onnx of a prefix run) into the PrefixAttention graph, with ``prefix``
    (the adapter's frozen per-layer keys and values, each (1, N, P, D), that the fused graph was traced with); or,
    ``prefix`` None (a bank's graph, whose pasts are the rows' gathered prefixes), with each Attention node's past
    (2, B, N, P, D) split into the rows' keys and values.

    The k-th ``com.microsoft.Attention`` with a ``past`` (nodes are in topological order, so layer k's) becomes
    MatMul(hidden, W_qkv) + bias -> Split -> PrefixAttention (q, k, v, layer k's prefix keys and values, lengths), the
    past left unread; ``lengths`` = int32 ReduceSum(attention_mask) is computed once.

    Raises:
        ExportError: the graph's Attention nodes with a prefix are not one per layer of ``prefix``, or one has none.
    """
    model = onnx.ModelProto()
    model.CopyFrom(fused)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    mask_axes = numpy_helper.from_array(np.asarray([1], np.int64), "prefix_op.mask_axes")
    graph.initializer.append(mask_axes)
    nodes = [
        helper.make_node("ReduceSum", ["attention_mask", mask_axes.name], ["prefix_op.len64"], keepdims=0),  # (B,)
        helper.make_node("Cast", ["prefix_op.len64"], ["prefix_op.lengths"], to=TensorProto.INT32),
    ]
    count = 0
    for node in graph.node:
        if not (node.op_type == "Attention" and node.domain == "com.microsoft" and len(node.input) > 4 and node.input[4]):
            nodes.append(node)
            continue
        hidden, weight, bias, _mask, past = node.input[:5]
        heads = next(a.i for a in node.attribute if a.name == "num_heads")
        if weight not in inits or bias not in inits:
            raise ExportError(f"Attention node {node.name} does not have the expected packed weights")
        h = inits[weight].dims[1] // 3  # packed (H, 3H)
        d = h // heads
        tag = f"prefix_op.{count}"
        if prefix is None:  # the rows' own prefixes: past[0], past[1], each (B, N, P, D)
            pk, pv = f"{tag}.prefix_key", f"{tag}.prefix_value"
            index = [numpy_helper.from_array(np.asarray(i, np.int64), f"{tag}.past{i}") for i in (0, 1)]
            graph.initializer.extend(index)
            nodes += [helper.make_node("Gather", [past, index[0].name], [pk], axis=0),
                      helper.make_node("Gather", [past, index[1].name], [pv], axis=0)]  # fmt: skip
        else:
            if count >= len(prefix):
                raise ExportError(f"{FILE}: the graph has more Attention nodes with a prefix than the {len(prefix)} layers")
            key, value = (t.detach().float().cpu().numpy() for t in prefix[count])  # (1, N, P, D) each
            if key.shape[1] != heads or key.shape[3] != d:
                raise ExportError(f"Attention node {node.name}: a prefix of shape {key.shape} for {heads} heads of {d}")
            consts = [numpy_helper.from_array(np.ascontiguousarray(t), f"{tag}.{what}") for t, what in
                      ((key, "prefix_key"), (value, "prefix_value"))]  # fmt: skip
            graph.initializer.extend(consts)
            pk, pv = (c.name for c in consts)
        scale = next((a.f for a in node.attribute if a.name == "scale"), 0.0) or d**-0.5
        split = numpy_helper.from_array(np.asarray([h, h, h], np.int64), f"{tag}.split")
        graph.initializer.append(split)
        nodes += [
            helper.make_node("MatMul", [hidden, weight], [f"{tag}.qkv_mm"]),  # (B, S, 3H)
            helper.make_node("Add", [f"{tag}.qkv_mm", bias], [f"{tag}.qkv"]),
            helper.make_node("Split", [f"{tag}.qkv", split.name], [f"{tag}.q", f"{tag}.k", f"{tag}.v"], axis=-1),
            helper.make_node(
                OP,
                [f"{tag}.q", f"{tag}.k", f"{tag}.v", pk, pv, "prefix_op.lengths"],
                [node.output[0]],
                name=f"{tag}.attention",
                domain=DOMAIN,
                num_heads=heads,
                scale=float(scale),
                causal=0,
            ),
        ]
        count += 1
    left = [n.name for n in nodes if n.op_type == "Attention"]
    layers = count if prefix is None else len(prefix)
    if not count or count != layers or left:
        raise ExportError(f"{FILE} needs one Attention node with a prefix per layer ({layers}): "
                          f"{count} rewritten, left {left}")  # fmt: skip
    del graph.node[:]
    graph.node.extend(nodes)
    _prune(graph)
    model.functions.append(prefix_attention_function())
    model.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    onnx.checker.check_model(model)
    return model


def write_prefix_op_graph(fused_path: Path, out_path: Path, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None) -> int:
    """Write ``out_path`` from the fused prefix graph at ``fused_path`` and the frozen ``prefix`` (None: a bank's
    graph, see build_prefix_op_graph); returns the number of PrefixAttention nodes."""
    model = build_prefix_op_graph(onnx.load(str(fused_path)), prefix)
    onnx.save(model, str(out_path))
    return sum(node.op_type == OP and node.domain == DOMAIN for node in model.graph.node)


def export_prefix_op(
    folder: Path, prefix: list[tuple[torch.Tensor, torch.Tensor]] | None, gate: Callable[[ort.InferenceSession], Parity | dict]
) -> dict:
    """Write folder/model.prefix_op.onnx from folder/model.onnx and the frozen ``prefix`` it was traced with (None: a
    bank's graph), and pass it through ``gate`` on the CPU provider, which runs the function body. Returns its
    manifest entry; raises ParityError (from ``gate``) or ExportError."""
    nodes = write_prefix_op_graph(folder / "model.onnx", folder / FILE, prefix)
    parity = gate(ort.InferenceSession(str(folder / FILE), providers=["CPUExecutionProvider"]))
    parity = parity if isinstance(parity, dict) else parity.to_dict()
    return {"file": FILE, "op": f"{DOMAIN}.{OP}", "op_version": 1, "nodes": nodes, "padding": "right", "parity": parity}
