"""Export a run: RUN/adapter -> RUN/export (model.onnx, model.int8.onnx, model.fp16.onnx, tokenizer, labels,
manifest, triton/), each graph through its gate. ``python -m export`` is the command line over ``export_run``."""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import transformers
from transformers import AutoTokenizer

from adapters.config import load_config, run_config
from adapters.crf import decode_tags
from adapters.eager import bare_model, load_model, model_folder, reference_model
from adapters.errors import EdgetuneError, ParityError
from adapters.methods import freeze, method_of
from adapters.methods.common import Frozen
from adapters.model import base_model_path
from adapters.peft_io import load_adapter
from adapters.prefix import PrefixModel
from export.attention import fuse_prefix_attention
from export.fp16 import FILE, convert_fp16, gate_classifier, gate_tagger, open_fp16
from export.graph import OPSET, LogitsOnly, PromptLogits, TaggerGraph, graph_outputs, optimize, trace_to_onnx
from export.parity import check_parity, check_tagging_parity
from export.prefix_op import export_prefix_op
from export.quantize import check_int8, quantize_int8
from export.triton_repo import write_triton_repo
from train.splits import dev_split, parity_texts
from train.staging import staging_dir

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def graph_module(eager: PrefixModel, model: torch.nn.Module, frozen: Frozen, task: str, decode: bool = True) -> torch.nn.Module:
    """The module to trace: built from the adapter's frozen form, a tagger wrapped in TaggerGraph with the eager
    model's CRF (its Viterbi decode in the graph unless ``decode`` is off).

    A prefix: a copy of the eager model with each layer's attention one fused Attention node, the frozen prefix as its
    past (export/attention.py). Otherwise a copy of ``model`` (the loaded base model, or the fine-tuned model of a full
    / head-only run) as plain BERT with transformers' eager attention (what onnxruntime fuses into Attention), the
    frozen weights (LoRA merged) and classifier loaded, and a frozen prompt before the word embeddings.
    """

    if frozen.prefix is not None:
        module = fuse_prefix_attention(copy.deepcopy(eager))
    else:
        plain = copy.deepcopy(model)
        plain.set_attn_implementation("eager")
        plain.load_state_dict({**plain.state_dict(), **frozen.state, **{f"classifier.{k}": v for k, v in frozen.head.items()}})
        module = (LogitsOnly(plain) if frozen.prompt is None else PromptLogits(plain, frozen.prompt)).eval()
    if task == "tagging":
        module = TaggerGraph(module, copy.deepcopy(eager.crf), decode).eval()
    return module


