"""model.prefix_op.onnx (one edgetune.PrefixAttention node per layer, with an ONNX function body) and the custom-op
library build/kernels/libedgetune_ort.so that runs the node's Triton kernel under onnxruntime's CUDA provider."""

from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from adapters.eager import load_adapter_model
from export.graph import OPSET
from export.parity import float64_copy, fp32_bound
from export.prefix_op import DOMAIN, FILE, OP, prefix_attention_function
from kernels.aot import ARCHS, HEAD_DIMS
from kernels.reference import prefix_attn_reference
from tests.helpers import assert_fp32_equivalent, padded_batch

ROOT = Path(__file__).resolve().parents[1]
CPU = ["CPUExecutionProvider"]
needs_ort_gpu = pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs onnxruntime-gpu and a CUDA GPU"
)


@pytest.fixture(scope="session")
def library() -> Path:
    """The custom-op library: $EDGETUNE_KERNELS (prebuilt, e.g. carried to a GPU host), else built by `make kernels`
    (a no-op once `make test` has built it)."""
    if os.environ.get("EDGETUNE_KERNELS"):
        return Path(os.environ["EDGETUNE_KERNELS"])
    subprocess.run(["make", "-s", "kernels"], cwd=ROOT, check=True, timeout=900)
    return ROOT / "build" / "kernels" / "libedgetune_ort.so"


def _feeds(tokenizer_dir: Path) -> dict[str, np.ndarray]:
    ids, mask = padded_batch(tokenizer_dir)
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}


def _logits(
    model: str | Path | onnx.ModelProto, feeds: dict, opts: ort.SessionOptions | None = None, providers=CPU
) -> np.ndarray:
    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(src, opts, providers=providers).run(["logits"], feeds)[0]


def test_prefix_op_graph_passes_the_cpu_gate(exported):
    run = exported("tiny", "p_tuning_v2")
    manifest = json.loads((run / "export" / "manifest.json").read_text())
    m, virtual = manifest["prefix_op"], manifest["num_virtual_tokens"]
    assert m["file"] == FILE and m["op"] == "edgetune.PrefixAttention" and m["nodes"] == 2
    p = m["parity"]
    assert p["max_abs_diff"] <= p["tolerance"] and p["argmax_agree"] == 1.0 and p["provider"] == "CPUExecutionProvider"
    assert p["max_abs_error"] <= fp32_bound(p["reference_error"], p["scale"])  # the body as accurate as eager fp32
    assert p["n_samples"] >= 64 and p["adapter_effect"] > 10 * p["tolerance"]
    model = onnx.load(str(run / "export" / FILE))
    nodes = [n for n in model.graph.node if n.op_type == OP and n.domain == DOMAIN]
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    assert len(nodes) == 2 and not [n for n in model.graph.node if n.op_type == "Attention"]
    assert [(f.domain, f.name) for f in model.functions] == [(DOMAIN, OP)]
    assert {(o.domain, o.version) for o in model.opset_import} >= {(DOMAIN, 1), ("", OPSET)}
    assert len({n.input[5] for n in nodes}) == 1  # one lengths tensor for all layers
    for node in nodes:
        assert inits[node.input[3]].shape == inits[node.input[4]].shape == (1, 4, virtual, 8)  # (1, N, P, D)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        assert attrs["num_heads"] == 4 and attrs["causal"] == 0 and abs(attrs["scale"] - 8**-0.5) < 1e-7
    assert not list(run.glob(".export*"))


def test_failed_prefix_op_gate_fails_the_export(runs, tmp_path, monkeypatch):
    """A PrefixAttention graph that loses the prefix fails the export's gate, and no export folder is left."""
    import shutil

    import export.prefix_op
    from adapters.errors import ParityError
    from export.run import export_run

    run = tmp_path / "run"
    shutil.copytree(runs("tiny", "p_tuning_v2"), run)
    shutil.rmtree(run / "export", ignore_errors=True)
    real = export.prefix_op.build_prefix_op_graph

    def zero_prefix(fused, prefix):
        return real(fused, [(torch.zeros_like(k), torch.zeros_like(v)) for k, v in prefix])

    monkeypatch.setattr(export.prefix_op, "build_prefix_op_graph", zero_prefix)
    with pytest.raises(ParityError, match="differ from eager PyTorch"):
        export_run(run, int8=False)
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "config.yaml", "metrics.json"]


