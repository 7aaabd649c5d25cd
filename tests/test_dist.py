"""torchrun: two CPU processes (gloo) train like one process with the same global batch."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]


def test_two_processes_equal_one_process(tmp_path, tiny_bert):
    base = tmp_path / "no_dropout"  # dropout draws differ per process; without it the runs must agree
    shutil.copytree(tiny_bert, base)
    cfg = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**cfg, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}))
    args = [f"base_model={base}", "method=p_tuning_v2", "max_train_samples=150", "max_eval_samples=40",
            "epochs=1", "max_steps=5", "max_length=32", "bf16=false", "batch_size=31", "optimizer=sgd", "lr=0.5"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "train", "--run", str(one), *args], cwd=ROOT, env=env, check=True, capture_output=True)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    done = subprocess.run(
        [*torchrun, "-m", "train", "--run-dir", str(two), *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("test accuracy") == 1  # rank 0 alone reports (and writes)
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    start = _initial_tensors(one, args)
    assert a.keys() == b.keys() == start.keys()
    # SGD's update is linear in the gradients, and two processes sum the same 31 rows' gradients in another order (and
    # on 15/16-row shapes): their updates differ by rounding, ~1e-5 of the update's size over 5 steps. A lost shard
    # or a wrong share weight (16/31 for 1/2) moves it by 3% or more.
    for k in a:
        update = float((a[k] - start[k]).abs().max())
        assert float((a[k] - b[k]).abs().max()) <= 1e-3 * update, (k, (a[k] - b[k]).abs().max(), update)
    assert max(float((a[k] - start[k]).abs().max()) for k in a) > 1e-3  # the steps moved the adapter
    m1, m2 = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert abs(m1["dev_accuracy"] - m2["dev_accuracy"]) <= 1 / 40


def _initial_tensors(run: Path, args: list[str]) -> dict[str, torch.Tensor]:
    """The adapter as the run built it before its first step (same seed), in PEFT's names."""
    from adapters.config import load_config
    from adapters.model import build_model
    from adapters.peft_io import adapter_tensors
    from train.run import DEFAULT_CONFIG

    cfg = load_config(DEFAULT_CONFIG, args)
    labels = json.loads((run / "adapter" / "labels.json").read_text())
    return {k: v.detach().clone() for k, v in adapter_tensors(build_model(cfg, labels, cfg.seed), cfg.method).items()}


def test_shards_partition_each_batch_and_rescale_the_loss(monkeypatch):
    from train import dist

    batch = list(range(31))
    monkeypatch.setenv("WORLD_SIZE", "2")
    parts = []
    for r in (0, 1):
        monkeypatch.setenv("RANK", str(r))
        parts.append(dist.shard(batch))
    assert sorted(parts[0][0] + parts[1][0]) == batch
    # DDP averages the two ranks' gradients: scaled local means must add up to the global mean
    assert parts[0][1] == 16 * 2 / 31 and parts[1][1] == 15 * 2 / 31
    monkeypatch.setenv("RANK", "1")
    assert dist.shard([7]) == ([7], 0.0)  # an empty slice still joins the all-reduce, with no weight
