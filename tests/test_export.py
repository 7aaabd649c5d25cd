"""Export parity for both methods on a tiny random BERT and on the real MiniLM; the gate must bite."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from adapters.eager import load_adapter_model
from adapters.errors import AdapterError, ParityError
from export.graph import op_counts
from export.parity import DEFAULT_TOLERANCE, check_parity, float64_copy, fp32_bound
from export.run import export_run
from tests.helpers import assert_fp32_equivalent, padded_batch


@pytest.mark.parametrize("model", ["tiny", "minilm"])
@pytest.mark.parametrize("method", ["p_tuning_v2", "lora"])
def test_export_passes_parity_gate(exported, model, method):
    run = exported(model, method)
    m = json.loads((run / "export" / "manifest.json").read_text())
    assert m["method"] == method and m["opset"] == 17 and m["onnxruntime_version"] == ort.__version__
    p = m["parity"]
    assert p["max_abs_diff"] <= p["tolerance"] and p["argmax_agree"] == 1.0 and p["n_samples"] >= 64
    assert p["tolerance"] >= DEFAULT_TOLERANCE and p["reference_error"] > 0  # measured: fp32 is not exact
    assert p["max_abs_error"] <= fp32_bound(p["reference_error"], p["scale"])  # onnxruntime as accurate as eager fp32
    assert p["batch_sizes"][:3] == [1, 8, 32]
    assert p["adapter_effect"] > 10 * p["tolerance"]  # the adapter changes the logits
    files = {f.name for f in (run / "export").iterdir()}
    assert {"model.onnx", "tokenizer.json", "labels.json", "manifest.json", "config.json"} <= files
    ops = op_counts(run / "export" / "model.onnx")
    layers = 2 if model == "tiny" else 6
    # one fused Attention per layer: the prefix rides in as its past state, a merged LoRA model has none
    attention = [n for n in onnx.load(str(run / "export" / "model.onnx")).graph.node if n.op_type == "Attention"]
    with_past = [n for n in attention if len(n.input) > 4 and n.input[4]]
    assert len(attention) == layers and "Softmax" not in ops
    assert len(with_past) == (layers if method == "p_tuning_v2" else 0)
    assert ops.get("SkipLayerNormalization", 0) >= 2 * layers - 1
    assert not list(run.glob(".export*")), "temporary export folders left behind"


@torch.inference_mode()
def test_exported_graph_matches_eager_on_other_shapes(exported, tiny_bert):
    """Dynamic axes: another batch size and sequence length than traced, with padding."""
    run = exported("tiny", "p_tuning_v2")
    ids, mask = padded_batch(tiny_bert)
    sess = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    out = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    eager = load_adapter_model(run / "adapter", str(tiny_bert))
    assert_fp32_equivalent(out, eager(ids, mask), float64_copy(eager)(ids, mask), "onnxruntime on other shapes")


def test_gate_catches_a_dropped_adapter(exported, tiny_bert):
    """An export of the bare base model must fail the gate against the adapter model."""
    from transformers import AutoTokenizer

    run = exported("tiny", "p_tuning_v2")
    eager = load_adapter_model(run / "adapter", str(tiny_bert))
    bare = load_adapter_model(run / "adapter", str(tiny_bert))
    bare.prefix = None  # what a broken export would ship
    sess = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=["CPUExecutionProvider"])
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    texts = ["how do I top up", "my card is lost", "exchange rate please"] * 30
    check_parity(sess, eager, bare, tok, texts, 32)  # the real export passes
    with pytest.raises(ParityError, match="differ from eager PyTorch"):
        check_parity(sess, bare, bare, tok, texts, 32)
    with pytest.raises(ParityError, match="adapter changes the logits by only"):
        check_parity(sess, eager, eager, tok, texts, 32)


@pytest.mark.parametrize(
    "kw, message", [({"tolerance": 0.0}, "differ from eager"), ({"int8_max_drop": -1.0}, "int8 gate failed")]
)
def test_failed_gate_leaves_no_export(runs, tmp_path, kw, message):
    run = tmp_path / "run"
    shutil.copytree(runs("tiny", "lora"), run)
    shutil.rmtree(run / "export", ignore_errors=True)
    with pytest.raises(ParityError, match=message):
        export_run(run, **kw)
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "config.yaml", "metrics.json"]


def test_int8_graph_is_quantised_and_serves(exported):
    from serve.runtime import Classifier

    run = exported("minilm", "p_tuning_v2")
    m = json.loads((run / "export" / "manifest.json").read_text())
    assert m["int8"]["n_samples"] == 96 and 0 <= m["int8"]["dev_accuracy_int8"] <= 1
    ops = op_counts(run / "export" / "model.int8.onnx")
    assert ops.get("DynamicQuantizeLinear", 0) + ops.get("DynamicQuantizeMatMul", 0) >= 6
    c32, c8 = Classifier(run / "export"), Classifier(run / "export", precision="int8")
    texts = ["I lost my card", "how do I top up?", "what is the exchange rate"]
    l32, l8 = c32.logits(texts), c8.logits(texts)
    # quantised (int8 rounding moves logits by ~1e-2, fp32 rounding by ~1e-5), and close to the fp32 graph
    assert 1e-4 < np.abs(l32 - l8).max() < 1.0


def test_prefix_projection_trains_and_exports(tmp_path, tiny_bert):
    """The reparameterisation MLP is folded into the saved table; the export and PEFT both read that."""
    from tests.helpers import peft_model, train_small

    run = train_small(tmp_path / "proj", "p_tuning_v2", str(tiny_bert), ["prefix_projection=true", "encoder_hidden_size=24"])
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["prefix_projection"] is True and cfg["encoder_hidden_size"] == 24
    m = export_run(run, int8=False)
    assert m["parity"]["max_abs_diff"] <= m["parity"]["tolerance"] and m["int8"] is None
    ids, mask = padded_batch(tiny_bert)
    ours = load_adapter_model(run / "adapter", str(tiny_bert))(ids, mask)
    peft = peft_model(run / "adapter", tiny_bert, len(json.loads((run / "adapter" / "labels.json").read_text())))
    theirs = peft(input_ids=ids, attention_mask=mask).logits
    assert_fp32_equivalent(ours, theirs, peft.double()(input_ids=ids, attention_mask=mask).logits, "projected prefix in PEFT")


def test_corrupt_adapter_is_refused(runs, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs("tiny", "p_tuning_v2") / "adapter", run / "adapter")
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(AdapterError, match="corrupt or not a safetensors file"):
        export_run(run)
    (run / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        export_run(run)
    assert not (run / "export").exists()


@pytest.mark.parametrize(
    "method, extra",
    [("full", []), ("full", ["freeze_embeddings=true", "freeze_layers=1"]), ("head", [])],
    ids=["full", "partial", "head"],
)
def test_full_partial_and_head_fine_tuning_export(tmp_path, tiny_bert, method, extra):
    from adapters.peft_io import load_adapter
    from tests.helpers import train_small

    run = train_small(tmp_path / "run", method, str(tiny_bert), ["lr=1e-3", *extra])
    metrics = json.loads((run / "metrics.json").read_text())
    head = 32 * metrics_labels(run) + metrics_labels(run)
    if method == "head":
        assert metrics["trainable_params"] == head
    elif extra:  # embeddings and layer 0 frozen: fewer than all
        assert head < metrics["trainable_params"] < metrics["total_params"]
    else:
        assert metrics["trainable_params"] == metrics["total_params"]
    assert load_adapter(run / "adapter").method == method
    m = export_run(run, int8=False)
    p = m["parity"]
    assert m["method"] == method and p["max_abs_diff"] <= p["tolerance"] and p["argmax_agree"] == 1.0
    if method != "head":  # the fine-tuned encoder changes the logits under the same classifier
        assert p["adapter_effect"] > 10 * p["tolerance"]


def metrics_labels(run) -> int:
    return len(json.loads((run / "adapter" / "labels.json").read_text()))


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "full", "head"])
def test_every_other_method_exports_on_minilm(exported, method):
    """A few steps on the real MiniLM, exported through the same gate (the tiny-model cases are above and in
    test_prefix.py)."""
    m = json.loads((exported("minilm", method) / "export" / "manifest.json").read_text())
    p = m["parity"]
    assert m["method"] == method and p["max_abs_diff"] <= p["tolerance"] and p["argmax_agree"] == 1.0
    if method != "head":
        assert p["adapter_effect"] > 10 * p["tolerance"]


def test_a_killed_export_is_cleaned_up_by_the_next(runs, tmp_path):
    """kill -9 part-way leaves a staging folder and no export; the next export removes that folder, but never one that
    a live process is writing."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from train.staging import staging_dir

    run = tmp_path / "run"
    shutil.copytree(runs("tiny", "lora"), run)
    shutil.rmtree(run / "export", ignore_errors=True)
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen([sys.executable, "-m", "export", "--run", str(run), "--no-int8"], cwd=root)
    deadline = time.time() + 120
    while not [p for p in run.glob(".export.*") if p.is_dir() and any(p.iterdir())] and time.time() < deadline:
        assert proc.poll() is None, "the export finished before it could be killed"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stale = [p for p in run.glob(".export.*") if p.is_dir()]
    assert len(stale) == 1 and not (run / "export").exists()
    live = subprocess.Popen(  # another process, holding a staging folder of its own
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from train.staging import staging_dir\n"
         "with staging_dir(Path(sys.argv[1]), '.export.') as t:\n    print(t, flush=True); time.sleep(120)", str(run)],
        cwd=root, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        held = Path(live.stdout.readline().strip())
        m = export_run(run, int8=False)
        assert m["parity"]["max_abs_diff"] <= m["parity"]["tolerance"]
        assert not stale[0].exists() and held.is_dir()  # the dead run's folder went, the live one's stayed
    finally:
        live.kill()
        live.wait()
    with staging_dir(run, ".export."):
        pass
    assert sorted(p.name for p in run.iterdir()) == ["adapter", "config.yaml", "export", "metrics.json"]
