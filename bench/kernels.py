"""``python -m bench.kernels --out FILE.json``: the Triton prefix-attention kernel against its baselines, on a GPU.

Attention alone (default: fp16, batch 32, 12 heads, sequence 128 with right padding, prefix 16, head dims 32 and 64),
forward and forward+backward, median ms per call two ways: launched one call at a time from Python (CUDA events,
launch gaps included) and replayed from a CUDA graph of 20 calls (the GPU time alone: the kernel comparison); and
achieved TFLOP/s (graph time):
  triton_prefix      kernels.op.prefix_attn (the torch custom op): prefix and sequence read in one pass
  triton_launchers   the same kernels launched directly (kernels/prefix_attention.py), without the torch op around them
  triton_no_prefix   kernels.op.prefix_attn without a prefix (P = 0): what the prefix itself costs
  sdpa_concat_mask   SDPA over concat(prefix, keys) with the extended (B, 1, 1, P+S) mask: the PEFT path (named baseline)
  sdpa_seq_mask      SDPA over the sequence alone with its padding mask (no prefix)
  sdpa_seq_nomask    SDPA over the sequence alone, no mask (no prefix): the launch floor
  triton_dropout     triton_prefix with attention dropout 0.1 (training), against
  sdpa_concat_dropout  sdpa_concat_mask with dropout 0.1 (its speed-up column is against this row)
Then one P-tuning v2 training step (forward, loss, backward, AdamW) of a MiniLM-shaped PrefixModel from train/ (random
weights, bf16 autocast as train/loop.py) with the kernel against the SDPA concat path, with attention dropout (as in
training) and without, launched from Python and replayed from a CUDA graph, at each of --train-batches x sequence.
``--seqs`` adds a sweep over sequence lengths at a constant token count (batch x sequence as the defaults'): the kernel,
the concatenation and SDPA without a prefix, CUDA-graph time and achieved TFLOP/s, forward and forward+backward.
``--sweep`` adds the forward kernel's time (CUDA graph) for other (BLOCK_M, BLOCK_N, num_warps, num_stages, BLOCK_P)
than `forward_config` picks; ``--profile-step`` prints torch.profiler's tables of the training step instead.
``--report FILE.json`` reprints a saved report without a GPU, and ``--plot FILE.png`` draws its sequence sweep
(achieved TFLOP/s against sequence length; needs matplotlib).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import AttentionInterface, BertConfig, BertForSequenceClassification

from adapters.prefix import ATTN_SDPA, PrefixEncoder, PrefixModel, prefix_attention, register_attention, sdpa_concat_attention
from kernels import prefix_attention as tk
from kernels.op import prefix_attn

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median over `iters` calls of the CUDA-event time of fn()."""
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
    for start, end in events:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def graph_ms(fn: Callable[[], object], calls: int = 20, replays: int = 30) -> float:
    """Median over `replays` of one CUDA-graph replay of `calls` captured calls of fn(), per call: GPU time without
    Python's launch overhead."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture (compiles, allocator pools)
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    return median_ms(graph.replay, 3, replays) / calls


def _timings(fn: Callable[[], object], args: argparse.Namespace, calls: int = 20) -> tuple[float, float | str]:
    """(eager-launch ms, graph ms or the capture's error)."""
    eager = median_ms(fn, args.warmup, args.iters)
    try:
        return eager, graph_ms(fn, calls)
    except Exception as e:  # noqa: BLE001 - recorded in the report, the other rows still run
        return eager, f"{type(e).__name__}: {e}"[:300]


def _sdpa_concat(q, k, v, pk, pv, keep, dropout_p=0.0):
    b = q.shape[0]
    k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)  # (B, N, P+S, D)
    v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)


