"""RUN/export/triton/: every config.pbtxt parses with the model-config schema tritonclient ships, the ensemble wires
tensor names and types that the two models and the ONNX graph really have, and the tokenizer model, run with a stub of
Triton's python backend, feeds the graph what the edgetune server feeds it."""

import functools
import importlib.util
import json
import os
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from tests.helpers import train_small

CPU = ["CPUExecutionProvider"]
ONNX_TYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32"}
TAGGER = ["task=tagging", "data=wnut16", "max_train_samples=64", "max_eval_samples=40", "head=crf", "label_smoothing=0"]


@functools.cache
def model_config_pb2():
    """tritonclient's generated model_config_pb2, loaded from its file: it needs protobuf only, while importing the
    tritonclient.grpc package needs grpcio (tritonclient[grpc]). Loaded once: it registers its schema globally."""
    tritonclient = pytest.importorskip("tritonclient")
    path = Path(tritonclient.__file__).parent / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location("triton_model_config_pb2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse(path: Path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), model_config_pb2().ModelConfig())


def specs(tensors) -> list[tuple[str, str, list[int]]]:
    return [(t.name, model_config_pb2().DataType.Name(t.data_type), list(t.dims)) for t in tensors]


def graph_specs(graph: onnx.GraphProto, num_labels: int):
    """What the configs must say for the graph: every input (B, S) or (B, W) int64; logits (B, L), emissions
    (B, W, L), tags (B, W); the batch axis is Triton's (max_batch_size)."""
    inputs = [(v.name, ONNX_TYPES[v.type.tensor_type.elem_type], [-1]) for v in graph.input]
    want = {"logits": [num_labels], "emissions": [-1, num_labels], "tags": [-1]}
    outputs = [(v.name, ONNX_TYPES[v.type.tensor_type.elem_type], want[v.name]) for v in graph.output]
    for v in graph.input:
        assert len(v.type.tensor_type.shape.dim) == 2, v.name
    return inputs, outputs


@pytest.fixture(scope="module")
def tiny_tagger(tmp_path_factory, tiny_bert):
    from export.run import export_run

    run = train_small(tmp_path_factory.mktemp("triton_tagger"), "p_tuning_v2", str(tiny_bert), [*TAGGER, "head_lr=5e-2"])
    export_run(run)
    return run


@pytest.fixture(params=["classifier", "tagger"])
def export_dir(request, exported, tiny_tagger) -> Path:
    return (exported("tiny", "p_tuning_v2") if request.param == "classifier" else tiny_tagger) / "export"


def test_configs_parse_and_the_ensemble_wires_real_names(export_dir):
    m = json.loads((export_dir / "manifest.json").read_text())
    names, root = m["triton"]["models"], export_dir / m["triton"]["dir"]
    assert sorted(p.name for p in root.iterdir()) == sorted(names.values())
    configs = {role: parse(root / name / "config.pbtxt") for role, name in names.items()}
    for role, c in configs.items():
        assert c.name == names[role] and c.max_batch_size == m["triton"]["max_batch_size"] > 0
        assert (root / names[role] / "1").is_dir()  # a version folder, the ensemble's too (it holds a .keep file)
    graph_cfg, tok_cfg, ens = configs["graph"], configs["tokenizer"], configs["ensemble"]
    assert graph_cfg.backend == "onnxruntime" and graph_cfg.HasField("dynamic_batching")
    assert tok_cfg.backend == "python" and ens.platform == "ensemble"
    graph_file = root / names["graph"] / "1" / graph_cfg.default_model_filename
    assert graph_file.read_bytes() == (export_dir / "model.onnx").read_bytes()
    if m["triton"]["graph_file"] == "hardlink":  # no second copy on disk
        assert os.path.samefile(graph_file, export_dir / "model.onnx")
    labels = json.loads((export_dir / "labels.json").read_text())
    assert (root / names["graph"] / "labels.txt").read_text().splitlines() == labels
    inputs, outputs = graph_specs(onnx.load(str(graph_file)).graph, len(labels))
    assert [i for i, _, _ in inputs] == m["inputs"] and [o for o, _, _ in outputs] == m["outputs"]
    assert specs(graph_cfg.input) == inputs and specs(graph_cfg.output) == outputs
    assert specs(tok_cfg.input) == specs(ens.input) == [("TEXT", "TYPE_STRING", [1])]
    assert specs(tok_cfg.output) == inputs and specs(ens.output) == outputs
    if m["task"] == "sequence-classification":  # Triton's classification extension names the classes
        assert graph_cfg.output[0].label_filename == "labels.txt"
    params = {k: v.string_value for k, v in tok_cfg.parameters.items()}
    assert int(params["max_length"]) == m["max_length"] and params["pad_token"] == "[PAD]"
    assert (root / names["tokenizer"] / "1" / "tokenizer.json").read_bytes() == (export_dir / "tokenizer.json").read_bytes()
    # every step: a model of the repository, all its inputs fed from tensors that exist by then, its outputs real
    by_name = {c.name: c for c in configs.values()}
    typed = {t.name: (model_config_pb2().DataType.Name(t.data_type), list(t.dims)) for t in ens.input}
    steps = list(ens.ensemble_scheduling.step)
    assert [s.model_name for s in steps] == [names["tokenizer"], names["graph"]]
    for step in steps:
        model = by_name[step.model_name]
        model_in = {name: (dtype, dims) for name, dtype, dims in specs(model.input)}
        model_out = {name: (dtype, dims) for name, dtype, dims in specs(model.output)}
        assert set(step.input_map) == set(model_in) and set(step.output_map) <= set(model_out)
        for tensor, source in step.input_map.items():
            assert typed[source] == model_in[tensor], (step.model_name, tensor)
        for tensor, target in step.output_map.items():
            typed[target] = model_out[tensor]
    for name, dtype, dims in specs(ens.output):
        assert typed[name] == (dtype, dims)


class _Tensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self._name, self._array = name, array

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> np.ndarray:
        return self._array


class _Response:
    def __init__(self, output_tensors=(), error=None) -> None:
        self.output_tensors, self.error = list(output_tensors), error


class _Request:
    def __init__(self, texts: list) -> None:
        self.text = np.array([[t.encode() if isinstance(t, str) else t] for t in texts], dtype=object)  # (B, 1)


@pytest.fixture
def tokenizer_model(monkeypatch):
    """Load a repository's tokenizer model.py with a stub of ``triton_python_backend_utils`` (only Triton has it)."""
    from google.protobuf import json_format

    stub = types.ModuleType("triton_python_backend_utils")
    stub.Tensor, stub.InferenceResponse, stub.TritonError = _Tensor, _Response, type("TritonError", (Exception,), {})
    stub.get_input_tensor_by_name = lambda request, name: _Tensor(name, request.text) if name == "TEXT" else None
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", stub)

    def load(model_dir: Path):
        spec = importlib.util.spec_from_file_location("edgetune_triton_tokenizer", model_dir / "1" / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.TritonPythonModel()
        config = json_format.MessageToJson(parse(model_dir / "config.pbtxt"), preserving_proto_field_name=True)
        model.initialize({"model_config": config, "model_version": "1", "model_repository": str(model_dir)})
        return model

    return load


def test_tokenizer_model_feeds_the_graph_what_the_server_feeds_it(export_dir, tokenizer_model):
    from serve.repository import load_model

    m = json.loads((export_dir / "manifest.json").read_text())
    names, root = m["triton"]["models"], export_dir / m["triton"]["dir"]
    model = tokenizer_model(root / names["tokenizer"])
    long = " ".join(["card"] * 3 * m["max_length"])  # truncated at max_length, as the server truncates
    texts = ["I lost my card", "how do I top up?", long, "Watching the Empire State Building with Justin Bieber"]
    bad = _Request([b"\xff\xfe not utf-8"])
    first, second, failed = model.execute([_Request(texts[:2]), _Request(texts[2:]), bad])
    assert failed.error is not None and not failed.output_tensors and first.error is None
    served = load_model(export_dir)
    session = ort.InferenceSession(str(root / names["graph"] / "1" / "model.onnx"), providers=CPU)
    for response, batch in ((first, texts[:2]), (second, texts[2:])):
        feeds = {t.name(): t.as_numpy() for t in response.output_tensors}
        assert list(feeds) == m["inputs"] and all(a.dtype == np.int64 and len(a) == len(batch) for a in feeds.values())
        width = feeds["input_ids"].shape[1]
        assert width % m["triton"]["pad_to_multiple_of"] == 0 or width == m["max_length"]
        assert width <= m["max_length"]
        outputs = dict(zip(m["outputs"], session.run(m["outputs"], feeds), strict=True))
        if m["task"] == "sequence-classification":  # padding is masked: the served logits, to fp32 rounding
            tolerance = m["parity"]["tolerance"]  # the export gate's bound between two fp32 evaluations
            np.testing.assert_allclose(outputs["logits"], served.logits(batch), rtol=0, atol=tolerance)
            assert (outputs["logits"].argmax(-1) == served.logits(batch).argmax(-1)).all()
        else:  # the server's tags for every word it kept (those cut off by max_length it tags O)
            words = [t.split() for t in batch]
            for row, (sent, tags) in enumerate(zip(words, served.tag_words(words), strict=True)):
                kept = int(feeds["word_mask"][row].sum())
                assert [served.labels[t] for t in outputs["tags"][row, :kept]] == tags[:kept]
                assert (outputs["tags"][row, kept:] == -1).all() and set(tags[kept:]) <= {"O"}
                assert kept == len(sent) or batch[row] is long
