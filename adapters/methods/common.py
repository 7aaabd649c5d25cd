"""What the method modules share: the trainable parts a method adds, an adapter's frozen form, PEFT's names of the
classifier, and the eager model built from the frozen form."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import nn

from adapters.crf import CRF
from adapters.errors import AdapterError
from adapters.prefix import FrozenPrefix, PrefixModel
from adapters.prompt import FrozenPrompt

PROMPT_HEAD = "base_model.classifier"  # PEFT's name of the classifier in a prompt-learning (prefix, prompt) model
LORA_HEAD = "base_model.model.classifier"  # and in a LoRA model


@dataclass(frozen=True)
class Trainable:
    """The modules a method trains besides the base model's own weights: a prefix encoder or a prompt encoder."""

    prefix: nn.Module | None = None  # .kv() -> per-layer (keys, values), .table() -> (P, 2*L*H)
    prompt: nn.Module | None = None  # .table() -> (P, H)


@dataclass(frozen=True)
class Frozen:
    """An adapter as constants on a given base model: what the eager reference and the exported graph are built from.

    ``state`` holds base-model weights the graph takes instead of the base's (LoRA: W + B A alpha / r); ``prefix`` the
    per-layer prefix keys and values, each (1, N, P, D); ``prompt`` the virtual token embeddings (P, H).
    """

    head: dict[str, torch.Tensor]  # the classifier's state dict
    state: dict[str, torch.Tensor] = field(default_factory=dict)
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    prompt: torch.Tensor | None = None


def head_tensors(model: PrefixModel, name: str) -> dict[str, torch.Tensor]:
    """The trained classifier under PEFT's name for it (``name``: PROMPT_HEAD or LORA_HEAD)."""
    return {f"{name}.{k}": t for k, t in model.base.classifier.state_dict().items()}


def head_state(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The classifier's state dict from PEFT tensor names (both the LoRA and the prompt-learning spelling)."""
    out = {}
    for prefix in (f"{LORA_HEAD}.", f"{PROMPT_HEAD}."):
        for k, v in tensors.items():
            if k.startswith(prefix):
                out[k[len(prefix) :]] = v
    return out


def check_head(model: nn.Module, head: dict[str, torch.Tensor]) -> None:
    """Raises AdapterError when the adapter's classifier does not fit the model's."""
    try:
        copy.deepcopy(model.classifier).load_state_dict(head)
    except RuntimeError as e:
        raise AdapterError(f"adapter classifier does not fit the model: {str(e).splitlines()[-1].strip()}") from None


def crf_module(adapter) -> CRF | None:
    """The adapter's CRF head as a module, or None."""
    if adapter.crf is None:
        return None
    crf = CRF(len(adapter.label_names))
    crf.load_state_dict(adapter.crf)
    return crf.requires_grad_(False)


def attach(base: nn.Module, frozen: Frozen, crf: nn.Module | None = None) -> PrefixModel:
    """The frozen adapter on ``base`` (changed in place): its weights and classifier loaded, its prefix or prompt as
    constants. The eager reference of every method whose trained form is its frozen form."""
    if frozen.state:
        base.load_state_dict({**base.state_dict(), **frozen.state})
    base.classifier.load_state_dict(frozen.head)
    prefix = FrozenPrefix(frozen.prefix) if frozen.prefix is not None else None
    prompt = FrozenPrompt(frozen.prompt) if frozen.prompt is not None else None
    return PrefixModel(base, prefix, base.config.num_attention_heads, prompt, crf).eval()


def plain_fused_ops(config) -> dict[str, int]:
    """The fused ops of a plain BERT graph onnxruntime must produce: one Attention per layer and the LayerNorms."""
    layers = config.num_hidden_layers
    return {"Attention": layers, "SkipLayerNormalization": 2 * layers - 1}


def virtual_token_keys(cfg, config) -> dict:
    """adapter_config.json's keys that every prompt-learning method (PEFT's PromptLearningConfig) writes."""
    return {
        "num_virtual_tokens": cfg.num_virtual_tokens,
        "token_dim": config.hidden_size,
        "num_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_transformer_submodules": 1,
        "modules_to_save": ["classifier", "score"],
    }


def prompt_table(adapter, config) -> torch.Tensor:
    """The adapter's prompt table (P, H), checked against the model's hidden size."""
    table = adapter.tensors["prompt_embeddings"]
    if table.dim() != 2 or table.shape[1] != config.hidden_size:
        raise AdapterError(
            f"adapter prompt of shape {tuple(table.shape)} does not fit this base model (hidden {config.hidden_size}): "
            "was it trained on another base model?"
        )
    return table
