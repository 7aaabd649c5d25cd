"""Prompt tuning: P trained embeddings before the input's word embeddings (adapters/prompt.py).

PEFT saves them as ``prompt_embeddings`` (P, H); the frozen form is that table, prepended by the eager model and by
the graph.
"""

from __future__ import annotations

import torch
from transformers import AutoTokenizer

from adapters.methods.common import (
    PROMPT_HEAD,
    Frozen,
    Trainable,
    attach,
    check_head,
    crf_module,
    head_state,
    head_tensors,
    plain_fused_ops,
    prompt_table,
    virtual_token_keys,
)
from adapters.prefix import PrefixModel
from adapters.prompt import PromptEmbedding

CHECKPOINT = False
PEFT_TYPE = "PROMPT_TUNING"
VIRTUAL_TOKENS = True
CHANGES_OUTPUT = True
PARTIAL_FREEZE = False
REQUIRED_TENSORS = ("prompt_embeddings",)
INITS = {"vocab": "SAMPLE_VOCAB", "random": "RANDOM", "text": "TEXT"}  # prompt_init -> PEFT's prompt_tuning_init


def build(base, cfg) -> Trainable:
    word_embeddings = base.base_model.embeddings.word_embeddings
    return Trainable(prompt=PromptEmbedding(word_embeddings, cfg.num_virtual_tokens, _init_ids(base, cfg)))


def _init_ids(base, cfg) -> torch.Tensor | None:
    """Token ids whose embeddings start the prompt (PEFT's SAMPLE_VOCAB / TEXT), or None for random."""
    if cfg.prompt_init == "random":
        return None
    if cfg.prompt_init == "vocab":
        return torch.randint(0, base.config.vocab_size, (cfg.num_virtual_tokens,))
    ids = AutoTokenizer.from_pretrained(base.name_or_path)(cfg.prompt_init_text)["input_ids"]
    ids = (ids * (cfg.num_virtual_tokens // len(ids) + 1))[: cfg.num_virtual_tokens]  # repeat or trim to P, as PEFT
    return torch.tensor(ids)


def peft_config(cfg, config, base_path: str) -> dict:
    return {**virtual_token_keys(cfg, config), "peft_type": PEFT_TYPE, "prompt_tuning_init": INITS[cfg.prompt_init],
            "prompt_tuning_init_text": cfg.prompt_init_text or None, "tokenizer_name_or_path": base_path}  # fmt: skip


def to_peft(model: PrefixModel) -> dict[str, torch.Tensor]:
    return {**head_tensors(model, PROMPT_HEAD), "prompt_embeddings": model.prompt.table()}


def validate(adapter, model) -> None:
    prompt_table(adapter, model.config)
    check_head(model, head_state(adapter.tensors))


def from_peft(adapter, model) -> Frozen:
    return Frozen(head_state(adapter.tensors), prompt=adapter.tensors["prompt_embeddings"])


def reference(base, adapter, frozen: Frozen) -> PrefixModel:
    return attach(base, frozen, crf_module(adapter))


def fused_ops(config) -> dict[str, int]:
    return plain_fused_ops(config)
