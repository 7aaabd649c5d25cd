"""Rebuild the eager PyTorch model from an adapter folder: the reference for the parity gate and the bench."""

from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from adapters.methods import freeze, method_of
from adapters.methods.common import Frozen
from adapters.model import base_model_path, load_base
from adapters.peft_io import Adapter, load_adapter
from adapters.prefix import ATTN_SDPA, PrefixModel


def model_folder(adapter_dir: Path, adapter: Adapter, base_path: str = "") -> Path:
    """The folder the adapter's model loads from: the adapter folder itself for a whole fine-tuned model, else the
    base model (``base_path``, or the one the adapter config names)."""
    if method_of(adapter.method).CHECKPOINT:
        return Path(adapter_dir)
    return base_model_path(base_path or adapter.config.get("base_model_name_or_path") or "")


def load_model(path: Path, adapter: Adapter, attn: str = ATTN_SDPA) -> nn.Module:
    """The model at ``path`` with the adapter's labels and task, frozen."""
    model = load_base(path, adapter.label_names, attn, adapter.task)
    return model.requires_grad_(False)


def reference_model(model: nn.Module, adapter: Adapter, frozen: Frozen) -> PrefixModel:
    """The adapter on ``model`` (changed in place), as it was trained."""
    return method_of(adapter.method).reference(model, adapter, frozen)


def bare_model(pretrained: nn.Module, frozen: Frozen) -> PrefixModel:
    """A copy of the pretrained base model under the adapter's classifier: the adapter's effect is measured against it."""
    base = copy.deepcopy(pretrained)
    base.classifier.load_state_dict(frozen.head)
    return PrefixModel(base, None, base.config.num_attention_heads).eval()


def load_adapter_model(adapter_dir: Path, base_path: str = "", attn: str = ATTN_SDPA) -> PrefixModel:
    """Rebuild the eager PyTorch model from an adapter folder (base from ``base_path`` or the adapter config)."""
    adapter = load_adapter(adapter_dir)
    model = load_model(model_folder(adapter_dir, adapter, base_path), adapter, attn)
    return reference_model(model, adapter, freeze(adapter, model))