def attention_variants(b: int, n: int, s: int, p: int, d: int, dtype: torch.dtype) -> dict[str, tuple[Callable, Callable, int]]:
    """name -> (forward, forward+backward, key count per query) on one seeded, right-padded batch."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, generator=g).requires_grad_()

    q, k, v = rand(b, n, s, d), rand(b, n, s, d), rand(b, n, s, d)
    pk, pv = rand(1, n, p, d), rand(1, n, p, d)
    grad = torch.randn(b, n, s, d, device="cuda", dtype=dtype, generator=g)
    lengths = torch.randint(s // 2, s + 1, (b,), device="cuda", generator=g, dtype=torch.int32)
    lengths[0] = s
    keep_seq = (torch.arange(s, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]  # (B, 1, 1, S)
    keep = torch.cat([keep_seq.new_ones(b, 1, 1, p), keep_seq], dim=-1)  # (B, 1, 1, P+S)

    def autograd_pair(fn, inputs):
        return fn, lambda: torch.autograd.grad(fn(), inputs, grad)

    def launchers():  # the kernels without the torch op around them
        out, lse = tk.forward(q, k, v, pk, pv, lengths, False, d**-0.5)
        return tk.backward(grad, q, k, v, pk, pv, lengths, out, lse, False, d**-0.5)

    return {
        "triton_prefix": (*autograd_pair(lambda: prefix_attn(q, k, v, pk, pv, lengths), [q, k, v, pk, pv]), p + s),
        "triton_launchers": (lambda: tk.forward(q, k, v, pk, pv, lengths, False, d**-0.5), launchers, p + s),
        "triton_no_prefix": (*autograd_pair(lambda: prefix_attn(q, k, v, None, None, lengths), [q, k, v]), s),
        "sdpa_concat_mask": (*autograd_pair(lambda: _sdpa_concat(q, k, v, pk, pv, keep), [q, k, v, pk, pv]), p + s),
        "sdpa_seq_mask": (*autograd_pair(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep_seq), [q, k, v]), s),
        "sdpa_seq_nomask": (*autograd_pair(lambda: F.scaled_dot_product_attention(q, k, v), [q, k, v]), s),
        "triton_dropout": (
            *autograd_pair(lambda: prefix_attn(q, k, v, pk, pv, lengths, dropout_p=0.1), [q, k, v, pk, pv]),
            p + s,
        ),
        "sdpa_concat_dropout": (*autograd_pair(lambda: _sdpa_concat(q, k, v, pk, pv, keep, 0.1), [q, k, v, pk, pv]), p + s),
    }


BASELINE = {"triton_dropout": "sdpa_concat_dropout", "sdpa_concat_dropout": "sdpa_concat_dropout"}  # else sdpa_concat_mask


def _tflops(row: dict, flops: float) -> dict:
    """Add achieved TFLOP/s (from the graph times) to a row: 4 * B * N * S * keys * D forward (two matmuls; the
    backward does 2.5x the forward's)."""
    for key, factor in (("fwd", 1.0), ("fwd_bwd", 3.5)):
        if isinstance(row.get(f"{key}_graph_ms"), float):
            row[f"{key}_tflops"] = factor * flops / row[f"{key}_graph_ms"] / 1e9
    return row


def _speedups(rows: dict, keys: tuple[str, ...]) -> dict:
    """Add each row's speed-up over its baseline (BASELINE, else SDPA over the concatenation) for every time in keys."""
    for name, r in rows.items():
        base = rows[BASELINE.get(name, "sdpa_concat_mask")]
        for key in keys:
            if isinstance(r.get(key), float) and isinstance(base.get(key), float):
                r[key.replace("_ms", "_speedup_vs_concat")] = base[key] / r[key]
    return rows


def bench_attention(args: argparse.Namespace, d: int) -> dict:
    b, n, s, p = args.batch, args.heads, args.seq, args.prefix
    rows = {}
    for name, (fwd, fwd_bwd, keys) in attention_variants(b, n, s, p, d, DTYPES[args.dtype]).items():
        with torch.no_grad():
            fwd_ms, fwd_graph = _timings(fwd, args)
        both_ms, both_graph = _timings(fwd_bwd, args)
        row = {"fwd_ms": fwd_ms, "fwd_bwd_ms": both_ms, "fwd_graph_ms": fwd_graph, "fwd_bwd_graph_ms": both_graph}
        rows[name] = _tflops(row, 4 * b * n * s * keys * d)
    return _speedups(rows, ("fwd_ms", "fwd_bwd_ms", "fwd_graph_ms", "fwd_bwd_graph_ms"))


SEQ_SWEEP = ("triton_prefix", "sdpa_concat_mask", "sdpa_seq_mask", "sdpa_seq_nomask")


def sweep_sequence(args: argparse.Namespace, d: int) -> list[dict]:
    """For each of args.seqs: batch = args.batch * args.seq // seq (the same token count), the SEQ_SWEEP variants'
    CUDA-graph ms and TFLOP/s, forward and forward+backward, with speed-ups over the concatenation."""
    n, p = args.heads, args.prefix
    points = []
    for s in args.seqs:
        b = max(1, args.batch * args.seq // s)
        variants = attention_variants(b, n, s, p, d, DTYPES[args.dtype])
        rows = {}
        for name in SEQ_SWEEP:
            fwd, fwd_bwd, keys = variants[name]
            row = {}
            for key, fn in (("fwd_graph_ms", fwd), ("fwd_bwd_graph_ms", fwd_bwd)):
                try:
                    with torch.no_grad() if key == "fwd_graph_ms" else contextlib.nullcontext():
                        row[key] = graph_ms(fn)
                except Exception as e:  # noqa: BLE001 - recorded, the other points still run
                    row[key] = f"{type(e).__name__}: {e}"[:300]
            rows[name] = _tflops(row, 4 * b * n * s * keys * d)
        points.append({"seq": s, "batch": b, "rows": _speedups(rows, ("fwd_graph_ms", "fwd_bwd_graph_ms"))})
        del variants
        torch.cuda.empty_cache()
    return points


SWEEP = [(bm, bn, w, st, bp) for bm, bn, w in ((32, 32, 4), (64, 16, 4), (64, 32, 4), (64, 64, 4), (128, 32, 4), (128, 32, 8),
                                               (128, 64, 8)) for st in (2, 3) for bp in sorted({0, 16, bn})]  # fmt: skip


def sweep_forward(args: argparse.Namespace, d: int) -> dict:
    """Forward graph ms of `prefix_attn_fwd` per (BLOCK_M, BLOCK_N, num_warps, num_stages, BLOCK_P) on the bench's
    shape; --sweep-shard I/N takes every N-th configuration from the I-th (to compile them in parallel processes)."""
    b, n, s, p = args.batch, args.heads, args.seq, args.prefix
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, n, s, d, device="cuda", dtype=DTYPES[args.dtype], generator=g) for _ in range(3))
    pk, pv = (torch.randn(1, n, p, d, device="cuda", dtype=DTYPES[args.dtype], generator=g) for _ in range(2))
    lengths = torch.randint(s // 2, s + 1, (b,), device="cuda", generator=g, dtype=torch.int32)
    ref, _ = tk.forward(q, k, v, pk, pv, lengths, False, d**-0.5)
    rows = {}
    shard, shards = map(int, args.sweep_shard.split("/"))
    for cfg in SWEEP[shard::shards]:
        name = "bm{}_bn{}_w{}_s{}_bp{}".format(*cfg)
        try:
            fn = functools.partial(tk.forward, q, k, v, pk, pv, lengths, False, d**-0.5, config=cfg[:4], block_p=cfg[4])
            err = (fn()[0].float() - ref.float()).abs().max().item()
            rows[name] = {"fwd_graph_ms": graph_ms(fn), "max_abs_diff_vs_default": err}
        except Exception as e:  # noqa: BLE001 - a config that does not compile or fit is recorded and skipped
            rows[name] = {"error": f"{type(e).__name__}: {e}"[:300]}
    return rows


def attention_functions() -> tuple[tuple[str, Callable], ...]:
    """The training step's attention functions by name: the kernel, and SDPA over the concatenation (PEFT's way)."""
    return ("triton_prefix", prefix_attention), ("sdpa_concat_mask", sdpa_concat_attention)


def training_step(args: argparse.Namespace, batch: int) -> tuple[torch.nn.Module, Callable[[], None]]:
    """(model, step): one P-tuning v2 optimiser step of a MiniLM-shaped classifier (6 layers, hidden 384, 12 heads,
    D 32) on a seeded, right-padded batch x args.seq; the attention is whatever function is registered under
    train.prefix.ATTN_SDPA. CUDA-graph safe: capturable AdamW, no autocast weight cache."""
    cfg = BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=77,
                     max_position_embeddings=512, attn_implementation=ATTN_SDPA)  # fmt: skip
    torch.manual_seed(0)
    base = BertForSequenceClassification(cfg).cuda().train()
    for prm in base.base_model.parameters():
        prm.requires_grad_(False)
    prefix = PrefixEncoder(args.prefix, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.hidden_size).cuda()
    model = PrefixModel(base, prefix, cfg.num_attention_heads)
    opt = torch.optim.AdamW([prm for prm in model.parameters() if prm.requires_grad], lr=1e-3, capturable=True)
    ids = torch.randint(1000, cfg.vocab_size, (batch, args.seq), device="cuda")
    mask = (
        torch.arange(args.seq, device="cuda")[None, :] < torch.randint(args.seq // 2, args.seq + 1, (batch, 1), device="cuda")
    ).long()
    labels = torch.randint(0, cfg.num_labels, (batch,), device="cuda")

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
            loss = F.cross_entropy(model(ids, mask), labels)
        loss.backward()
        opt.step()

    return model, step


def bench_training_step(args: argparse.Namespace, batch: int) -> dict:
    """ms per training step (`training_step`) with each of `attention_functions`, with attention (and hidden) dropout
    as in training and without (eval mode), launched from Python and replayed from a CUDA graph (GPU time; both paths
    draw their dropout on the device, so every replay drops afresh). Interleaved rounds, the faster of two kept."""
    register_attention()
    model, step = training_step(args, batch)
    result = {"batch": batch, "seq": args.seq}
    for _ in range(2):
        for dropout in (True, False):
            model.train(dropout)
            for name, fn in attention_functions():
                AttentionInterface.register(ATTN_SDPA, fn)
                row = result.setdefault(f"{name}{'' if dropout else '_no_dropout'}", {})
                for key, ms in zip(("step_ms", "graph_step_ms"), _timings(step, args, calls=3), strict=True):
                    row[key] = min(ms, row[key]) if isinstance(ms, float) and isinstance(row.get(key), float) else ms
    register_attention()  # back to adapters/prefix.py's function
    model.train()
    for suffix in ("", "_no_dropout"):
        kernel, concat = result[f"triton_prefix{suffix}"], result[f"sdpa_concat_mask{suffix}"]
        for key in ("step_ms", "graph_step_ms"):
            if isinstance(kernel[key], float) and isinstance(concat[key], float):
                kernel[key.replace("_ms", "_speedup_vs_concat")] = concat[key] / kernel[key]
    return result


def profile_training_step(args: argparse.Namespace) -> None:
    """Print torch.profiler's busiest ops (self CPU time) over 3 training steps per attention function."""
    register_attention()
    _, step = training_step(args, args.train_batches[0])
    for name, fn in attention_functions():
        AttentionInterface.register(ATTN_SDPA, fn)
        for _ in range(5):
            step()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            torch.cuda.synchronize()
        print(f"== {name}: 3 steps\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18))
    register_attention()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="JSON file to write (required unless --report)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--heads", type=int, default=12)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--prefix", type=int, default=16)
    ap.add_argument("--head-dims", type=int, nargs="+", default=[32, 64])
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp16")
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--train-batches", type=int, nargs="+", default=[32], help="batch sizes of the training-step comparison")
    ap.add_argument("--no-train-step", action="store_true", help="skip the P-tuning v2 training-step comparison")
    ap.add_argument("--sweep", action="store_true", help="also time the forward kernel's other block configurations")
    ap.add_argument("--sweep-shard", default="0/1", help="I/N: sweep every N-th configuration from the I-th")
    ap.add_argument("--profile-step", action="store_true", help="only profile the training step (torch.profiler tables)")
    ap.add_argument("--seqs", type=int, nargs="+", default=[], help="also sweep these sequence lengths (same token count)")
    ap.add_argument("--report", type=Path, help="print this saved report (and --plot it) instead of running: no GPU needed")
    ap.add_argument("--plot", type=Path, help="PNG of the sequence sweep's achieved TFLOP/s (needs matplotlib)")
    args = ap.parse_args(argv)
    if args.report is not None:
        report = json.loads(args.report.read_text())
        print(format_report(report))
        if args.plot:
            plot_sequence_sweep(report, args.plot)
            print(f"wrote {args.plot}")
        return
    if args.out is None:
        ap.error("--out is required (or --report to reprint a saved report)")
    if not torch.cuda.is_available():
        sys.exit("bench.kernels needs a CUDA GPU (torch.cuda.is_available() is False): run it on a GPU machine")
    if args.profile_step:
        profile_training_step(args)
        return
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "attention": {f"d{d}": bench_attention(args, d) for d in args.head_dims},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))  # each part is saved as it completes: a later failure keeps it
    if not args.no_train_step:
        report["train_step"] = [bench_training_step(args, batch) for batch in args.train_batches]
        args.out.write_text(json.dumps(report, indent=2))
    if args.seqs:
        report["seq_sweep"] = {f"d{d}": sweep_sequence(args, d) for d in args.head_dims}
        args.out.write_text(json.dumps(report, indent=2))
    if args.sweep:
        report["sweep"] = {f"d{d}": sweep_forward(args, d) for d in args.head_dims}
        args.out.write_text(json.dumps(report, indent=2))
    print(format_report(report))
    if args.plot:
        plot_sequence_sweep(report, args.plot)
    print(f"wrote {args.out}")


