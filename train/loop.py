"""The training loop: length-bucketed batches, AdamW with warm-up and linear decay, bf16 autocast, best-dev epoch."""

from __future__ import annotations

import contextlib
import math
import os
import resource
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from adapters.config import RunConfig
from adapters.crf import decode_tags
from adapters.errors import ConfigError
from adapters.model import adapter_parameters, head_parameters
from adapters.prefix import PrefixModel
from train import dist
from train.data import Encoded, bucketed_batches, collate, eval_batches
from train.graphs import GraphedForward, pad_length
from train.tagging import TagEncoded, collate_words, entity_metrics, full_tags, gather_words


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


# oneDNN ISA levels (ONEDNN_MAX_CPU_ISA) that include native bf16 arithmetic; a lower cap, as `make test-portable` and
# PORTABLE=1 set to stand in for a CPU without it, turns bf16 autocast's auto setting off as that CPU would.
BF16_ISAS = {"AVX512_CORE_BF16", "AVX2_VNNI_2", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16", "AVX10_1_512",
             "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL", "DEFAULT"}  # fmt: skip


def cpu_has_bf16() -> bool:
    """Native bf16 on this CPU (AVX512_BF16 or AMX), unless ONEDNN_MAX_CPU_ISA caps oneDNN below it."""
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if cap and cap not in BF16_ISAS:
        return False
    try:
        flags = open("/proc/cpuinfo").read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def use_bf16(cfg: RunConfig, device: torch.device) -> bool:
    if cfg.bf16 != "auto":
        return cfg.bf16 == "true"
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_bf16()


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, num_labels: int) -> dict[str, float]:
    """Accuracy and macro F1 (averaged over the classes that occur in y_true or y_pred)."""
    acc = float((y_true == y_pred).mean()) if len(y_true) else 0.0
    f1s = []
    for c in range(num_labels):
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return {"accuracy": acc, "macro_f1": float(np.mean(f1s)) if f1s else 0.0}


@torch.inference_mode()
def predict(model: PrefixModel, data: Encoded, pad_id: int, device: torch.device, batch_size: int = 128) -> np.ndarray:
    """Class ids for every example (fp32, eval mode)."""
    model.eval()
    preds = np.empty(len(data.labels), dtype=np.int64)
    for idx in eval_batches([len(r) for r in data.input_ids], batch_size):
        ids, mask = collate([data.input_ids[i] for i in idx], pad_id)
        logits = model(ids.to(device), mask.to(device))
        preds[idx] = logits.argmax(-1).cpu().numpy()
    return preds


@torch.inference_mode()
def predict_tags(
    model: PrefixModel, data: TagEncoded, pad_id: int, device: torch.device, batch_size: int = 64
) -> list[list[int]]:
    """Tag ids of every kept word of every sentence (CRF: Viterbi path; linear head: argmax), fp32, eval mode."""
    model.eval()
    preds: list[list[int]] = [[] for _ in data.input_ids]
    for idx in eval_batches([len(r) for r in data.input_ids], batch_size):
        ids, mask = collate([data.input_ids[i] for i in idx], pad_id)
        word_index, word_mask, _ = collate_words([data.word_index[i] for i in idx])
        emissions = gather_words(model(ids.to(device), mask.to(device)).float(), word_index.to(device))  # (B, W, T)
        tags = decode_tags(model.crf, emissions, word_mask.to(device))
        for row, i in enumerate(idx):
            preds[i] = tags[row, : len(data.word_index[i])].tolist()
    return preds


def evaluate(model, data: Encoded | TagEncoded, pad_id: int, device, label_names: list[str]) -> dict[str, float]:
    """Classification: accuracy, macro F1. Tagging: entity precision / recall / F1 and token accuracy. ``score`` is
    what picks the best epoch (accuracy, or entity F1)."""
    if isinstance(data, TagEncoded):
        pred = predict_tags(model, data, pad_id, device)
        full = [full_tags(p, w, len(g), label_names) for p, w, g in zip(pred, data.words, data.gold, strict=True)]
        m = entity_metrics(data.gold, full)
        return {**m, "accuracy": m["token_accuracy"], "score": m["f1"]}
    m = classification_metrics(np.asarray(data.labels), predict(model, data, pad_id, device), len(label_names))
    return {**m, "score": m["accuracy"]}


def batch_loss(model: PrefixModel, logits: torch.Tensor, target, cfg: RunConfig, class_weight) -> torch.Tensor:
    """Cross-entropy over the classes (or over the words' tags), or the CRF negative log-likelihood."""
    if not isinstance(target, tuple):
        return F.cross_entropy(logits.float(), target, weight=class_weight, label_smoothing=cfg.label_smoothing)
    word_index, word_mask, tags = target
    emissions = gather_words(logits.float(), word_index)  # (B, W, T)
    if model.crf is not None:
        return model.crf.nll(emissions, tags, word_mask)
    return F.cross_entropy(emissions[word_mask], tags[word_mask], weight=class_weight, label_smoothing=cfg.label_smoothing)


