"""``python -m export --run runs/NAME``: RUN/adapter -> RUN/export (model.onnx, model.int8.onnx, model.fp16.onnx, tokenizer,
labels, manifest, triton/)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from train.errors import EdgetuneError  # noqa: E402
from train.staging import staging_dir  # noqa: E402

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


def run_config(run_dir: Path):
    """The RunConfig a run was trained with (RUN/config.yaml)."""
    from train.config import load_config

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise EdgetuneError(
            f"{cfg_path} is missing: the parity gate needs the run's dev data "
            "(pass --run of a trained run, or --data to name the data of an adapter trained elsewhere)"
        )
    return load_config(cfg_path)


def dev_split(run):
    """The dev data (train.data.Split, or train.tagging.TagSplit) of a run folder or a RunConfig."""
    from train.data import load_dataset
    from train.tagging import load_tagging_dataset

    cfg = run_config(run) if isinstance(run, Path) else run
    return (load_tagging_dataset(cfg) if cfg.task == "tagging" else load_dataset(cfg)).dev


def parity_texts(run, n: int = 64) -> list[str]:
    """``n`` real dev sentences of the run's dataset (shuffled with a fixed seed)."""
    import random

    texts = list(dev_split(run).texts)
    random.Random(0).shuffle(texts)
    return texts[:n]


def reference_models(adapter_dir: Path, adapter, base_path: Path):
    """The eager adapter model as trained (SDPA attention, adapter unmerged), and the bare base with the same head."""
    from export.eager import attach_adapter, load_adapter_model
    from train.adapter_io import CHECKPOINT_METHODS
    from train.model import load_base
    from train.prefix import PrefixModel

    eager = load_adapter_model(adapter_dir, str(base_path))
    if adapter.method in CHECKPOINT_METHODS:  # the pretrained encoder under the fine-tuned classifier
        base = load_base(base_path, adapter.label_names, task=adapter.task)
        base.classifier.load_state_dict(eager.base.classifier.state_dict())
        bare = PrefixModel(base, None, eager.num_heads).eval()
    elif adapter.method == "lora":
        bare = attach_adapter(load_base(base_path, adapter.label_names, task=adapter.task), _zero_lora(adapter), eager.num_heads)
    else:
        bare = PrefixModel(eager.base, None, eager.num_heads).eval()
    return eager, bare


def graph_module(
    adapter_dir: Path, adapter, base_path: Path, config, decode: bool = True
) -> tuple[torch.nn.Module, dict[str, int]]:
    """The module to trace and the fused ops its optimised graph must contain (a tagger wrapped in TaggerGraph, with
    the CRF's Viterbi decode in the graph unless ``decode`` is off).

    Full / head-only: the fine-tuned model folder itself. LoRA: merged into the base weights. Both as plain BERT with
    transformers' eager attention (what onnxruntime fuses into Attention). Prefix: frozen per-layer prefix, exported as one Attention per layer with the prefix as its past.
    """
    from export.attention import fuse_prefix_attention
    from export.eager import crf_module, load_adapter_model
    from export.fold import merge_lora
    from export.graph import LogitsOnly, PromptLogits, TaggerGraph
    from train.adapter_io import CHECKPOINT_METHODS, head_state
    from train.model import load_base

    layers = config.num_hidden_layers
    plain_graph = {"Attention": layers, "SkipLayerNormalization": 2 * layers - 1}
    task = adapter.task
    if adapter.method in CHECKPOINT_METHODS:
        module, expected = LogitsOnly(load_base(adapter_dir, adapter.label_names, "eager", task)).eval(), plain_graph
    elif adapter.method in ("prompt_tuning", "p_tuning"):
        plain = load_base(base_path, adapter.label_names, "eager", task)
        plain.classifier.load_state_dict(head_state(adapter.tensors))
        module, expected = PromptLogits(plain, adapter.tensors["prompt_embeddings"]).eval(), plain_graph
    elif adapter.method == "lora":
        plain = load_base(base_path, adapter.label_names, "eager", task)
        state = merge_lora(plain.state_dict(), adapter.tensors, int(adapter.config["r"]), float(adapter.config["lora_alpha"]))
        state.update({f"classifier.{k}": v for k, v in head_state(adapter.tensors).items()})
        plain.load_state_dict(state)
        module, expected = LogitsOnly(plain).eval(), plain_graph
    else:
        module = fuse_prefix_attention(load_adapter_model(adapter_dir, str(base_path)))
        expected = {"Attention": layers, "SkipLayerNormalization": 2 * layers - 1, "BiasGelu": layers}
    if task == "tagging":
        module = TaggerGraph(module, crf_module(adapter), decode).eval()
    return module, expected