def format_report(report: dict) -> str:
    """The attention rows (ms and speed-up over SDPA-over-concat, eager launch / CUDA graph), what the prefix costs
    the kernel, the training step, the sequence sweep, the block sweep's five fastest."""

    def num(x, spec):
        return format(x, spec) if isinstance(x, float) else "-".rjust(int(spec.split(".")[0] or 1))

    lines = [f"{'head dim':>8} {'variant':>20} {'fwd ms':>8} {'graph':>8} {'fwd+bwd':>8} {'graph':>8}   x concat: "
             f"{'fwd':>5} {'graph':>5} {'f+b':>5} {'graph':>5}"]  # fmt: skip
    for d, rows in report["attention"].items():
        for name, r in rows.items():
            ms = " ".join(num(r[k], "8.4f") for k in ("fwd_ms", "fwd_graph_ms", "fwd_bwd_ms", "fwd_bwd_graph_ms"))
            x = " ".join(num(r.get(k), "5.2f") for k in ("fwd_speedup_vs_concat", "fwd_graph_speedup_vs_concat",
                                                         "fwd_bwd_speedup_vs_concat", "fwd_bwd_graph_speedup_vs_concat"))  # fmt: skip
            lines.append(f"{d:>8} {name:>20} {ms}             {x}")
        with_p, without = rows.get("triton_prefix", {}), rows.get("triton_no_prefix", {})
        if all(isinstance(r.get("fwd_graph_ms"), float) for r in (with_p, without)):
            lines.append(f"{d:>8} prefix cost (kernel, graph): forward {with_p['fwd_graph_ms'] / without['fwd_graph_ms']:.2f}x "
                         f"the kernel without a prefix")  # fmt: skip
    for t in report.get("train_step", []):
        for suffix in ("", "_no_dropout"):
            k, c = t[f"triton_prefix{suffix}"], t[f"sdpa_concat_mask{suffix}"]
            lines.append(f"train step {t['batch']} x {t['seq']} ({'no ' if suffix else ''}dropout), ms, eager / CUDA graph: kernel "
                         f"{num(k['step_ms'], '.3f')} / {num(k['graph_step_ms'], '.3f')}, SDPA concat {num(c['step_ms'], '.3f')} / "
                         f"{num(c['graph_step_ms'], '.3f')}; x concat {num(k.get('step_speedup_vs_concat'), '.2f')} / "
                         f"{num(k.get('graph_step_speedup_vs_concat'), '.2f')}")  # fmt: skip
    for d, points in report.get("seq_sweep", {}).items():
        lines.append(f"sequence sweep {d}, CUDA graph ms forward / forward+backward (x concat):")
        for pt in points:
            cells = [f"{name} {num(r.get('fwd_graph_ms'), '.4f')} / {num(r.get('fwd_bwd_graph_ms'), '.4f')} "
                     f"({num(r.get('fwd_graph_speedup_vs_concat'), '.2f')} / {num(r.get('fwd_bwd_graph_speedup_vs_concat'), '.2f')})"
                     for name, r in pt["rows"].items()]  # fmt: skip
            lines.append(f"  {pt['batch']:>4} x {pt['seq']:<5} " + ", ".join(cells))
    for d, rows in report.get("sweep", {}).items():
        ok = sorted((r["fwd_graph_ms"], name) for name, r in rows.items() if "fwd_graph_ms" in r)
        lines.append(f"sweep {d}: " + ", ".join(f"{name} {ms:.4f}" for ms, name in ok[:5]))
    return "\n".join(lines)