def make_optimizer(cfg: RunConfig, groups: list[dict]) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(groups, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def balanced_class_weights(labels: list[int], num_labels: int) -> torch.Tensor:
    """n / (classes * count_c) for each class c; classes absent from train get weight 0."""
    counts = torch.bincount(torch.tensor(labels), minlength=num_labels).float()
    weights = len(labels) / (num_labels * counts.clamp(min=1))
    return torch.where(counts > 0, weights, torch.zeros_like(weights))


@dataclass
class TrainResult:
    best_epoch: int
    dev: dict[str, float]
    history: list[dict]
    seconds_per_epoch: float
    samples_per_second: float
    peak_memory_mb: float
    bf16: bool
    cuda_graph_shapes: list[tuple[int, ...]]  # the (B, S) shapes captured with cuda_graphs=true


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process peak RSS


def train(
    model: PrefixModel, cfg: RunConfig, train_data: Encoded | TagEncoded, dev_data, pad_id: int, label_names: list[str]
) -> TrainResult:
    """Train the adapter and head; leave the model holding the weights of the best dev epoch (accuracy, or entity F1).

    Under torchrun, the processes share every global batch (see train/dist.py).
    """
    device = dist.local_device(pick_device(cfg))
    if cfg.cuda_graphs and (device.type != "cuda" or dist.world_size() > 1):
        why = "torchrun's data parallelism" if device.type == "cuda" else "a CUDA GPU (none was found)"
        raise ConfigError(f"cuda_graphs=true is for one process on a CUDA GPU; this run has {why}")
    dist.setup(device)
    model.to(device)
    net = GraphedForward(model, cfg.batch_size) if cfg.cuda_graphs else dist.wrap(model, device)
    bf16 = use_bf16(cfg, device)
    head, adapter = head_parameters(model), adapter_parameters(model)
    groups = [{"params": adapter, "lr": cfg.lr}, {"params": head, "lr": cfg.head_lr or cfg.lr}]
    opt = make_optimizer(cfg, [g for g in groups if g["params"]])
    tagging = isinstance(train_data, TagEncoded)
    if cfg.class_weights == "balanced":
        flat = [t for row in train_data.labels for t in row] if tagging else train_data.labels
        class_weight = balanced_class_weights(flat, len(label_names)).to(device)
    else:
        class_weight = None
    lengths = [len(r) for r in train_data.input_ids]
    steps_per_epoch = math.ceil(len(lengths) / cfg.batch_size)
    total = cfg.epochs * steps_per_epoch if not cfg.max_steps else min(cfg.max_steps, cfg.epochs * steps_per_epoch)
    warmup = int(cfg.warmup_ratio * total)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total - step) / max(1, total - warmup))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    trainable = [p for p in model.parameters() if p.requires_grad]
    best = (-1.0, 0, None)
    history, step, train_seconds, seen = [], 0, 0.0, 0
    main = dist.is_main()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        t0 = time.perf_counter()
        batches = bucketed_batches(lengths, cfg.batch_size, seed=cfg.seed + epoch)
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="batch", leave=False, mininterval=1.0, disable=not main)
        running = 0.0
        for n, batch in enumerate(bar, 1):
            idx, scale = dist.shard(batch)
            ids, mask = collate([train_data.input_ids[i] for i in idx], pad_id)
            if cfg.cuda_graphs:  # a few shapes, each captured once
                ids, mask = pad_length(ids, mask, pad_id, cfg.max_length)
            if tagging:
                target = tuple(t.to(device) for t in collate_words([train_data.word_index[i] for i in idx],
                                                                  [train_data.labels[i] for i in idx]))  # fmt: skip
            else:
                target = torch.tensor([train_data.labels[i] for i in idx], device=device)
            autocast = (  # a CUDA graph cannot keep autocast's per-step weight cache
                torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=not cfg.cuda_graphs)
                if bf16
                else contextlib.nullcontext()
            )
            with autocast:
                logits = net(ids.to(device), mask.to(device))
            loss = batch_loss(model, logits, target, cfg, class_weight)
            opt.zero_grad(set_to_none=True)
            (loss * scale).backward()
            torch.nn.utils.clip_grad_norm_(trainable, cfg.max_grad_norm)
            opt.step()
            sched.step()
            step += 1
            seen += len(batch)
            running += (loss.item() - running) / min(n, 50)
            bar.set_postfix(loss=f"{running:.4f}", refresh=False)
            if cfg.max_steps and step >= cfg.max_steps:
                break
        train_seconds += time.perf_counter() - t0
        dev = evaluate(model, dev_data, pad_id, device, label_names)
        metric = "entity_f1" if tagging else "accuracy"
        history.append(
            {"epoch": epoch, "train_loss": running, f"dev_{metric}": dev["score"], "seconds": time.perf_counter() - t0}
        )
        if main:
            print(
                f"epoch {epoch}: train loss {running:.4f}  dev {metric} {dev['score']:.4f}  ({history[-1]['seconds']:.0f} s)",
                flush=True,
            )
        if dev["score"] > best[0]:
            state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
            best = (dev["score"], epoch, state, dev)
        if cfg.max_steps and step >= cfg.max_steps:
            break
        if cfg.patience and epoch - best[1] >= cfg.patience:
            if main:
                print(f"early stop: no dev improvement for {cfg.patience} epochs (best: epoch {best[1]})", flush=True)
            break
    _, best_epoch, state, dev = best
    with torch.no_grad():
        params = dict(model.named_parameters())
        for k, v in state.items():
            params[k].copy_(v)
    epochs_run = len(history)
    return TrainResult(
        best_epoch,
        dev,
        history,
        train_seconds / epochs_run,
        seen / max(train_seconds, 1e-9),
        _peak_memory_mb(device),
        bf16,
        list(net.graphs) if isinstance(net, GraphedForward) else [],
    )
