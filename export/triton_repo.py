"""``RUN/export/triton/``: a Triton Inference Server model repository for the export, three models.

  NAME_onnx/        onnxruntime backend, the fp32 graph (``1/model.onnx``), dynamic batching, and ``labels.txt`` (line i:
                    class or tag id i; a classifier's ``logits`` name it for Triton's classification extension)
  NAME_tokenizer/   python backend: ``1/model.py`` (export/triton_tokenizer.py) and ``1/tokenizer.json``,
                    TEXT -> the graph's inputs
  NAME/             ensemble: TEXT -> tokenizer -> graph -> the graph's outputs

NAME is the run folder's name. ``1/model.onnx`` is a hard link to ``export/model.onnx`` where the file system allows
(else a copy): no second copy on this disk, and to anything that copies the folder (cp -r, tar, object storage) it is
a plain file, so ``triton/`` stays complete on its own. A relative symbolic link would dangle once ``triton/`` is copied
alone, and Triton's ``default_model_filename`` names a file inside the version folder, not one outside it.

The config files are written as protobuf text by hand, so exporting needs no Triton package; tests parse them with
the model-config schema that tritonclient ships.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import onnx

from adapters.errors import ExportError

DIR = "triton"
MAX_BATCH_SIZE = 32
PAD_TO_MULTIPLE = 16  # the tokenizer pads rows to a multiple of this, so that dynamic batching finds equal shapes
TEXT = "TEXT"
TRITON_TYPES = {onnx.TensorProto.INT64: "TYPE_INT64", onnx.TensorProto.FLOAT: "TYPE_FP32", onnx.TensorProto.FLOAT16: "TYPE_FP16"}


def model_names(run_name: str) -> dict[str, str]:
    """Triton model names for a run folder name (anything outside [A-Za-z0-9_.-] becomes _)."""
    base = re.sub(r"[^A-Za-z0-9_.-]", "_", run_name).lstrip(".") or "edgetune"
    return {"ensemble": base, "tokenizer": f"{base}_tokenizer", "graph": f"{base}_onnx"}


def tensor_specs(graph: Path, num_labels: int) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(inputs, outputs) of the graph as (name, Triton type, dims without the batch axis): a named (dynamic) axis is
    -1, except the last axis of a float output, which is the labels."""

    def spec(v: onnx.ValueInfoProto, output: bool) -> tuple[str, str, list[int]]:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim][1:]
        if output and dims and dims[-1] == -1 and t.elem_type == onnx.TensorProto.FLOAT:
            dims[-1] = num_labels
        return v.name, TRITON_TYPES[t.elem_type], dims

    g = onnx.load(str(graph), load_external_data=False).graph
    return [spec(v, False) for v in g.input], [spec(v, True) for v in g.output]


