"""P-tuning: P virtual token embeddings produced by a trained prompt encoder (an MLP, or an LSTM and an MLP) and
prepended to the input's word embeddings (adapters/prompt.py).

PEFT saves the encoder's output as ``prompt_embeddings`` (P, H), so the frozen form, the eager model and the graph are
prompt tuning's (adapters/methods/prompt.py).
"""

from __future__ import annotations

import torch

from adapters.methods.common import PROMPT_HEAD, Trainable, head_tensors, virtual_token_keys
from adapters.methods.prompt import from_peft, fused_ops, reference, validate
from adapters.prefix import PrefixModel
from adapters.prompt import PromptEncoder

CHECKPOINT = False
PEFT_TYPE = "P_TUNING"
VIRTUAL_TOKENS = True
CHANGES_OUTPUT = True
PARTIAL_FREEZE = False
REQUIRED_TENSORS = ("prompt_embeddings",)
__all__ = ["build", "peft_config", "to_peft", "validate", "from_peft", "reference", "fused_ops"]


def build(base, cfg) -> Trainable:
    hidden = base.config.hidden_size
    return Trainable(prompt=PromptEncoder(cfg.num_virtual_tokens, hidden, cfg.encoder_hidden_size or hidden, cfg.prompt_encoder))


def peft_config(cfg, config, base_path: str) -> dict:
    return {**virtual_token_keys(cfg, config), "peft_type": PEFT_TYPE, "encoder_reparameterization_type": cfg.prompt_encoder.upper(),
            "encoder_hidden_size": cfg.encoder_hidden_size or config.hidden_size, "encoder_num_layers": 2,
            "encoder_dropout": 0.0}  # fmt: skip


def to_peft(model: PrefixModel) -> dict[str, torch.Tensor]:
    return {**head_tensors(model, PROMPT_HEAD), "prompt_embeddings": model.prompt.table()}
