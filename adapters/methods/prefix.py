"""P-tuning v2 / prefix tuning: P trained key/value positions in every layer's attention (adapters/prefix.py).

PEFT saves the prefix as one table ``prompt_embeddings`` (P, 2*L*H), through the projection MLP if there is one; the
frozen form is that table split into each layer's (keys, values), which the eager model and the graph both use.
"""

from __future__ import annotations

import torch

from adapters.errors import AdapterError
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
)
from adapters.prefix import PrefixEncoder, PrefixModel, split_prefix_table

CHECKPOINT = False
PEFT_TYPE = "PREFIX_TUNING"
VIRTUAL_TOKENS = True
CHANGES_OUTPUT = True
PARTIAL_FREEZE = False
REQUIRED_TENSORS = ("prompt_embeddings",)


def build(base, cfg) -> Trainable:
    c = base.config
    hidden = cfg.encoder_hidden_size or c.hidden_size
    projection = hidden if cfg.prefix_projection else 0
    return Trainable(
        prefix=PrefixEncoder(cfg.num_virtual_tokens, c.num_hidden_layers, c.num_attention_heads, c.hidden_size, projection)
    )


def peft_config(cfg, config, base_path: str) -> dict:
    return {
        "peft_type": PEFT_TYPE,
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_transformer_submodules": 1,
        "prefix_projection": cfg.prefix_projection,
        "encoder_hidden_size": cfg.encoder_hidden_size or config.hidden_size,
        "modules_to_save": ["classifier", "score"],
    }


def to_peft(model: PrefixModel) -> dict[str, torch.Tensor]:
    return {**head_tensors(model, PROMPT_HEAD), "prompt_embeddings": model.prefix.table()}


def validate(adapter, model) -> None:
    table = adapter.tensors["prompt_embeddings"]
    want = 2 * model.config.num_hidden_layers * model.config.hidden_size
    if table.dim() != 2 or table.shape[1] != want:
        raise AdapterError(
            f"adapter prefix of shape {tuple(table.shape)} does not fit this base model (2 x layers x hidden = {want}): "
            "was it trained on another base model?"
        )
    check_head(model, head_state(adapter.tensors))


def from_peft(adapter, model) -> Frozen:
    c = model.config
    kv = split_prefix_table(adapter.tensors["prompt_embeddings"].float(), c.num_hidden_layers, c.num_attention_heads)
    return Frozen(head_state(adapter.tensors), prefix=[(k.detach().clone(), v.detach().clone()) for k, v in kv])


def reference(base, adapter, frozen: Frozen) -> PrefixModel:
    return attach(base, frozen, crf_module(adapter))


def fused_ops(config) -> dict[str, int]:
    """Each layer's attention one Attention node with the prefix as its past; its FFN's bias and GELU one BiasGelu."""
    return {**plain_fused_ops(config), "BiasGelu": config.num_hidden_layers}
