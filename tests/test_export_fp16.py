"""model.fp16.onnx: converted from the fp32 graph, really fp16, gated against the fp32 graph on the dev split (logits, or
a tagger's emissions and decoded tags); the gate must bite, and a failed gate leaves no export."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from adapters.errors import ParityError
from export.__main__ import main
from export.fp16 import FILE, TOLERANCE, check_fp16, gate_classifier, open_fp16, relative_diff
from export.parity import diff_bound
from export.run import export_run
from tests.helpers import padded_batch, train_small

CPU = ["CPUExecutionProvider"]
FLOAT, FLOAT16 = onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16
TAGGER = ["task=tagging", "data=wnut16", "max_train_samples=64", "max_eval_samples=40", "head=crf", "label_smoothing=0"]


def _io(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return [(v.name, v.type.tensor_type.elem_type) for v in (*model.graph.input, *model.graph.output)]


def _negate_classifier(path) -> None:
    """What a broken conversion could ship: the fp16 graph with its classifier's weight negated."""
    model = onnx.load(str(path))
    (weight,) = [i for i in model.graph.initializer if i.name.endswith("classifier.weight")]
    values = onnx.numpy_helper.to_array(weight)
    weight.CopyFrom(onnx.numpy_helper.from_array(-values, weight.name))
    onnx.save(model, str(path))


def test_fp16_graph_passes_its_gate_and_is_fp16(exported, tiny_bert):
    run = exported("tiny", "p_tuning_v2")
    m = json.loads((run / "export" / "manifest.json").read_text())
    q = m["fp16"]
    assert q["file"] == FILE and q["output"] == "logits" and q["provider"] == "CPUExecutionProvider"
    assert q["max_rel_diff"] <= q["tolerance"] == TOLERANCE and q["argmax_agree"] == 1.0 and q["n_samples"] == 96
    assert q["kept_fp32"] == []
    fp32, fp16 = onnx.load(str(run / "export" / "model.onnx")), onnx.load(str(run / "export" / FILE))
    assert _io(fp16) == _io(fp32)  # int64 in, float32 logits out, as the fp32 graph
    stored = {i.name: (i.data_type, tuple(i.dims)) for i in fp16.graph.initializer}
    weights = [i for i in fp32.graph.initializer if i.data_type == FLOAT]
    assert weights and all(stored[i.name] == (FLOAT16, tuple(i.dims)) for i in weights)  # every weight in fp16
    ids, mask = padded_batch(tiny_bert)
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    l32 = ort.InferenceSession(str(run / "export" / "model.onnx"), providers=CPU).run(["logits"], feeds)[0]
    l16 = ort.InferenceSession(str(run / "export" / FILE), providers=CPU).run(["logits"], feeds)[0]
    assert l16.dtype == np.float32 and (l16.argmax(-1) == l32.argmax(-1)).all()
    diff = float(np.abs(l16 - l32).max())
    p = m["parity"]
    # really fp16: further from the fp32 graph than two fp32 evaluations may be; and within the gate's tolerance
    assert diff_bound(p["reference_error"], p["scale"]) < diff <= TOLERANCE * float(np.abs(l32).max())


def test_fp16_gate_bites(exported, tmp_path):
    from transformers import AutoTokenizer

    run = exported("tiny", "p_tuning_v2")
    export = run / "export"
    fp32 = ort.InferenceSession(str(export / "model.onnx"), providers=CPU)
    tok = AutoTokenizer.from_pretrained(export)
    texts = ["how do I top up", "my card is lost", "exchange rate please", "cancel my transfer"] * 8
    good = gate_classifier(fp32, open_fp16(export / FILE), tok, texts, 32, [])
    assert good.max_rel_diff <= TOLERANCE and good.argmax_agree == 1.0
    broken = tmp_path / FILE
    shutil.copy2(export / FILE, broken)
    _negate_classifier(broken)
    with pytest.raises(ParityError, match="fp16 gate failed: model.fp16.onnx logits differ"):
        gate_classifier(fp32, open_fp16(broken), tok, texts, 32, [])
    l32 = np.array([[1.0, -2.0, 0.5], [0.2, 0.1, -4.0]], dtype=np.float32)
    l16 = l32 + np.float32(2**-11) * np.abs(l32).max()  # one half-ulp of fp16 at the largest logit
    assert check_fp16(l32, l16, 2, 2, [], "logits", "cpu").max_rel_diff == pytest.approx(2**-11)
    with pytest.raises(ParityError, match="tolerance 0"):  # tolerance exceeded
        check_fp16(l32, l16, 2, 2, [], "logits", "cpu", tolerance=0.0)
    with pytest.raises(ParityError, match="predicted class differ from the fp32 graph's on 1 of 2"):
        check_fp16(l32, l16, 1, 2, [], "logits", "cpu")  # below 1 / MAX_CHANGED sentences, none may change
    rows = np.repeat(l32[:1], 1000, axis=0)
    assert check_fp16(rows, rows, 1000 - 5, 1000, [], "logits", "cpu").argmax_agree == 0.995  # 0.5% of 1,000: 5 ties
    with pytest.raises(ParityError, match="on 6 of 1000 dev sentences \\(at most 5 may"):
        check_fp16(rows, rows, 1000 - 6, 1000, [], "logits", "cpu")
    with pytest.raises(ParityError, match="fp16 gate failed"):  # an fp16 overflow
        check_fp16(l32, np.where(l32 > 0.9, np.inf, l32), 2, 2, [], "logits", "cpu")
    assert relative_diff(l32, l32)[0] == 0.0


