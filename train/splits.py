"""A run's dev split, for either task, and the real dev sentences the export's parity gate runs."""

from __future__ import annotations

import random
from pathlib import Path

from adapters.config import run_config
from train.data import load_dataset
from train.tagging import load_tagging_dataset


def dev_split(run):
    """The dev data (train.data.Split, or train.tagging.TagSplit) of a run folder or a RunConfig."""
    cfg = run_config(run) if isinstance(run, Path) else run
    return (load_tagging_dataset(cfg) if cfg.task == "tagging" else load_dataset(cfg)).dev


def parity_texts(run, n: int = 64) -> list[str]:
    """``n`` real dev sentences of the run's dataset (shuffled with a fixed seed)."""
    texts = list(dev_split(run).texts)
    random.Random(0).shuffle(texts)
    return texts[:n]