@torch.inference_mode()
def test_prefix_op_graph_reads_its_prefix(exported, tiny_bert):
    """Other shapes than traced match eager; another prefix changes the logits, exactly as it changes eager's."""
    run = exported("tiny", "p_tuning_v2")
    feeds = _feeds(tiny_bert)
    model = onnx.load(str(run / "export" / FILE))
    eager = load_adapter_model(run / "adapter", str(tiny_bert))
    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    before = _logits(model, feeds)
    assert_fp32_equivalent(before, eager(ids, mask), float64_copy(eager)(ids, mask), "other shapes than traced")
    torch.manual_seed(1)
    for init in model.graph.initializer:  # layer i's prefix_op.{i}.prefix_key / prefix_value, (1, N, P, D)
        if m := re.fullmatch(r"prefix_op\.(\d+)\.prefix_(key|value)", init.name):
            new = 3 * torch.randn(tuple(init.dims))
            init.CopyFrom(numpy_helper.from_array(new.numpy(), init.name))
            getattr(eager.prefix, f"{m[2]}_{m[1]}").copy_(new)
    after = _logits(model, feeds)
    assert np.abs(after - before).max() > 1e-3  # 10x the gate tolerance, as the export asks of the adapter
    assert_fp32_equivalent(after, eager(ids, mask), float64_copy(eager)(ids, mask), "another prefix")


def _single_node(dtype: int, num_heads: int, causal: int) -> onnx.ModelProto:
    names = ["q", "k", "v", "prefix_key", "prefix_value", "lengths"]
    inputs = [helper.make_tensor_value_info(n, dtype, None) for n in names[:5]]
    inputs.append(helper.make_tensor_value_info("lengths", TensorProto.INT32, None))
    node = helper.make_node(OP, names, ["out"], domain=DOMAIN, num_heads=num_heads, scale=0.3, causal=causal)
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("out", dtype, None)])
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, 1)]
    return helper.make_model(graph, opset_imports=opsets, functions=[prefix_attention_function()], ir_version=10)


@pytest.mark.parametrize("prefix", [0, 5])
@pytest.mark.parametrize("causal", [0, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_function_body_matches_the_reference(prefix, causal, dtype):
    """The body against kernels/reference.py in float64: odd length, a padded row, an empty row, both precisions."""
    b, s, n, d = 3, 17, 2, 8
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((b, s, n * d)).astype(dtype) for _ in range(3))
    pk, pv = (rng.standard_normal((1, n, prefix, d)).astype(dtype) for _ in range(2))
    lengths = np.asarray([s, 9, 0], np.int32)
    onnx_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    sess = ort.InferenceSession(_single_node(onnx_type, n, causal).SerializeToString(), providers=CPU)
    out = sess.run(["out"], dict(q=q, k=k, v=v, prefix_key=pk, prefix_value=pv, lengths=lengths))[0]

    def heads(x):  # (B, S, H) -> (B, N, S, D) float64
        return torch.from_numpy(x.astype(np.float64)).view(b, s, n, d).transpose(1, 2)

    def reference(dt):  # (B, S, H) in dt, from kernels/reference.py
        t = [heads(x).to(dt) for x in (q, k, v)] + [torch.from_numpy(x).to(dt) for x in (pk, pv)]
        out, _ = prefix_attn_reference(*t, torch.from_numpy(lengths), bool(causal), 0.3, dtype=dt)
        return out.transpose(1, 2).reshape(b, s, n * d)

    assert out.dtype == dtype and out.shape == (b, s, n * d)
    same = reference(torch.float32 if dtype == np.float32 else torch.float16)  # PyTorch in the body's precision
    assert_fp32_equivalent(out, same, reference(torch.float64), "function body", float(np.finfo(dtype).eps))
    if prefix == 0:
        assert np.all(out[2] == 0)  # no visible key: zeros, as the kernel


def test_fp16_graph_runs_the_body(exported, tiny_bert):
    """onnxruntime's float16 converter keeps the custom nodes and their function body working (here on the CPU)."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    run = exported("tiny", "p_tuning_v2")
    feeds = _feeds(tiny_bert)
    model = onnx.load(str(run / "export" / FILE))
    half = convert_float_to_float16(model, keep_io_types=True)
    prefix = [i for i in half.graph.initializer if i.name.startswith("prefix_op.0.prefix_")]
    assert len(prefix) == 2 and all(i.data_type == TensorProto.FLOAT16 for i in prefix)
    ref, out = _logits(model, feeds), _logits(half, feeds)
    eager = load_adapter_model(run / "adapter", str(tiny_bert))
    ids, mask = torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
    with torch.inference_mode():  # float16 graph as accurate as PyTorch in float16
        exact, torch_half = float64_copy(eager)(ids, mask), eager.half()(ids, mask)
    assert out.dtype == np.float32 and 0 < np.abs(out - ref).max()
    assert_fp32_equivalent(out, torch_half, exact, "float16 graph", float(np.finfo(np.float16).eps))


def test_cubin_table(library):
    """Every (arch, dtype, head dim) compiled, each cubin an ELF image embedded in the library."""
    table = (library.parent / "prefix_attention_cubins.h").read_text()
    rows = re.findall(r"\{(\d+), (\d+), (\d+), \d+, \d+, \d+, \"prefix_attn_fwd\"", table)
    assert sorted(rows) == sorted((str(a), str(t), str(h)) for a in ARCHS for t in (1, 10) for h in HEAD_DIMS)
    cubins = sorted((library.parent / "cubin").glob("*.cubin"))
    assert len(cubins) == len(rows) and all(c.read_bytes()[:4] == b"\x7fELF" for c in cubins)
    image = library.read_bytes()
    assert all(c.read_bytes() in image for c in cubins)


def _has_cuda_device() -> bool:
    """What the library asks before it registers: libcuda loads, initialises and counts at least one device."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    count = ctypes.c_int(0)
    return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0


def test_library_loads_without_cuda(library, exported, tiny_bert, monkeypatch):
    """Without a CUDA device (this CPU machine) the library loads and registers nothing: the graph runs its body.

    Registered, the library's schema shadows the node's function body and a CPU session finds no kernel (onnxruntime
    1.31 does not fall back to the body); so the library registers its CUDA op only where a CUDA device exists, and on
    such a machine a CPU session with it fails (serve keeps it out of CPU sessions). Forced onto the CPU provider
    (EDGETUNE_ORT_PROVIDER), the library's kernel runs instead of the body and turns the missing driver or stream into
    an onnxruntime error instead of crashing the process.
    """
    from serve.runtime import Classifier

    run = exported("tiny", "p_tuning_v2")
    graph, feeds = run / "export" / FILE, _feeds(tiny_bert)
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library))
    if _has_cuda_device():
        with pytest.raises(Exception, match="Could not find an implementation for PrefixAttention"):
            _logits(graph, feeds, opts)
    else:
        np.testing.assert_array_equal(_logits(graph, feeds, opts), _logits(graph, feeds))
    monkeypatch.setenv("EDGETUNE_ORT_PROVIDER", "CPUExecutionProvider")
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library))
    with pytest.raises(Exception, match="edgetune.PrefixAttention: (cannot load libcuda.so.1|no CUDA compute stream)"):
        _logits(graph, feeds, opts)
    c = Classifier(run / "export", providers="cpu", kernels=library)
    assert c.graph == "model.onnx" and c.provider == "CPUExecutionProvider"


