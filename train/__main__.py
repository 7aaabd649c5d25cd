"""``python -m train --run runs/NAME [--config FILE] [key=value ...]``: fine-tune and write RUN/adapter."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from train.errors import EdgetuneError  # noqa: E402

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def run(run_dir: Path, config_path: Path | None, overrides: list[str]) -> dict:
    """Train one run and write RUN/adapter, RUN/config.yaml and RUN/metrics.json. Returns the metrics."""
    import numpy as np
    import torch
    from transformers import AutoTokenizer

    from train.adapter_io import CHECKPOINT_METHODS, adapter_tensors, peft_config, save_adapter, save_checkpoint
    from train.config import load_config, save_config
    from train.data import encode, load_dataset
    from train.loop import evaluate, pick_device, train
    from train.model import base_model_path, build_model

    cfg = load_config(config_path, overrides)
    data = load_dataset(cfg)
    base_path = base_model_path(cfg.base_model)
    tok = AutoTokenizer.from_pretrained(base_path)
    enc = {name: encode(getattr(data, name), tok, data.label_names, cfg.max_length) for name in ("train", "dev", "test")}
    np.random.seed(cfg.seed)
    model = build_model(cfg, data.label_names, cfg.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    print(
        f"{cfg.method}: {len(data.train.texts)} train / {len(data.dev.texts)} dev / {len(data.test.texts)} test, "
        f"{len(data.label_names)} labels, {trainable:,} trainable of {total:,} parameters",
        flush=True,
    )
    result = train(model, cfg, enc["train"], enc["dev"], tok.pad_token_id, len(data.label_names))
    test = evaluate(model, enc["test"], tok.pad_token_id, pick_device(cfg), len(data.label_names))
    metrics = {
        "method": cfg.method,
        "dataset": cfg.data,
        "base_model": str(base_path),
        "dev_accuracy": result.dev["accuracy"],
        "test_accuracy": test["accuracy"],
        "test_macro_f1": test["macro_f1"],
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "trainable_params": trainable,
        "total_params": total,
        "seconds_per_epoch": result.seconds_per_epoch,
        "samples_per_second": result.samples_per_second,
        "peak_memory_mb": result.peak_memory_mb,
        "bf16": result.bf16,
        "device": str(pick_device(cfg)),
        "torch_threads": torch.get_num_threads(),
        "history": result.history,
    }
    # Everything goes to a temporary folder first, renamed into place when complete.
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{run_dir.name}.", dir=run_dir.parent))
    try:
        if cfg.method in CHECKPOINT_METHODS:  # no PEFT format for these: a full model folder
            save_checkpoint(tmp / "adapter", model, cfg.method, str(base_path), data.label_names)
        else:
            tensors = adapter_tensors(model, cfg.method)
            save_adapter(tmp / "adapter", peft_config(cfg, model, str(base_path)), tensors, data.label_names)
        save_config(cfg, tmp / "config.yaml")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run_dir.mkdir(exist_ok=True)
        for name in ("adapter", "config.yaml", "metrics.json"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            (tmp / name).replace(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metrics


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__)
    ap.add_argument("--run", default="runs/default", help="run folder to write (default: runs/default)")
    ap.add_argument("--config", default=None, help="YAML config (default: train/configs/default.yaml)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of config keys")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        m = run(Path(args.run), Path(args.config) if args.config else DEFAULT_CONFIG, args.overrides)
    except EdgetuneError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(
        f"{m['method']}: test accuracy {m['test_accuracy']:.4f}, macro F1 {m['test_macro_f1']:.4f}, "
        f"best epoch {m['best_epoch']}, {m['seconds_per_epoch']:.1f} s/epoch, total {time.perf_counter() - t0:.0f} s "
        f"-> {args.run}/adapter"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