def _q(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensors(field: str, specs, labels: dict[str, str] | None = None) -> str:
    rows = []
    for name, dtype, dims in specs:
        extra = f"\n    label_filename: {_q(labels[name])}" if labels and name in labels else ""
        rows.append(f"  {{\n    name: {_q(name)}\n    data_type: {dtype}\n    dims: [ {', '.join(map(str, dims))} ]{extra}\n  }}")
    return f"{field} [\n" + ",\n".join(rows) + "\n]\n"


def _parameters(params: dict[str, str]) -> str:
    return "".join(f"parameters {{\n  key: {_q(k)}\n  value: {{ string_value: {_q(v)} }}\n}}\n" for k, v in params.items())


def _map(field: str, pairs: list[tuple[str, str]]) -> str:
    return "".join(f"      {field} {{ key: {_q(k)} value: {_q(v)} }}\n" for k, v in pairs)


def graph_config(name: str, inputs, outputs, labels_file: str | None) -> str:
    labels = {"logits": labels_file} if labels_file else None
    return (
        f"name: {_q(name)}\nbackend: \"onnxruntime\"\nmax_batch_size: {MAX_BATCH_SIZE}\n"
        f'default_model_filename: "model.onnx"\n' + _tensors("input", inputs) + _tensors("output", outputs, labels)
        + "dynamic_batching { }\n"
    )  # fmt: skip


def tokenizer_config(name: str, graph_inputs, max_length: int, pad_token: str) -> str:
    params = {"max_length": str(max_length), "pad_token": pad_token, "pad_to_multiple_of": str(PAD_TO_MULTIPLE)}
    return (
        f'name: {_q(name)}\nbackend: "python"\nmax_batch_size: {MAX_BATCH_SIZE}\n'
        + _tensors("input", [(TEXT, "TYPE_STRING", [1])]) + _tensors("output", graph_inputs)
        + "instance_group [ { kind: KIND_CPU } ]\ndynamic_batching { }\n" + _parameters(params)
    )  # fmt: skip


def ensemble_config(names: dict[str, str], graph_inputs, outputs) -> str:
    wires = [n for n, _, _ in graph_inputs]
    steps = [
        (names["tokenizer"], [(TEXT, TEXT)], [(w, w) for w in wires]),
        (names["graph"], [(w, w) for w in wires], [(n, n) for n, _, _ in outputs]),
    ]
    body = ",\n".join(
        f"    {{\n      model_name: {_q(model)}\n      model_version: -1\n" + _map("input_map", ins) + _map("output_map", outs)
        + "    }"
        for model, ins, outs in steps
    )  # fmt: skip
    return (
        f'name: {_q(names["ensemble"])}\nplatform: "ensemble"\nmax_batch_size: {MAX_BATCH_SIZE}\n'
        + _tensors("input", [(TEXT, "TYPE_STRING", [1])]) + _tensors("output", outputs)
        + "ensemble_scheduling {\n  step [\n" + body + "\n  ]\n}\n"
    )  # fmt: skip


def link_or_copy(src: Path, dst: Path) -> str:
    """Hard-link ``src`` to ``dst`` where the file system allows it, else copy; returns which was done."""
    try:
        os.link(src, dst)
        return "hardlink"
    except OSError:
        shutil.copy2(src, dst)
        return "copy"


def write_triton_repo(
    export_dir: Path, run_name: str, labels: list[str], max_length: int, pad_token: str, classifier: bool
) -> dict:
    """Write ``export_dir/triton/`` for the graph ``export_dir/model.onnx`` and ``export_dir/tokenizer.json``; return
    its manifest entry (model names, batch size, how the graph file got there)."""
    if not (export_dir / "tokenizer.json").is_file():
        raise ExportError("the base model has no tokenizer.json, which Triton's tokenizer model reads: export with --no-triton")
    names = model_names(run_name)
    root = export_dir / DIR
    inputs, outputs = tensor_specs(export_dir / "model.onnx", len(labels))
    for model in names.values():
        (root / model / "1").mkdir(parents=True)
    graph_dir = root / names["graph"]
    (graph_dir / "labels.txt").write_text("".join(f"{label}\n" for label in labels))  # line i: class (tag) id i
    (graph_dir / "config.pbtxt").write_text(graph_config(names["graph"], inputs, outputs, "labels.txt" if classifier else None))
    how = link_or_copy(export_dir / "model.onnx", graph_dir / "1" / "model.onnx")
    tok_dir = root / names["tokenizer"]
    (tok_dir / "config.pbtxt").write_text(tokenizer_config(names["tokenizer"], inputs, max_length, pad_token))
    shutil.copy2(Path(__file__).with_name("triton_tokenizer.py"), tok_dir / "1" / "model.py")
    link_or_copy(export_dir / "tokenizer.json", tok_dir / "1" / "tokenizer.json")
    (root / names["ensemble"] / "config.pbtxt").write_text(ensemble_config(names, inputs, outputs))
    # an ensemble needs a version folder, empty; object storage keeps no empty folder, so it holds this file
    (root / names["ensemble"] / "1" / ".keep").write_text("Triton's ensemble version folder (ensembles have no files)\n")
    return {
        "dir": DIR,
        "models": names,
        "max_batch_size": MAX_BATCH_SIZE,
        "pad_to_multiple_of": PAD_TO_MULTIPLE,
        "graph_file": how,
    }
