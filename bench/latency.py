"""``make bench``'s measurements: the eager adapter model against the ONNX export on the same token ids.
``python -m bench`` is the command line over ``bench_run``."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from adapters.crf import decode_tags
from adapters.eager import load_adapter_model
from adapters.errors import EdgetuneError
from bench.timing import cpu_name, gpu_name, pct, timed
from serve.runtime import pick_providers
from text.words import first_pieces, word_index
from train.splits import dev_split, parity_texts
from train.staging import staging_dir
from train.tagging import gather_words

BATCHES = (1, 8, 32)


def make_inputs(tok, texts: list[str], batch: int, kind: str, max_length: int, tagging: bool = False, full: int = 128) -> dict:
    """Graph inputs (numpy): input_ids and attention_mask, and for a tagger word_index / word_mask (texts split into
    words on whitespace, as the server does). ``seq128`` rows hold ``full`` real tokens (128, or the model's limit)."""
    if kind == "seq128":
        words = " ".join(texts).split()
        rows = [words[b * 40 : b * 40 + 400] for b in range(batch)]  # different 128-token windows of real text
        enc = tok(rows, is_split_into_words=True, truncation=True, max_length=full, padding="max_length")
    else:
        enc = tok(
            [t.split() for t in texts[:batch]], is_split_into_words=True, padding=True, truncation=True, max_length=max_length
        )
    feeds = {
        "input_ids": np.asarray(enc["input_ids"], dtype=np.int64),
        "attention_mask": np.asarray(enc["attention_mask"], dtype=np.int64),
    }
    if tagging:
        pos = [first_pieces(enc.word_ids(i))[0] for i in range(len(enc["input_ids"]))]
        feeds["word_index"], feeds["word_mask"] = word_index(pos)
    return feeds


def torch_runner(model, device):
    """fn(feeds) -> fn() running ``model(**feeds)`` (ours, or PEFT's model called by keyword) on the device."""

    def bind(feeds):
        tensors = {k: torch.from_numpy(v).to(device) for k, v in feeds.items()}

        def run():
            with torch.inference_mode():
                model(**tensors)
            if device.type == "cuda":
                torch.cuda.synchronize()

        return run

    return bind


def eager_tagger(model):
    """The eager tagger end to end, as the graph: emissions at the words' first pieces, then the CRF decode (or argmax)."""

    def run(input_ids, attention_mask, word_index, word_mask):
        return decode_tags(model.crf, gather_words(model(input_ids, attention_mask).float(), word_index), word_mask.bool())

    return run


def onnx_runner(session):
    names = {i.name for i in session.get_inputs()}
    output = session.get_outputs()[-1].name  # logits, or a tagger's tags (emissions when the graph does not decode)

    def bind(feeds):
        mine = {k: v for k, v in feeds.items() if k in names}
        return lambda: session.run([output], mine)

    return bind


def implementations(run_dir: Path, manifest: dict, device, cuda: bool, with_peft: bool):
    """(name, factory) pairs; each factory builds its model or session only when its turn comes."""
    export_dir = run_dir / "export"
    providers = pick_providers("cuda" if cuda else "cpu")  # as served: TF32 off, see serve/runtime.py

    def ours():
        model = load_adapter_model(run_dir / "adapter", manifest["base_model"]).to(device).eval()
        return torch_runner(eager_tagger(model) if tagging else model, device)

    def peft():
        base = AutoModelForSequenceClassification.from_pretrained(manifest["base_model"], num_labels=manifest["num_labels"])
        model = PeftModel.from_pretrained(base, str(run_dir / "adapter")).to(device).eval()
        return torch_runner(
            lambda input_ids, attention_mask: model(input_ids=input_ids, attention_mask=attention_mask).logits, device
        )

    def session(name):
        def make():
            opts = ort.SessionOptions()
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(str(export_dir / name), opts, providers=providers)
            want = "CUDAExecutionProvider" if cuda else "CPUExecutionProvider"
            if sess.get_providers()[0] != want:  # onnxruntime falls back to CPU with only a warning
                raise EdgetuneError(f"onnxruntime could not start {want} (got {sess.get_providers()})")
            return onnx_runner(sess)

        return make

    tagging = manifest.get("task") == "token-classification"
    out = [("eager", ours)]
    if with_peft and manifest["method"] in ("lora", "p_tuning_v2") and not tagging:  # PEFT has no full/head-only/CRF form
        out.append(("peft", peft))
    out.append(("onnx", session("model.onnx")))
    if not cuda and (export_dir / "model.int8.onnx").is_file():  # int8 is the CPU graph
        out.append(("int8", session("model.int8.onnx")))
    return out


def bench_run(run_dir: Path, budget_s: float = 1.5, batches=BATCHES, with_peft: bool = True, rounds: int = 3) -> dict:
    """Time every implementation on the same inputs, in ``rounds`` interleaved rounds of ``budget_s / rounds`` per
    cell and implementation. ``timed`` pauses before each block so the previous runner's threads go idle first."""
    export_dir = run_dir / "export"
    if not (export_dir / "model.onnx").is_file():
        raise EdgetuneError(f"{export_dir}/model.onnx is missing (run `make export RUN={run_dir}` first)")
    manifest = json.loads((export_dir / "manifest.json").read_text())
    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    if cuda and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA/cuDNN libraries of the nvidia-* wheels
    device = torch.device("cuda" if cuda else "cpu")
    tok = AutoTokenizer.from_pretrained(export_dir)
    tagging = manifest.get("task") == "token-classification"
    if tagging:
        texts = [" ".join(words) for words in dev_split(run_dir).tokens][:256]
    else:
        texts = parity_texts(run_dir, n=256)
    cells = [
        (kind, b, make_inputs(tok, texts, b, kind, manifest["max_length"], tagging, min(128, manifest["max_positions"])))
        for kind in ("seq128", "dev")
        for b in batches
    ]
    bound = {name: factory() for name, factory in implementations(run_dir, manifest, device, cuda, with_peft)}
    runners = {name: [bind(feeds) for _, _, feeds in cells] for name, bind in bound.items()}
    times: dict[str, list[list[float]]] = {name: [[] for _ in cells] for name in runners}
    for _ in range(rounds):  # interleaved, so that a slow spell of a shared machine hits every implementation alike
        for i in range(len(cells)):
            for name, fns in runners.items():
                times[name][i] += timed(fns[i], budget_s / rounds, min_iters=max(3, 10 // rounds))
    rows = []
    for i, (kind, b, feeds) in enumerate(cells):
        row = {"inputs": kind, "batch": b, "seq_len": int(feeds["input_ids"].shape[1])}
        for name in times:
            t = times[name][i]
            row[f"{name}_p50_ms"] = statistics.median(t)
            row[f"{name}_p95_ms"] = pct(t, 0.95)
            row[f"{name}_samples_per_s"] = b / row[f"{name}_p50_ms"] * 1e3
            if name != "eager":
                row[f"ratio_eager_over_{name}"] = row["eager_p50_ms"] / row[f"{name}_p50_ms"]
        rows.append(row)
        print(format_row(row), flush=True)
    return {
        "method": manifest["method"],
        "task": manifest.get("task", "sequence-classification"),
        "device": gpu_name() if cuda else cpu_name(),
        "provider": "CUDAExecutionProvider" if cuda else "CPUExecutionProvider",
        "baseline": "eager: our PyTorch adapter model as trained (SDPA attention, adapter unmerged); "
        "peft: peft.PeftModel on the same adapter; ratios are eager p50 / other p50",
        "torch_threads": torch.get_num_threads(),
        "onnxruntime": ort.__version__,
        "torch": torch.__version__,
        "rows": rows,
    }


HEADER = (
    f"{'inputs':7} {'batch':>5} {'seq':>4} | {'eager p50':>9} {'p95':>7} | {'peft p50':>8} | {'onnx p50':>8} {'p95':>7} {'ratio':>6} | "
    f"{'int8 p50':>8} {'p95':>7} {'ratio':>6} | {'best/s':>7}"
)


def format_row(r: dict) -> str:
    def cell(name: str, with_p95: bool = True, ratio: bool = True) -> str:
        if f"{name}_p50_ms" not in r:
            return f"{'-':>8} " + (f"{'-':>7} " if with_p95 else "") + (f"{'-':>6} " if ratio else "") + "| "
        out = f"{r[f'{name}_p50_ms']:8.2f} " + (f"{r[f'{name}_p95_ms']:7.2f} " if with_p95 else "")
        return out + (f"{r[f'ratio_eager_over_{name}']:5.2f}x " if ratio else "") + "| "

    s = f"{r['inputs']:7} {r['batch']:>5} {r['seq_len']:>4} | {r['eager_p50_ms']:9.2f} {r['eager_p95_ms']:7.2f} | "
    s += cell("peft", False, False) + cell("onnx") + cell("int8")
    best = max(v for k, v in r.items() if k.endswith("_samples_per_s"))
    return s + f"{best:7.0f}"


def plot(result: dict, path: Path) -> None:
    # optional: matplotlib is the [bench] extra; bench.prefix_op imports this module and never plots
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")

    rows = result["rows"]
    labels = [f"{r['inputs']}\nb{r['batch']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.bar([i - 0.2 for i in x], [r["eager_p50_ms"] for r in rows], 0.4, label="eager PyTorch (p50)")
    ax.bar([i + 0.2 for i in x], [r["onnx_p50_ms"] for r in rows], 0.4, label="ONNX Runtime (p50)")
    for i, r in enumerate(rows):
        ax.annotate(
            f"{r['ratio_eager_over_onnx']:.1f}x",
            (i, max(r["eager_p50_ms"], r["onnx_p50_ms"])),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(list(x), labels)
    ax.set_yscale("log")
    ax.set_ylabel("latency per batch (ms, log)")
    ax.set_title(f"{result['method']}: eager vs ONNX Runtime on {result['device']}", fontsize=10)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save(run_dir: Path, result: dict) -> None:
    """RUN/bench/bench.json and latency.png, written to a temporary folder and renamed into place."""
    with staging_dir(run_dir, ".bench.") as tmp:
        (tmp / "bench.json").write_text(json.dumps(result, indent=2))
        plot(result, tmp / "latency.png")
        tmp.chmod(0o755)
        shutil.rmtree(run_dir / "bench", ignore_errors=True)
        tmp.rename(run_dir / "bench")
