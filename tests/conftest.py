"""Shared fixtures: a tiny random BERT (with the real MiniLM tokenizer), small trained runs, their exports."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.helpers import minilm_path, train_small


def pytest_collection_modifyitems(config, items):
    """Kernel tests marked ``interpreted`` need TRITON_INTERPRET=1 from the start of the process: outside such a process
    (test_kernels.py starts one) they are deselected, not skipped; inside it, only they run."""
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    keep = [i for i in items if (i.get_closest_marker("interpreted") is not None) == interpreting]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory) -> Path:
    """A 2-layer, hidden-32 random BERT saved as a local model folder, with MiniLM's tokenizer files."""
    import torch
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("tiny_bert")
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=30522,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    BertModel(cfg).save_pretrained(d)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy2(minilm_path() / name, d / name)
    return d


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_bert):
    """Lazily trained small runs, keyed by (model, method); model is 'tiny' or 'minilm'."""
    cache: dict[tuple[str, str], Path] = {}

    def get(model: str, method: str) -> Path:
        key = (model, method)
        if key not in cache:
            d = tmp_path_factory.mktemp(f"run_{model}_{method}")
            cache[key] = train_small(d, method, str(tiny_bert) if model == "tiny" else "")
        return cache[key]

    return get


@pytest.fixture(scope="session")
def exported(runs):
    """Lazily exported runs (the export folder sits in the run folder)."""
    done: dict[tuple[str, str], Path] = {}

    def get(model: str, method: str) -> Path:
        key = (model, method)
        if key not in done:
            from export.run import export_run

            run_dir = runs(model, method)
            # barely trained models on 96 dev sentences: the int8 accuracy gate is exercised in test_export.py
            export_run(run_dir, int8_max_drop=1.0)
            done[key] = run_dir
        return done[key]

    return get
