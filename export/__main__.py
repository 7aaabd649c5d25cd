"""``python -m export --run runs/NAME``: RUN/adapter -> RUN/export (model.onnx, model.int8.onnx, model.fp16.onnx, tokenizer,
labels, manifest, triton/). ``python -m export --bank OUT --adapters DIR...``: many adapters of one base model and method
-> one bank graph in OUT (model.onnx, bank.safetensors, adapters.json, tokenizer, manifest)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


from adapters.errors import EdgetuneError  # noqa: E402
from export.bank import export_bank  # noqa: E402
from export.run import export_run  # noqa: E402


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
    ap.add_argument("--bank", default=None, help="write one bank graph of --adapters into this folder instead")
    ap.add_argument("--adapters", nargs="+", default=[], metavar="[NAME=]DIR",
                    help="with --bank: the adapter folders (RUN/adapter is named RUN)")  # fmt: skip
    args = ap.parse_args(argv)
    if bool(args.bank) != bool(args.adapters):
        ap.error("--bank OUT and --adapters DIR... go together")
    if args.bank:
        return bank_main(args)
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


def bank_main(args) -> int:
    try:
        m = export_bank(Path(args.bank), args.adapters, args.base_model, args.data, args.tolerance)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    p = m["parity"]
    own = p["max_abs_diff_vs_own_export"]
    print(
        f"bank: {args.bank}/model.onnx, {len(m['adapters'])} {m['method']} adapters; parity max |diff| "
        f"{p['max_abs_diff']:.2e} over {p['n_samples']} rows in mixed batches {p['batch_sizes']}, "
        + (f"paths agree {p['paths_agree']:.0%}" if "paths_agree" in p else f"argmax agree {p['argmax_agree']:.0%}")
        + f", weakest adapter effect {p['min_adapter_effect']:.2f}"
        + (f"; vs {p['own_exports_compared']} adapters' own exports max |diff| {own:.2e}" if own is not None else "")
        + f"; fused {m['fused_ops']}"
    )
    if m["prefix_op"]:
        q = m["prefix_op"]
        print(
            f"prefix op: {q['file']}, {q['nodes']} {q['op']} nodes, CPU parity (function body) max |diff| {q['parity']['max_abs_diff']:.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