def plot_sequence_sweep(report: dict, path: Path) -> None:
    """Achieved TFLOP/s against sequence length, one panel per head dim and direction (forward; forward+backward),
    a line per variant; points whose capture failed are left out."""
    # optional: only --plot needs matplotlib (the [bench] extra), not the GPU run
    import matplotlib
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")

    sweeps = report.get("seq_sweep")
    if not sweeps:
        raise ValueError("the report has no sequence sweep (run bench.kernels with --seqs)")
    fig, axes = plt.subplots(2, len(sweeps), figsize=(5 * len(sweeps), 7), squeeze=False)
    cfg = report.get("config", {})
    for col, (d, points) in enumerate(sweeps.items()):
        for row, (key, title) in enumerate((("fwd_tflops", "forward"), ("fwd_bwd_tflops", "forward+backward"))):
            ax = axes[row][col]
            for name in points[0]["rows"]:
                xs = [pt["seq"] for pt in points if isinstance(pt["rows"][name].get(key), float)]
                ys = [pt["rows"][name][key] for pt in points if isinstance(pt["rows"][name].get(key), float)]
                label = name + (" (baseline)" if name == "sdpa_concat_mask" else "")
                ax.plot(xs, ys, marker="o", label=label, linewidth=2.5 if name == "triton_prefix" else 1.5)
            ax.set_xscale("log", base=2)
            ax.set_xticks([pt["seq"] for pt in points], [str(pt["seq"]) for pt in points])
            ax.set_xlabel("sequence length (batch x length constant)")
            ax.set_ylabel("achieved TFLOP/s")
            ax.set_title(f"{title}, head dim {d[1:]}")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{report.get('device', '?')}, {cfg.get('dtype', '?')}, {cfg.get('heads', '?')} heads, prefix "
                 f"{cfg.get('prefix', '?')}, CUDA-graph time")  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