def int8_graph(tmp: Path, session, tok, run, label_names: list[str], max_length: int, max_drop: float):
    """Write tmp/model.int8.onnx and return its accuracy gate (raises ParityError when it loses too much)."""
    import numpy as np
    import onnxruntime as ort

    from export.quantize import check_int8, quantize_int8

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
    from export.fp16 import FILE, convert_fp16, gate_classifier, gate_tagger, open_fp16
    from train.errors import ParityError
    from train.tagging import decode_tags

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
    import onnxruntime as ort
    import transformers
    from transformers import AutoTokenizer

    from export.graph import OPSET, graph_outputs, optimize, trace_to_onnx
    from export.parity import check_parity, check_tagging_parity
    from train.adapter_io import load_adapter
    from train.config import load_config
    from train.model import VIRTUAL_TOKEN_METHODS, base_model_path

    t0 = time.perf_counter()
    adapter_dir = Path(adapter_dir) if adapter_dir else run_dir / "adapter"
    adapter = load_adapter(adapter_dir)
    cfg = load_config(None, [f"data={data}", f"task={adapter.task}"]) if data else run_config(run_dir)
    max_length = cfg.max_length
    named = base_model or adapter.config.get("base_model_name_or_path") or ""
    if named and not base_model and not Path(named).is_dir():
        raise EdgetuneError(f"the adapter's base model {named!r} is not a folder here (offline): pass --base-model DIR")
    base_path = base_model_path(named)
    eager, bare = reference_models(adapter_dir, adapter, base_path)
    virtual = int(adapter.config.get("num_virtual_tokens", 0)) if adapter.method in VIRTUAL_TOKEN_METHODS else 0
    c = eager.base.config
    module, expected = graph_module(adapter_dir, adapter, base_path, c, decode)
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
                session, eager, bare, tok, sentences, max_length, tolerance, require_effect=adapter.method != "head"
            )
        else:
            texts = parity_texts(cfg)
            # head-only training leaves the encoder as it was: nothing beyond the classifier for the effect check to see
            parity = check_parity(
                session, eager, bare, tok, texts, max_length, tolerance, require_effect=adapter.method != "head"
            )
        prefix_op = None
        if (
            adapter.method == "p_tuning_v2" and not tagging
        ):  # the same graph with the edgetune.PrefixAttention op (kernels/ort/), same gate
            from export.prefix_op import export_prefix_op

            prefix_op = export_prefix_op(tmp, lambda s: check_parity(s, eager, bare, tok, texts, max_length, tolerance))
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
            from export.triton_repo import write_triton_repo

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


def _zero_lora(adapter):
    """The same adapter with every LoRA B set to zero: the bare base model with the trained head."""
    from dataclasses import replace

    tensors = {k: (torch.zeros_like(v) if k.endswith("lora_B.weight") else v) for k, v in adapter.tensors.items()}
    return replace(adapter, tensors=tensors)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export", description=__doc__)
    ap.add_argument("--run", default=None, help="run folder holding adapter/, gets export/ (default: runs/default)")
    ap.add_argument("--base-model", default="", help="base model folder, when the adapter's is not available here")
    ap.add_argument("--adapter", default="", help="adapter folder to export instead of RUN/adapter (e.g. one written by peft)")
    ap.add_argument("--data", default="", help="with --adapter: dataset or file whose dev split the parity gate uses")
    ap.add_argument(
        "--tolerance", type=float, default=None,
        help="max abs logit difference allowed (fp32); default: 1e-4, or more where this CPU's fp32 rounding needs it",
    )  # fmt: skip
    ap.add_argument("--no-int8", action="store_true", help="do not write the int8 graph for CPU serving")
    ap.add_argument("--int8-max-drop", type=float, default=0.01, help="dev accuracy the int8 graph may lose (default 0.01)")
    ap.add_argument("--no-fp16", action="store_true", help="do not write the fp16 graph (model.fp16.onnx) for GPU serving")
    ap.add_argument("--no-triton", action="store_true", help="do not write the Triton model repository (RUN/export/triton/)")
    ap.add_argument(
        "--emissions-only", action="store_true", help="tagging: the graph returns emissions; the server decodes (crf.json)"
    )
    args = ap.parse_args(argv)
    if args.run is None and args.adapter:
        ap.error("--adapter needs --run OUT: the folder that receives OUT/export")
    args.run = args.run or "runs/default"
    try:
        m = export_run(
            Path(args.run),
            args.base_model,
            args.tolerance,
            not args.no_int8,
            args.int8_max_drop,
            not args.emissions_only,
            Path(args.adapter) if args.adapter else None,
            args.data,
            not args.no_fp16,
            not args.no_triton,
        )
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = m["parity"]
    print(
        f"{m['method']}: exported {args.run}/export/model.onnx; parity max |diff| {p['max_abs_diff']:.2e} over "
        f"{p['n_samples']} dev sentences (batches {p['batch_sizes']}), "
        + (f"paths agree {p['paths_agree']:.0%}, " if "paths_agree" in p else f"argmax agree {p['argmax_agree']:.0%}, ")
        + f"adapter effect {p['adapter_effect']:.2f}; fused {m['fused_ops']}"
    )
    if m["int8"]:
        q = m["int8"]
        print(
            f"int8: model.int8.onnx dev accuracy {q['dev_accuracy_int8']:.4f} vs fp32 {q['dev_accuracy_fp32']:.4f} "
            f"({q['n_samples']} dev sentences, {q['argmax_agree_with_fp32']:.1%} same class as fp32)"
        )
    if m["fp16"]:
        q = m["fp16"]
        print(
            f"fp16: model.fp16.onnx max |diff| {q['max_rel_diff']:.2e} of max |fp32| ({q['output']}, {q['n_samples']} dev "
            f"sentences, tolerance {q['tolerance']:g}), {q['argmax_agree']:.0%} same "
            + ("class" if q["output"] == "logits" else "tags")
        )
    elif not args.no_fp16:  # the gate failed: the export stands, without the fp16 graph
        print(f"warning: {m['fp16_skipped']}", file=sys.stderr)
    if m["triton"]:
        q = m["triton"]
        print(f"triton: {args.run}/export/{q['dir']}/ (models {', '.join(q['models'].values())}; graph {q['graph_file']})")
    if m["prefix_op"]:
        q = m["prefix_op"]
        print(
            f"prefix op: {q['file']}, {q['nodes']} {q['op']} nodes, CPU parity (function body) max |diff| {q['parity']['max_abs_diff']:.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
