"""``python -m bench.prefix_op RUN OUT.json``: the edgetune.PrefixAttention custom op on a GPU.

RUN is an exported p_tuning_v2 run. Writes OUT.json with
  parity: model.prefix_op.onnx under onnxruntime's CUDA provider with the library (build/kernels/libedgetune_ort.so,
    or $EDGETUNE_KERNELS): fp32 through the export's own gate (1e-4, or the bound this machine's fp32 rounding sets), and float16 against eager fp32 next to the error
    of eager PyTorch in float16 on the same sentences; the providers that ran the PrefixAttention nodes (profile).
  latency at batch 1 x 128 real tokens, median ms, inputs already on the GPU:
    ort_prefix_op_fp16    model.prefix_op.onnx in float16, the Triton kernel, I/O binding
    ort_attention_fp16    model.onnx in float16 (onnxruntime's fused Attention, prefix as its past), I/O binding
    ort_no_prefix_fp16    the same base and classifier exported without a prefix, float16, I/O binding
    eager_fp16, eager_fp32, eager_no_prefix_fp16   the eager PyTorch adapter model (SDPA), and without its prefix
    *_graph               the onnxruntime rows replayed from a CUDA graph (enable_cuda_graph, shapes fixed at 1 x 128 so
                          that the shape computations fold away); a graph that cannot be captured gets its error instead
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.transformers.float16 import convert_float_to_float16
from transformers import AutoTokenizer

from adapters.eager import load_adapter_model
from adapters.errors import ParityError
from adapters.model import base_model_path, load_base
from adapters.peft_io import head_state, load_adapter
from bench.latency import make_inputs
from bench.timing import pct, timed
from export.graph import LogitsOnly, optimize, trace_to_onnx
from export.parity import check_parity
from export.prefix_op import FILE, OP
from serve.runtime import KERNELS_LIBRARY
from train.splits import parity_texts

BATCHES = (1, 8, 32, 1, 8, 32)


def cuda_session(path: Path, library: Path | None, profile: Path | None = None) -> ort.InferenceSession:
    """A CUDA session (TF32 off, as served), with the custom-op library when given; fails if CUDA did not start."""
    opts = ort.SessionOptions()
    if library is not None:
        opts.register_custom_ops_library(str(library))
    if profile is not None:
        opts.enable_profiling = True
        opts.profile_file_prefix = str(profile)
    sess = ort.InferenceSession(str(path), opts, providers=[("CUDAExecutionProvider", {"use_tf32": 0})])
    if sess.get_providers()[0] != "CUDAExecutionProvider":
        raise RuntimeError(f"onnxruntime did not start CUDA for {path.name}: {sess.get_providers()}")
    return sess


def float16(src: Path, dst: Path) -> Path:
    """``src`` converted to float16 weights and activations, keeping int64 inputs and float32 logits."""
    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))
    return dst


def no_prefix_graph(run: Path, out: Path) -> Path:
    """The run's base model and trained classifier without the prefix, exported and fused like model.onnx."""
    adapter = load_adapter(run / "adapter")
    plain = load_base(base_model_path(adapter.config.get("base_model_name_or_path") or ""), adapter.label_names, attn="eager")
    plain.classifier.load_state_dict(head_state(adapter.tensors))
    c = plain.config
    trace_to_onnx(LogitsOnly(plain).eval(), out.with_suffix(".raw.onnx"))
    optimize(out.with_suffix(".raw.onnx"), out, c.num_attention_heads, c.hidden_size, {"Attention": c.num_hidden_layers})
    return out


def cuda_graph_runner(path: Path, library: Path | None, ids: np.ndarray, mask: np.ndarray):
    """fn() replaying an onnxruntime CUDA graph of ``path`` at the inputs' fixed shape: I/O binding with inputs and
    logits at fixed GPU addresses, the first runs capture."""
    opts = ort.SessionOptions()
    if library is not None:
        opts.register_custom_ops_library(str(library))
    for axis, size in zip(("batch", "sequence"), ids.shape, strict=True):  # the export's dynamic axes (export/graph.py)
        opts.add_free_dimension_override_by_name(axis, int(size))
    provider = ("CUDAExecutionProvider", {"use_tf32": 0, "enable_cuda_graph": 1})
    sess = ort.InferenceSession(str(path), opts, providers=[provider])
    num_labels = sess.get_outputs()[0].shape[-1]
    binding = sess.io_binding()
    for name, x in (("input_ids", ids), ("attention_mask", mask)):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    logits = ort.OrtValue.ortvalue_from_shape_and_type((ids.shape[0], num_labels), np.float32, "cuda", 0)
    binding.bind_ortvalue_output("logits", logits)
    for _ in range(3):  # onnxruntime runs, then captures
        sess.run_with_iobinding(binding)
    return lambda: sess.run_with_iobinding(binding), logits


def iobinding_runner(sess: ort.InferenceSession, ids: np.ndarray, mask: np.ndarray):
    """fn() running ``sess`` on inputs placed on the GPU once, logits left on the GPU."""
    binding = sess.io_binding()
    for name, x in (("input_ids", ids), ("attention_mask", mask)):
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    binding.bind_output("logits", "cuda")
    return lambda: sess.run_with_iobinding(binding)


