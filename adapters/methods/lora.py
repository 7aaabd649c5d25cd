"""LoRA: a trained low-rank update B A of chosen Linear layers (adapters/lora.py).

PEFT saves each pair as ``base_model.model.<module path>.lora_A.weight`` / ``.lora_B.weight``. The eager reference is
the model as trained (the pairs unmerged); the frozen form merges them into the base weights, W + B A alpha / r, so the
graph is a plain BERT.
"""

from __future__ import annotations

import torch

from adapters.errors import AdapterError
from adapters.fold import LORA_PREFIX, merge_lora
from adapters.lora import inject_lora, lora_modules, lora_targets
from adapters.methods.common import (
    LORA_HEAD,
    Frozen,
    Trainable,
    check_head,
    crf_module,
    head_state,
    head_tensors,
    plain_fused_ops,
)
from adapters.prefix import PrefixModel

CHECKPOINT = False
PEFT_TYPE = "LORA"
VIRTUAL_TOKENS = False
CHANGES_OUTPUT = True
PARTIAL_FREEZE = False
REQUIRED_TENSORS = ()  # the pairs' names depend on the base model: validate() checks them
PARTS = ("lora_A", "lora_B")


def build(base, cfg) -> Trainable:
    inject_lora(base, cfg.lora_target_modules, cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout)
    return Trainable()


def peft_config(cfg, config, base_path: str) -> dict:
    return {
        "peft_type": PEFT_TYPE,
        "r": cfg.lora_r,
        "lora_alpha": cfg.lora_alpha,
        "lora_dropout": cfg.lora_dropout,
        "target_modules": list(cfg.lora_target_modules),
        "modules_to_save": ["classifier", "score"],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
    }


def to_peft(model: PrefixModel) -> dict[str, torch.Tensor]:
    out = head_tensors(model, LORA_HEAD)
    for path, m in lora_modules(model.base).items():
        for part in PARTS:
            out[f"{LORA_PREFIX}{path}.{part}.weight"] = getattr(m, part).weight
    return out


def validate(adapter, model) -> None:
    """Every target Linear of the model has both tensors of its pair, each of the shape it needs."""
    r = int(adapter.config["r"])
    missing = set()
    for path, linear in lora_targets(model, tuple(adapter.config["target_modules"])).items():
        shapes = {"lora_A": (r, linear.in_features), "lora_B": (linear.out_features, r)}
        for part in PARTS:
            key = f"{LORA_PREFIX}{path}.{part}.weight"
            if key not in adapter.tensors:
                missing.add(key)
            elif tuple(adapter.tensors[key].shape) != shapes[part]:
                raise AdapterError(
                    f"adapter tensor {key} has shape {tuple(adapter.tensors[key].shape)}, the model needs {shapes[part]}"
                )
    if missing:
        raise AdapterError(f"adapter lacks {len(missing)} LoRA tensor(s), e.g. {sorted(missing)[0]}")
    check_head(model, head_state(adapter.tensors))


def from_peft(adapter, model) -> Frozen:
    base_state = model.state_dict()
    merged = merge_lora(base_state, adapter.tensors, int(adapter.config["r"]), float(adapter.config["lora_alpha"]))
    return Frozen(head_state(adapter.tensors), state={k: v for k, v in merged.items() if v is not base_state[k]})


def reference(base, adapter, frozen: Frozen) -> PrefixModel:
    """The model as trained: the pairs in LoRALinear modules beside the base weights, not merged."""
    c = adapter.config
    inject_lora(base, tuple(c["target_modules"]), int(c["r"]), float(c["lora_alpha"]), 0.0)
    for path, m in lora_modules(base).items():
        for part in PARTS:
            getattr(m, part).weight.data.copy_(adapter.tensors[f"{LORA_PREFIX}{path}.{part}.weight"])
    base.classifier.load_state_dict(frozen.head)
    return PrefixModel(base, None, base.config.num_attention_heads, None, crf_module(adapter)).eval()


def fused_ops(config) -> dict[str, int]:
    return plain_fused_ops(config)
