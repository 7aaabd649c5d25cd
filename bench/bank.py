"""``python -m bench.bank --out DIR``: many customers' intent classifiers trained, exported and served from one bank.

Cuts BANKING77, CLINC150 and HWU64 into customer intent sets (contiguous chunks of each dataset's sorted intents),
writes each set's rows of the dataset's own train / dev / test splits as TSV files (DIR/SET/data/), trains a
P-tuning v2 adapter per set (DIR/SET/, every one with the same number of virtual tokens), exports each alone
(DIR/SET/export/, fp32 only), and builds one bank graph of all of them (DIR/bank/, through the bank parity gate).
Then every set's whole test split runs through both graphs with onnxruntime on the CPU: the bank on all sets' test
rows shuffled together in batches of 32, each row with its adapter_index, and each set's own export on its own rows.
Writes DIR/bank_accuracy.json (per set: accuracy through its own export and through the bank, rows whose argmax
differs, max |logit diff|; the bank's parity figures; seconds per stage; the CPU) and prints a markdown table.

Finished stages are reused (same config, same adapter), so an interrupted run picks up where it stopped; ``--fresh``
redoes everything.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from adapters.config import load_config, run_config  # noqa: E402
from adapters.errors import EdgetuneError  # noqa: E402
from bank import layout  # noqa: E402
from export.bank import export_bank  # noqa: E402
from export.run import export_run  # noqa: E402
from train.data import Split, load_dataset  # noqa: E402
from train.run import DEFAULT_CONFIG  # noqa: E402
from train.run import run as train_run  # noqa: E402

GROUPS = {"banking77": 4, "clinc150": 4, "hwu64": 3}  # customers cut from each builtin dataset
SPLITS = ("train", "dev", "test")
BATCH = 32  # rows per onnxruntime call in the accuracy runs


@dataclass(frozen=True)
class IntentSet:
    """One customer: a contiguous chunk of a dataset's sorted intents and those intents' rows of each split."""

    name: str
    dataset: str
    labels: list[str]
    splits: dict[str, Split]


def chunks(items: list[str], n: int) -> list[list[str]]:
    """``items`` cut into ``n`` contiguous chunks whose sizes differ by at most one (larger ones first)."""
    size, extra = divmod(len(items), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (i < extra)
        out.append(items[start:end])
        start = end
    return out


def intent_sets(groups: dict[str, int] = GROUPS) -> list[IntentSet]:
    """The customer intent sets: each builtin dataset's sorted labels in ``groups[name]`` chunks, named NAME-a,
    NAME-b, ..., each with only its intents' rows of the dataset's train, dev and test splits."""
    out = []
    for dataset, n in groups.items():
        data = load_dataset(load_config(None, [f"data={dataset}"]))
        for i, labels in enumerate(chunks(data.label_names, n)):
            keep = set(labels)
            splits = {}
            for s in SPLITS:
                split = getattr(data, s)
                rows = [(t, y) for t, y in zip(split.texts, split.labels, strict=True) if y in keep]
                splits[s] = Split([t for t, _ in rows], [y for _, y in rows])
            out.append(IntentSet(f"{dataset}-{chr(ord('a') + i)}", dataset, labels, splits))
    return out


def write_tsv(path: Path, split: Split) -> None:
    """A text<TAB>label file with a header, quoted as train.data.read_rows reads it (csv's excel dialect: a field
    holding a tab, quote or newline is quoted, its quotes doubled)."""
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(["text", "label"])
        w.writerows(zip(split.texts, split.labels, strict=True))


def write_set(folder: Path, s: IntentSet) -> dict[str, Path]:
    """The set's train.tsv, dev.tsv and test.tsv in ``folder``; returns split -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in SPLITS:
        paths[split] = folder / f"{split}.tsv"
        write_tsv(paths[split], s.splits[split])
    return paths


def train_overrides(paths: dict[str, Path], epochs: int, samples: int) -> list[str]:
    return [f"data={paths['train'].resolve()}", f"dev_data={paths['dev'].resolve()}", f"test_data={paths['test'].resolve()}",
            f"epochs={epochs}", f"max_train_samples={samples}"]  # fmt: skip


def trained(run: Path, overrides: list[str]) -> bool:
    return (
        (run / "metrics.json").is_file()
        and (run / "config.yaml").is_file()
        and (load_config(run / "config.yaml") == load_config(DEFAULT_CONFIG, overrides))
    )


def adapter_sha(run: Path) -> str:
    return layout.sha256_of(run / "adapter" / layout.PEFT_WEIGHTS)


def exported(run: Path) -> bool:
    manifest = run / "export" / "manifest.json"
    return manifest.is_file() and json.loads(manifest.read_text())["adapter_sha256"] == adapter_sha(run)


def banked(out: Path, runs: list[Path]) -> bool:
    """``out`` holds a bank of exactly these adapters, as they are now, in this order."""
    if not (out / "manifest.json").is_file() or not (out / layout.ADAPTERS).is_file():
        return False
    entries = json.loads((out / layout.ADAPTERS).read_text())
    return [(e["name"], e["sha256"]) for e in entries] == [(r.name, adapter_sha(r)) for r in runs]


