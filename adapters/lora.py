"""LoRA as a plain module: y = W x + (B A dropout(x)) * alpha / r, with W frozen."""

from __future__ import annotations

import math

import torch
from torch import nn

from adapters.errors import ConfigError


class LoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` with a trainable low-rank update (PEFT's initialisation: B = 0)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float) -> None:
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, r, bias=False)  # (r, in)
        self.lora_B = nn.Linear(r, base.out_features, bias=False)  # (out, r)
        self.dropout = nn.Dropout(dropout)
        self.scaling = alpha / r
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling


def lora_targets(model: nn.Module, targets: tuple[str, ...]) -> dict[str, nn.Linear]:
    """Dotted path -> every ``nn.Linear`` whose last name component is in ``targets``.

    Raises:
        ConfigError: a target names no Linear module of the model.
    """
    found = {path: m for path, m in model.named_modules() if path.rsplit(".", 1)[-1] in targets and isinstance(m, nn.Linear)}
    missing = [t for t in targets if t not in {p.rsplit(".", 1)[-1] for p in found}]
    if missing:
        linears = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"lora_target_modules {missing} match no Linear layer (the model has: {', '.join(linears)})")
    return found


def inject_lora(model: nn.Module, targets: tuple[str, ...], r: int, alpha: float, dropout: float) -> list[str]:
    """Replace every ``nn.Linear`` whose last name component is in ``targets`` with a LoRALinear.

    Returns the dotted paths of the wrapped modules.

    Raises:
        ConfigError: a target names no Linear module of the model.
    """
    found = lora_targets(model, targets)
    for path, module in found.items():
        parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
        setattr(parent, path.rsplit(".", 1)[-1], LoRALinear(module, r, alpha, dropout))
    return list(found)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Dotted path -> LoRALinear."""
    return {path: m for path, m in model.named_modules() if isinstance(m, LoRALinear)}