def torch_runner(model, ids: np.ndarray, mask: np.ndarray):
    tids, tmask = torch.from_numpy(ids).cuda(), torch.from_numpy(mask).cuda()

    def run():
        with torch.inference_mode():
            model(tids, tmask)
        torch.cuda.synchronize()

    return run


def op_providers(sess: ort.InferenceSession) -> list[str]:
    events = json.loads(Path(sess.end_profiling()).read_text())
    return sorted({e["args"]["provider"] for e in events if e.get("args", {}).get("op_name") == OP})


def fp16_errors(sess16, eager32, eager16, tok, texts: list[str], max_length: int) -> dict:
    """Max |logit diff| against eager fp32 of the float16 graph and of eager fp16, and their argmax agreement."""
    ort_err = torch_err = 0.0
    agree = n = 0
    start = 0
    for size in BATCHES:
        batch = texts[start : start + size]
        start += size
        enc = tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="np")
        feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")}
        ids, mask = (torch.from_numpy(feeds[k]).cuda() for k in ("input_ids", "attention_mask"))
        with torch.inference_mode():
            ref, half = eager32(ids, mask).float().cpu().numpy(), eager16(ids, mask).float().cpu().numpy()
        out = sess16.run(["logits"], feeds)[0]
        ort_err, torch_err = max(ort_err, float(np.abs(out - ref).max())), max(torch_err, float(np.abs(half - ref).max()))
        agree += int((out.argmax(-1) == ref.argmax(-1)).sum())
        n += len(batch)
    return {"ort_fp16_max_abs_diff": ort_err, "eager_fp16_max_abs_diff": torch_err, "ort_fp16_argmax_agree": agree / n, "n": n}


def main(run: Path, out_json: Path) -> dict:
    ort.preload_dlls()
    library = Path(os.environ.get("EDGETUNE_KERNELS") or KERNELS_LIBRARY)
    export = run / "export"
    manifest = json.loads((export / "manifest.json").read_text())
    tok = AutoTokenizer.from_pretrained(export)
    texts = parity_texts(run)
    eager = load_adapter_model(run / "adapter").cuda().eval()
    bare = load_adapter_model(run / "adapter").cuda().eval()
    bare.prefix = None
    tmp = Path(tempfile.mkdtemp(prefix="prefix_op_bench."))
    result: dict = {"device": torch.cuda.get_device_name(), "onnxruntime": ort.__version__, "torch": torch.__version__}

    gate = cuda_session(export / FILE, library, tmp / "profile")
    try:
        result["parity_fp32"] = check_parity(gate, eager, bare, tok, texts, manifest["max_length"]).to_dict()
    except ParityError as e:
        result["parity_fp32"] = {"error": str(e)}
    result["prefix_op_providers"] = op_providers(gate)
    graphs = {
        "ort_prefix_op_fp16": (float16(export / FILE, tmp / "prefix_op16.onnx"), library),
        "ort_attention_fp16": (float16(export / "model.onnx", tmp / "attention16.onnx"), None),
        "ort_no_prefix_fp16": (float16(no_prefix_graph(run, tmp / "no_prefix.onnx"), tmp / "no_prefix16.onnx"), None),
    }
    sessions = {name: cuda_session(path, lib) for name, (path, lib) in graphs.items()}
    eager16 = load_adapter_model(run / "adapter").cuda().half().eval()
    bare16 = load_adapter_model(run / "adapter").cuda().half().eval()
    bare16.prefix = None
    result["parity_fp16"] = fp16_errors(sessions["ort_prefix_op_fp16"], eager, eager16, tok, texts, manifest["max_length"])

    feeds = make_inputs(tok, texts, 1, "seq128", manifest["max_length"])
    ids, mask = feeds["input_ids"], feeds["attention_mask"]
    runners = {name: iobinding_runner(sess, ids, mask) for name, sess in sessions.items()}
    result["cuda_graph"] = {}
    for name, (path, lib) in graphs.items():
        try:
            fn, logits = cuda_graph_runner(path, lib, ids, mask)
            plain = sessions[name].run(["logits"], {"input_ids": ids, "attention_mask": mask})[0]
            result["cuda_graph"][name] = {"max_abs_diff_vs_plain_run": float(np.abs(logits.numpy() - plain).max())}
            runners[f"{name}_graph"] = fn
        except Exception as e:  # noqa: BLE001 - recorded; the rows without a graph still run
            result["cuda_graph"][name] = {"error": f"{type(e).__name__}: {e}"[:500]}
    runners |= {"eager_fp16": torch_runner(eager16, ids, mask), "eager_fp32": torch_runner(eager, ids, mask),
                "eager_no_prefix_fp16": torch_runner(bare16, ids, mask)}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(3):  # interleaved rounds
        for name, fn in runners.items():
            times[name] += timed(fn, 1.0, min_iters=20)
    result["latency"] = {
        "batch": 1,
        "seq_len": int(ids.shape[1]),
        "rows": {name: {"p50_ms": statistics.median(t), "p90_ms": pct(t, 0.9), "n": len(t)} for name, t in times.items()},
    }
    out_json.write_text(json.dumps(result, indent=2))
    for name, row in result["latency"]["rows"].items():
        print(f"{name:24s} {row['p50_ms']:8.3f} ms (p90 {row['p90_ms']:.3f})")
    print(json.dumps({k: result[k] for k in ("parity_fp32", "prefix_op_providers", "parity_fp16", "cuda_graph")}, indent=1))
    return result


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