def cpu() -> dict:
    """This machine's CPU as lscpu names it, and whether it has AVX-512 (avx512f) and native bf16."""
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        info = ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("Flags", "").split())
    return {
        "model_name": fields.get("Model name", "unknown"),
        "cores": os.cpu_count(),
        "avx512f": "avx512f" in flags,
        "avx512_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
    }


def run_graph(session, tok, texts: list[str], max_length: int, feeds: dict | None = None, index=None) -> np.ndarray:
    """Logits of ``texts`` in batches of BATCH, each batch padded to its longest row; ``feeds`` (the bank tensors) and
    ``index`` (each row's adapter slot) for a bank graph."""
    out = []
    for start in range(0, len(texts), BATCH):
        enc = tok(texts[start : start + BATCH], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        inputs = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        if index is not None:
            inputs.update(feeds, adapter_index=np.asarray(index[start : start + BATCH], np.int64))
        out.append(session.run(["logits"], inputs)[0])
    return np.concatenate(out)


def session_of(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def accuracy(bank_dir: Path, runs: list[Path], seed: int = 0) -> list[dict]:
    """Each run's whole test split through its own export and through the bank (all runs' test rows shuffled together,
    so batches mix adapters); one row of figures per run, in slot order."""
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    _, entries, tensors = layout.read(bank_dir, layout.Spec.from_dict(manifest["spec"]))
    if [e.name for e in entries] != [r.name for r in runs]:
        raise EdgetuneError(f"{bank_dir} holds {[e.name for e in entries]}, not the runs {[r.name for r in runs]}")
    tests, owns, trained_on = [], [], []
    for run, entry in zip(runs, entries, strict=True):
        cfg = run_config(run)
        data = load_dataset(cfg)  # the rows the run trained and was tested on (max_train_samples applied)
        test = data.test
        trained_on.append(len(data.train.texts))
        labels = json.loads((run / "export" / "labels.json").read_text())
        if labels != entry.labels:
            raise EdgetuneError(f"{run}/export/labels.json differs from the bank's labels for {entry.name}")
        tests.append(test)
        tok = AutoTokenizer.from_pretrained(run / "export")
        owns.append(run_graph(session_of(run / "export" / "model.onnx"), tok, test.texts, cfg.max_length))
    rows = [(slot, i) for slot, test in enumerate(tests) for i in range(len(test.texts))]
    random.Random(seed).shuffle(rows)
    tok = AutoTokenizer.from_pretrained(bank_dir)
    texts = [tests[slot].texts[i] for slot, i in rows]
    mixed = run_graph(session_of(bank_dir / "model.onnx"), tok, texts, manifest["max_length"], tensors, [s for s, _ in rows])
    via_bank = [np.zeros_like(own) for own in owns]
    for (slot, i), logits in zip(rows, mixed, strict=True):
        via_bank[slot][i] = logits[: len(entries[slot].labels)]  # the bank's logits are padded to its largest label set
    out = []
    for run, entry, test, own, bank, train_rows in zip(runs, entries, tests, owns, via_bank, trained_on, strict=True):
        gold = np.asarray([entry.labels.index(y) for y in test.labels])
        metrics = json.loads((run / "metrics.json").read_text())
        out.append({
            "name": entry.name,
            "labels": len(entry.labels),
            "train_rows": train_rows,
            "test_rows": len(gold),
            "accuracy_eager": metrics["test_accuracy"],
            "accuracy_own_export": float((own.argmax(1) == gold).mean()),
            "accuracy_bank": float((bank.argmax(1) == gold).mean()),
            "argmax_differs": int((own.argmax(1) != bank.argmax(1)).sum()),
            "max_abs_logit_diff": float(np.abs(own - bank).max()),
            "train_seconds": sum(h["seconds"] for h in metrics["history"]),
            "epochs": metrics["epochs_run"],
        })  # fmt: skip
    return out


def table(result: dict) -> str:
    c, p = result["cpu"], result["bank"]["parity"]
    lines = [
        "# One bank, many customers: accuracy through the bank vs each adapter's own export",
        "",
        f"CPU: {c['model_name']} ({c['cores']} cores; avx512f {'yes' if c['avx512f'] else 'no'}, bf16 "
        f"{'yes' if c['avx512_bf16'] else 'no'}). P-tuning v2, {result['config']['num_virtual_tokens']} virtual tokens, "
        f"{result['config']['epochs']} epochs on at most {result['config']['max_train_samples']} train rows per set "
        f"(torch threads: {result['config']['torch_threads']}). "
        f"Bank: {len(result['sets'])} adapters in one graph; its gate: max |diff| vs eager {p['max_abs_diff']:.2e}, vs own "
        f"exports {p['max_abs_diff_vs_own_export']:.2e} (tolerance {p['tolerance']:.1e}, {p['n_samples']} dev rows). "
        f"Whole test splits, onnxruntime CPU fp32; the bank on every set's test rows shuffled together, batch {BATCH}.",
        "",
        "| set | labels | train rows | test rows | eager | own export | via bank | argmax differs | max abs logit diff |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in [*result["sets"], result["overall"]]:
        lines.append(
            f"| {r['name']} | {r['labels']} | {r['train_rows']:,} | {r['test_rows']:,} | {100 * r['accuracy_eager']:.2f}% | "
            f"{100 * r['accuracy_own_export']:.2f}% | {100 * r['accuracy_bank']:.2f}% | {r['argmax_differs']} | "
            f"{r['max_abs_logit_diff']:.2e} |"
        )
    s = result["seconds"]
    again = f" (reused from an earlier run: {', '.join(result['reused'])})" if result["reused"] else ""
    lines += ["", "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in s.items()) + again]
    return "\n".join(lines) + "\n"


def overall(sets: list[dict]) -> dict:
    """The sets' figures over all their test rows together."""
    n = sum(r["test_rows"] for r in sets)

    def mean(key):
        return sum(r[key] * r["test_rows"] for r in sets) / n

    return {"name": "all", "labels": sum(r["labels"] for r in sets), "train_rows": sum(r["train_rows"] for r in sets),
            "test_rows": n, "accuracy_eager": mean("accuracy_eager"), "accuracy_own_export": mean("accuracy_own_export"),
            "accuracy_bank": mean("accuracy_bank"), "argmax_differs": sum(r["argmax_differs"] for r in sets),
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in sets)}  # fmt: skip


def bench_bank(out: Path, epochs: int, samples: int, fresh: bool = False) -> dict:
    """Every stage (reusing finished ones unless ``fresh``); returns what bank_accuracy.json holds."""
    seconds, reused = {}, []  # reused: the stages that found every output already there
    t = time.perf_counter()
    sets = intent_sets()
    runs, overrides = [], {}
    for s in sets:
        run = out / s.name
        overrides[s.name] = train_overrides(write_set(run / "data", s), epochs, samples)
        runs.append(run)
    seconds["data"] = time.perf_counter() - t
    print(f"== {len(sets)} intent sets: " + ", ".join(f"{s.name} ({len(s.labels)})" for s in sets), flush=True)

    t = time.perf_counter()
    todo = [run for run in runs if fresh or not trained(run, overrides[run.name])]
    for run in todo:
        print(f"== {run.name}: train", flush=True)
        train_run(run, DEFAULT_CONFIG, overrides[run.name])
    seconds["train"] = time.perf_counter() - t
    reused += [] if todo else ["train"]

    t = time.perf_counter()
    todo = [run for run in runs if fresh or not exported(run)]
    for run in todo:
        print(f"== {run.name}: export", flush=True)
        m = export_run(run, int8=False, fp16=False, triton=False)
        print(f"   parity max |diff| {m['parity']['max_abs_diff']:.2e}", flush=True)
    seconds["export"] = time.perf_counter() - t
    reused += [] if todo else ["export"]

    t = time.perf_counter()
    bank_dir = out / "bank"
    if fresh or not banked(bank_dir, runs):
        print(f"== bank of {len(runs)} adapters", flush=True)
        export_bank(bank_dir, [f"{r.name}={r / 'adapter'}" for r in runs])
    else:
        reused.append("bank")
    manifest = json.loads((bank_dir / "manifest.json").read_text())
    seconds["bank"] = time.perf_counter() - t

    t = time.perf_counter()
    print("== accuracy: own exports and the bank on every test row", flush=True)
    rows = accuracy(bank_dir, runs)
    seconds["accuracy"] = time.perf_counter() - t
    seconds["total"] = sum(seconds.values())
    return {
        "cpu": cpu(),
        "config": {
            "method": "p_tuning_v2",
            "num_virtual_tokens": manifest["num_virtual_tokens"],
            "epochs": epochs,
            "max_train_samples": samples,
            "batch": BATCH,
            "torch_threads": torch.get_num_threads(),
            "onnxruntime_version": ort.__version__,
        },
        "bank": {k: manifest[k] for k in ("method", "adapters", "fused_ops", "parity", "export_seconds")}
        | {"model_mb": (bank_dir / "model.onnx").stat().st_size / 2**20},
        "sets": rows,
        "overall": overall(rows),
        "seconds": seconds,
        "reused": reused,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.bank", description=__doc__)
    ap.add_argument("--out", default="runs/bank", help="folder for the sets' runs, the bank and the report (default: runs/bank)")
    ap.add_argument("--epochs", type=int, default=3, help="training epochs per set (default 3)")
    ap.add_argument("--samples", type=int, default=2500, help="at most this many train rows per set (default 2500; 0 = all)")
    ap.add_argument("--fresh", action="store_true", help="retrain, re-export and rebuild everything")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        result = bench_bank(out, args.epochs, args.samples, args.fresh)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    (out / "bank_accuracy.json").write_text(json.dumps(result, indent=2))
    print(table(result))
    print(f"wrote {out}/bank_accuracy.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