def int8_graph(tmp: Path, session, tok, run, label_names: list[str], max_length: int, max_drop: float):
    """Write tmp/model.int8.onnx and return its accuracy gate (raises ParityError when it loses too much)."""

    quantize_int8(tmp / "model.onnx", tmp / "model.int8.onnx")
    dev = dev_split(run)
    index = {name: i for i, name in enumerate(label_names)}
    labels = np.asarray([index.get(label, -1) for label in dev.labels])
    int8_session = ort.InferenceSession(str(tmp / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    return check_int8(session, int8_session, tok, list(dev.texts), labels, max_length, max_drop)


def fp16_graph(tmp: Path, session, tok, run, tagging: bool, max_length: int, crf):
    """Write tmp/model.fp16.onnx and return (its gate against the fp32 graph, None): the dev split's logits
    (classifier, as the int8 gate), or every dev sentence's emissions and tags (tagger). A failed gate removes the file
    and returns (None, why): the model is beyond fp16, not the export broken (export/fp16.py), so the gated fp32 export
    is still written, with the reason in the manifest (``fp16_skipped``). A conversion that breaks the graph raises.
    """

    kept = convert_fp16(tmp / "model.onnx", tmp / FILE)
    fp16_session = open_fp16(tmp / FILE)
    dev = dev_split(run)

    def decode(emissions, mask):  # an emissions-only graph: the server's decode, with the same CRF
        return decode_tags(crf, torch.from_numpy(emissions), torch.from_numpy(mask)).numpy()

    try:
        if tagging:
            return gate_tagger(session, fp16_session, tok, list(dev.tokens), max_length, kept, decode), None
        return gate_classifier(session, fp16_session, tok, list(dev.texts), max_length, kept), None
    except ParityError as e:
        del fp16_session
        (tmp / FILE).unlink()
        return None, f"{e}; {FILE} not written"


def replace_folder(tmp: Path, target: Path) -> None:
    """Move a completed folder into place, replacing an older one only once the new one is complete."""
    tmp.chmod(0o755)  # staging folders are private; the export folder is for deploying
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
        tmp.rename(target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(target)


def export_run(
    run_dir: Path,
    base_model: str = "",
    tolerance: float | None = None,
    int8: bool = True,
    int8_max_drop: float = 0.01,
    decode: bool = True,
    adapter_dir: Path | None = None,
    data: str = "",
    fp16: bool = True,
    triton: bool = True,
) -> dict:
    """Export RUN/adapter to RUN/export through the parity gate (and an int8 graph through its accuracy gate, an fp16
    graph through its gate against the fp32 graph (a failed one skips it, see fp16_graph), and a Triton model
    repository in RUN/export/triton/).

    A tagger's graph decodes tags (CRF Viterbi or argmax) unless ``decode`` is off (emissions only, the CRF in
    crf.json for the server to decode); the int8 graph is for classifiers only. ``adapter_dir`` (default RUN/adapter)
    may be any adapter folder, PEFT-written ones included; ``data`` then names the dataset whose dev split the parity
    gate uses (default: the run's config.yaml). ``fp16`` / ``triton`` off: no model.fp16.onnx / no triton/.

    Returns the manifest. Raises EdgetuneError subclasses; on any failure no export folder is left behind.
    """

    t0 = time.perf_counter()
    adapter_dir = Path(adapter_dir) if adapter_dir else run_dir / "adapter"
    adapter = load_adapter(adapter_dir)
    cfg = load_config(None, [f"data={data}", f"task={adapter.task}"]) if data else run_config(run_dir)
    max_length = cfg.max_length
    named = base_model or adapter.config.get("base_model_name_or_path") or ""
    if named and not base_model and not Path(named).is_dir():
        raise EdgetuneError(f"the adapter's base model {named!r} is not a folder here (offline): pass --base-model DIR")
    base_path = base_model_path(named)
    method = method_of(adapter.method)
    model = load_model(model_folder(adapter_dir, adapter, str(base_path)), adapter)  # the base, or the fine-tuned model
    frozen = freeze(adapter, model)
    eager = reference_model(copy.deepcopy(model), adapter, frozen)
    bare = bare_model(load_model(base_path, adapter) if method.CHECKPOINT else model, frozen)
    virtual = int(adapter.config.get("num_virtual_tokens", 0)) if method.VIRTUAL_TOKENS else 0
    c = eager.base.config
    module = graph_module(eager, model, frozen, adapter.task, decode)
    expected = method.fused_ops(c)
    tagging = adapter.task == "tagging"

    with staging_dir(run_dir, ".export.") as tmp:
        trace_to_onnx(module, tmp / "raw.onnx")
        fused = optimize(tmp / "raw.onnx", tmp / "model.onnx", c.num_attention_heads, c.hidden_size, expected)
        (tmp / "raw.onnx").unlink()
        session = ort.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
        tok = AutoTokenizer.from_pretrained(base_path)
        if tagging:  # every dev sentence: emissions and decoded paths
            sentences = list(dev_split(cfg).tokens)
            parity = check_tagging_parity(
                session, eager, bare, tok, sentences, max_length, tolerance, require_effect=method.CHANGES_OUTPUT
            )
        else:
            texts = parity_texts(cfg)
            parity = check_parity(session, eager, bare, tok, texts, max_length, tolerance, require_effect=method.CHANGES_OUTPUT)
        prefix_op = None
        if frozen.prefix is not None and not tagging:  # the same graph with the edgetune.PrefixAttention op (kernels/ort/)
            prefix_op = export_prefix_op(
                tmp, frozen.prefix, lambda s: check_parity(s, eager, bare, tok, texts, max_length, tolerance)
            )
        use_int8 = int8 and not tagging
        gate = int8_graph(tmp, session, tok, cfg, adapter.label_names, max_length, int8_max_drop) if use_int8 else None
        half, half_skipped = (None, "not asked for (--no-fp16)")
        if fp16:
            half, half_skipped = fp16_graph(tmp, session, tok, cfg, tagging, max_length, eager.crf)
        if tagging and not decode and eager.crf is not None:  # the server decodes emissions with this CRF
            (tmp / "crf.json").write_text(json.dumps({k: v.tolist() for k, v in eager.crf.state_dict().items()}))
        for name in TOKENIZER_FILES:
            if (base_path / name).is_file():
                shutil.copy2(base_path / name, tmp / name)
        plain_config = c.to_dict()
        plain_config.pop("_attn_implementation_autoset", None)
        plain_config["attn_implementation"] = None
        (tmp / "config.json").write_text(json.dumps(plain_config, indent=2, default=str))
        (tmp / "labels.json").write_text(json.dumps(adapter.label_names, indent=1))
        repo = None
        if triton:
            name = (run_dir.resolve() if run_dir.name in ("", ".", "..") else run_dir).name
            repo = write_triton_repo(tmp, name, adapter.label_names, max_length, tok.pad_token, not tagging)
        manifest = {
            "method": adapter.method,
            "task": "token-classification" if tagging else "sequence-classification",
            "head": "crf" if eager.crf is not None else "linear",
            "decode_in_graph": decode if tagging else None,
            "base_model": str(base_path),
            "adapter_sha256": adapter.sha256,
            "num_virtual_tokens": virtual,
            "inputs": [i.name for i in session.get_inputs()],
            "outputs": graph_outputs(module),
            "max_length": max_length,
            "max_positions": c.max_position_embeddings - virtual,
            "num_labels": len(adapter.label_names),
            "opset": OPSET,
            "exporter": "torch.onnx (TorchScript) + onnxruntime.transformers.optimizer",
            "fused_ops": fused,
            "onnxruntime_version": ort.__version__,
            "torch_version": torch.__version__,
            "transformers_version": transformers.__version__,
            "providers_tested": [parity.provider],
            "parity": parity.to_dict(),
            "int8": gate.to_dict() if gate else None,
            "prefix_op": prefix_op,
            "fp16": half.to_dict() if half else None,
            "fp16_skipped": half_skipped,
            "triton": repo,
            "export_seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        replace_folder(tmp, run_dir / "export")
    return manifest