def test_failed_fp16_gate_skips_the_fp16_graph_and_says_why(runs, tmp_path, monkeypatch, capsys):
    """A model beyond fp16 keeps its gated fp32 export, without model.fp16.onnx and with the reason in the manifest."""
    import export.run

    run = tmp_path / "run"
    shutil.copytree(runs("tiny", "lora"), run)
    shutil.rmtree(run / "export", ignore_errors=True)
    real = export.run.convert_fp16

    def corrupted(src, dst):
        kept = real(src, dst)
        _negate_classifier(dst)
        return kept

    monkeypatch.setattr(export.run, "convert_fp16", corrupted)  # the name the export calls
    assert main(["--run", str(run), "--no-int8"]) == 0
    assert "warning: fp16 gate failed: model.fp16.onnx logits differ" in capsys.readouterr().err
    m = json.loads((run / "export" / "manifest.json").read_text())
    assert m["fp16"] is None and m["fp16_skipped"].endswith(f"{FILE} not written") and m["parity"]["argmax_agree"] == 1.0
    assert not (run / "export" / FILE).exists() and (run / "export" / "model.onnx").is_file()
    assert not list(run.glob(".export*"))
    monkeypatch.setattr(export.run, "convert_fp16", real)
    assert main(["--run", str(run), "--no-int8", "--no-fp16", "--no-triton"]) == 0
    m = json.loads((run / "export" / "manifest.json").read_text())
    assert m["fp16"] is None and m["fp16_skipped"] == "not asked for (--no-fp16)" and m["triton"] is None
    assert not (run / "export" / FILE).exists() and not (run / "export" / "triton").exists()


def test_a_conversion_that_leaves_fp32_weights_is_refused(exported):
    from adapters.errors import ExportError
    from export.fp16 import _check_fp16

    fp32 = onnx.load(str(exported("tiny", "p_tuning_v2") / "export" / "model.onnx"))
    with pytest.raises(ExportError, match="left .* fp32 weights on converted nodes"):
        _check_fp16(fp32, fp32, set())


@pytest.fixture(scope="module")
def tiny_tagger(tmp_path_factory, tiny_bert):
    return train_small(tmp_path_factory.mktemp("fp16_tagger"), "p_tuning_v2", str(tiny_bert), [*TAGGER, "head_lr=5e-2"])


@pytest.mark.parametrize("decode", [True, False], ids=["viterbi-in-graph", "emissions-only"])
def test_tagger_fp16_graph_keeps_the_viterbi_decode_in_fp32(tiny_tagger, decode):
    m = export_run(tiny_tagger, decode=decode)
    q = m["fp16"]
    assert q["output"] == "emissions" and q["max_rel_diff"] <= q["tolerance"] and q["argmax_agree"] == 1.0
    assert q["n_samples"] == 40 and q["kept_fp32"] == (["Loop"] if decode else [])
    fp16 = onnx.load(str(tiny_tagger / "export" / FILE))
    fp32 = onnx.load(str(tiny_tagger / "export" / "model.onnx"))
    assert _io(fp16) == _io(fp32)  # emissions float32 (and tags int64) out
    loops = [n for n in fp16.graph.node if n.op_type == "Loop"]
    assert len(loops) == (2 if decode else 0)
    for loop in loops:  # the decode's running scores and carried values stay fp32
        (body,) = [a.g for a in loop.attribute if a.name == "body"]
        types = {v.type.tensor_type.elem_type for v in (*body.input, *body.output) if v.type.HasField("tensor_type")}
        assert FLOAT16 not in types
