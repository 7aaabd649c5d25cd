"""Train one run: RUN/adapter, RUN/config.yaml, RUN/metrics.json. ``python -m train`` is the command line over
``run``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from transformers import AutoTokenizer

from adapters.config import load_config, save_config
from adapters.methods import method_of
from adapters.model import base_model_path, build_model
from adapters.peft_io import adapter_tensors, peft_config, save_adapter, save_checkpoint, save_crf
from train import dist
from train.data import encode, load_dataset
from train.loop import evaluate, pick_device, train, use_bf16
from train.staging import staging_dir
from train.tagging import encode_tagged, load_tagging_dataset

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "default.yaml"


def run(run_dir: Path, config_path: Path | None, overrides: list[str]) -> dict:
    """Train one run and write RUN/adapter, RUN/config.yaml and RUN/metrics.json. Returns the metrics."""

    asked = load_config(config_path, overrides)  # written to RUN/config.yaml: it reproduces the run on any machine
    cfg = asked.for_precision(use_bf16(asked, pick_device(asked)))
    tagging = cfg.task == "tagging"
    data = load_tagging_dataset(cfg) if tagging else load_dataset(cfg)
    base_path = base_model_path(cfg.base_model)
    tok = AutoTokenizer.from_pretrained(base_path)
    encoder = encode_tagged if tagging else encode
    enc = {name: encoder(getattr(data, name), tok, data.label_names, cfg.max_length) for name in ("train", "dev", "test")}
    np.random.seed(cfg.seed)
    model = build_model(cfg, data.label_names, cfg.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    sizes = [len(x.input_ids) for x in enc.values()]
    main = dist.is_main()
    if main:
        print(
            f"{cfg.method} ({cfg.task}, {cfg.head} head): {sizes[0]} train / {sizes[1]} dev / {sizes[2]} test, "
            f"{len(data.label_names)} labels, {trainable:,} trainable of {total:,} parameters",
            flush=True,
        )
    result = train(model, cfg, enc["train"], enc["dev"], tok.pad_token_id, data.label_names)
    test = evaluate(model, enc["test"], tok.pad_token_id, pick_device(cfg), data.label_names)
    scores = (
        {"dev_accuracy": result.dev["accuracy"], "test_accuracy": test["accuracy"],  # token (word) accuracy
         "dev_entity_f1": result.dev["f1"], "test_entity_f1": test["f1"], "test_entity_precision": test["precision"],
         "test_entity_recall": test["recall"]}
        if tagging
        else {"dev_accuracy": result.dev["accuracy"], "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"]}
    )  # fmt: skip
    metrics = {
        "method": cfg.method,
        "task": cfg.task,
        "head": cfg.head,
        "dataset": cfg.data,
        "base_model": str(base_path),
        **scores,
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "trainable_params": trainable,
        "total_params": total,
        "seconds_per_epoch": result.seconds_per_epoch,
        "samples_per_second": result.samples_per_second,
        "peak_memory_mb": result.peak_memory_mb,
        "bf16": result.bf16,
        "without_bf16_applied": [] if result.bf16 else list(asked.without_bf16),  # the config entries bf16's absence set
        "cuda_graph_shapes": [list(shape) for shape in result.cuda_graph_shapes],  # empty unless cuda_graphs=true
        "device": str(pick_device(cfg)),
        "torch_threads": torch.get_num_threads(),
        "world_size": dist.world_size(),
        "history": result.history,
    }
    if not main:  # rank 0 writes the run folder
        dist.barrier()
        return metrics
    # Everything goes to a staging folder first, renamed into place when complete.
    with staging_dir(run_dir.parent, f".{run_dir.name}.") as tmp:
        if method_of(cfg.method).CHECKPOINT:  # no PEFT format for these: a full model folder
            save_checkpoint(tmp / "adapter", model, cfg.method, str(base_path), data.label_names, cfg.task)
        else:
            tensors = adapter_tensors(model, cfg.method)
            save_adapter(tmp / "adapter", peft_config(cfg, model, str(base_path)), tensors, data.label_names)
        if model.crf is not None:
            save_crf(tmp / "adapter", model.crf)
        save_config(asked, tmp / "config.yaml")
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        run_dir.mkdir(exist_ok=True)
        for name in ("adapter", "config.yaml", "metrics.json"):
            target = run_dir / name
            if target.is_dir():
                shutil.rmtree(target)
            (tmp / name).replace(target)
    dist.barrier()
    return metrics
