"""Rebuild the eager PyTorch model from an adapter folder: the reference for the parity gate and the bench."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from adapters.crf import CRF
from adapters.errors import AdapterError
from adapters.fold import freeze_prefix
from adapters.lora import LoRALinear, inject_lora
from adapters.model import base_model_path, load_base
from adapters.peft_io import CHECKPOINT_METHODS, Adapter, head_state, load_adapter
from adapters.prefix import ATTN_SDPA, FrozenPrefix, PrefixModel
from adapters.prompt import FrozenPrompt


def attach_adapter(base: nn.Module, adapter: Adapter, num_heads: int) -> PrefixModel:
    """Put a loaded adapter (see adapter_io.Adapter) onto a freshly loaded base model, for inference."""
    c = adapter.config
    missing = set()
    prefix = prompt = None
    if adapter.method == "p_tuning_v2":
        table = adapter.tensors["prompt_embeddings"]
        want = 2 * base.config.num_hidden_layers * base.config.hidden_size
        if table.dim() != 2 or table.shape[1] != want:
            raise AdapterError(
                f"adapter prefix of shape {tuple(table.shape)} does not fit this base model (2 x layers x hidden = {want}): "
                "was it trained on another base model?"
            )
        prefix = FrozenPrefix(freeze_prefix(table, base.config.num_hidden_layers, num_heads))
    elif adapter.method in ("prompt_tuning", "p_tuning"):
        table = adapter.tensors["prompt_embeddings"]
        if table.dim() != 2 or table.shape[1] != base.config.hidden_size:
            raise AdapterError(
                f"adapter prompt of shape {tuple(table.shape)} does not fit this base model (hidden {base.config.hidden_size}): "
                "was it trained on another base model?"
            )
        if not torch.isfinite(table).all():
            raise AdapterError("prompt table holds NaN/inf: the adapter is corrupt")
        prompt = FrozenPrompt(table)
    else:
        r, alpha = int(c["r"]), float(c["lora_alpha"])
        inject_lora(base, tuple(c["target_modules"]), r, alpha, 0.0)
        for path, m in {p: m for p, m in base.named_modules() if isinstance(m, LoRALinear)}.items():
            for part in ("lora_A", "lora_B"):
                key = f"base_model.model.{path}.{part}.weight"
                if key not in adapter.tensors:
                    missing.add(key)
                    continue
                w = adapter.tensors[key]
                if w.shape != getattr(m, part).weight.shape:
                    raise AdapterError(
                        f"adapter tensor {key} has shape {tuple(w.shape)}, the model needs {tuple(getattr(m, part).weight.shape)}"
                    )
                getattr(m, part).weight.data.copy_(w)
    if missing:
        raise AdapterError(f"adapter lacks {len(missing)} LoRA tensor(s), e.g. {sorted(missing)[0]}")
    head = head_state(adapter.tensors)
    try:
        base.classifier.load_state_dict(head)
    except RuntimeError as e:
        raise AdapterError(f"adapter classifier does not fit the model: {str(e).splitlines()[-1].strip()}") from None
    return PrefixModel(base, prefix, num_heads, prompt, crf_module(adapter)).eval()


def crf_module(adapter: Adapter) -> CRF | None:
    """The adapter's CRF head as a module, or None."""
    if adapter.crf is None:
        return None
    crf = CRF(len(adapter.label_names))
    crf.load_state_dict(adapter.crf)
    return crf.requires_grad_(False)


def load_adapter_model(adapter_dir: Path, base_path: str = "", attn: str = ATTN_SDPA) -> PrefixModel:
    """Rebuild the eager PyTorch model from an adapter folder (base from ``base_path`` or the adapter config)."""
    adapter = load_adapter(adapter_dir)
    checkpoint = adapter.method in CHECKPOINT_METHODS  # the folder is the whole fine-tuned model
    path = Path(adapter_dir) if checkpoint else base_model_path(base_path or adapter.config.get("base_model_name_or_path") or "")
    base = load_base(path, adapter.label_names, attn, adapter.task)
    for p in base.parameters():
        p.requires_grad_(False)
    if checkpoint:
        return PrefixModel(base, None, base.config.num_attention_heads, crf=crf_module(adapter)).eval()
    return attach_adapter(base, adapter, base.config.num_attention_heads)
