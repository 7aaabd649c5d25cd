"""Pure functions that turn an adapter into plain weights: merge LoRA."""

from __future__ import annotations

import torch

from adapters.errors import AdapterError

LORA_PREFIX = "base_model.model."


def merge_lora(
    base_state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], r: int, alpha: float
) -> dict[str, torch.Tensor]:
    """Return a new state dict with W + (B @ A) * alpha / r for every LoRA pair (sums in float64).

    Raises:
        AdapterError: a LoRA pair is incomplete, names a weight the base lacks, has the wrong shape,
            or the merged weight holds NaN/inf.
    """
    out = dict(base_state)
    scale = alpha / r
    for key_a in sorted(k for k in adapter if k.endswith(".lora_A.weight")):
        path = key_a[len(LORA_PREFIX) : -len(".lora_A.weight")]
        key_b = f"{LORA_PREFIX}{path}.lora_B.weight"
        if key_b not in adapter:
            raise AdapterError(f"adapter has {key_a} but no {key_b}")
        weight = f"{path}.weight"
        if weight not in base_state:
            raise AdapterError(f"adapter tensor {key_a} names {weight}, which the base model does not have")
        w, a, b = base_state[weight], adapter[key_a], adapter[key_b]
        if (b.shape[0], a.shape[1]) != tuple(w.shape) or a.shape[0] != b.shape[1]:
            raise AdapterError(
                f"LoRA pair for {weight} has shapes A{tuple(a.shape)} B{tuple(b.shape)}, weight is {tuple(w.shape)}"
            )
        merged = w.double() + (b.double() @ a.double()) * scale  # (out, in)
        if not torch.isfinite(merged).all():
            raise AdapterError(f"merging LoRA into {weight} gives NaN/inf: the adapter is corrupt")
        out[weight] = merged.to(w.dtype)
    return out
