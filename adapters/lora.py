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


def inject_lora(model: nn.Module, targets: tuple[str, ...], r: int, alpha: float, dropout: float) -> list[str]:
    """Replace every ``nn.Linear`` whose last name component is in ``targets`` with a LoRALinear.

    Returns the dotted paths of the wrapped modules.

    Raises:
        ConfigError: a target names no Linear module of the model.
    """
    wrapped, seen = [], set()
    for path, module in list(model.named_modules()):
        leaf = path.rsplit(".", 1)[-1]
        if leaf in targets and isinstance(module, nn.Linear):
            parent = model.get_submodule(path.rsplit(".", 1)[0]) if "." in path else model
            setattr(parent, leaf, LoRALinear(module, r, alpha, dropout))
            wrapped.append(path)
            seen.add(leaf)
    missing = [t for t in targets if t not in seen]
    if missing:
        linears = sorted({p.rsplit(".", 1)[-1] for p, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ConfigError(f"lora_target_modules {missing} match no Linear layer (the model has: {', '.join(linears)})")
    return wrapped