def _cuda_session(path: Path, library: Path, tmp_path: Path) -> ort.InferenceSession:
    """A profiled CUDA session with the library, TF32 off."""
    ort.preload_dlls()
    opts = ort.SessionOptions()
    opts.register_custom_ops_library(str(library))
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp_path / "profile")
    return ort.InferenceSession(str(path), opts, providers=[("CUDAExecutionProvider", {"use_tf32": 0})])


def _prefix_op_providers(sess: ort.InferenceSession) -> set[str]:
    """The providers that ran PrefixAttention nodes, from the session's profile."""
    events = json.loads(Path(sess.end_profiling()).read_text())
    return {e["args"]["provider"] for e in events if e.get("args", {}).get("op_name") == OP}


@pytest.mark.gpu
@needs_ort_gpu
def test_cuda_prefix_op_passes_the_gate(exported, library, tmp_path):
    """The Triton kernel under onnxruntime's CUDA provider, fp32, through the export's own parity gate (MiniLM: D=32)."""
    from transformers import AutoTokenizer

    from export.parity import check_parity
    from train.splits import parity_texts

    run = exported("minilm", "p_tuning_v2")
    sess = _cuda_session(run / "export" / FILE, library, tmp_path)
    eager = load_adapter_model(run / "adapter").cuda()
    bare = load_adapter_model(run / "adapter").cuda()
    bare.prefix = None
    tok = AutoTokenizer.from_pretrained(run / "export")
    p = check_parity(sess, eager, bare, tok, parity_texts(run), 64)
    assert p.provider == "CUDAExecutionProvider" and p.argmax_agree == 1.0
    assert _prefix_op_providers(sess) == {"CUDAExecutionProvider"}  # the library's kernel, not the body on the CPU


@pytest.mark.gpu
@needs_ort_gpu
@torch.inference_mode()
def test_cuda_prefix_op_fp16(exported, library, tmp_path):
    """The float16 graph with the kernel: its error against eager fp32 at most ~2x that of eager PyTorch in fp16."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    run = exported("minilm", "p_tuning_v2")
    half = convert_float_to_float16(onnx.load(str(run / "export" / FILE)), keep_io_types=True)
    onnx.save(half, str(tmp_path / "half.onnx"))
    sess = _cuda_session(tmp_path / "half.onnx", library, tmp_path)
    feeds = _feeds(run / "export")
    out = sess.run(["logits"], feeds)[0]
    eager = load_adapter_model(run / "adapter").cuda()
    ids, mask = (torch.from_numpy(feeds[k]).cuda() for k in ("input_ids", "attention_mask"))
    ref = eager(ids, mask).float().cpu().numpy()
    torch_half = eager.half()(ids, mask).float().cpu().numpy()
    assert np.abs(out - ref).max() <= 2 * np.abs(torch_half - ref).max() + 1e-3
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    assert _prefix_op_providers(sess) == {"CUDAExecutionProvider"}
