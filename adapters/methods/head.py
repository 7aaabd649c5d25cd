"""Head-only fine-tuning: the classifier (and a CRF) train on the frozen base. Saved, loaded and exported as full
fine-tuning is (adapters/methods/full.py); the encoder is the pretrained one, so the adapter need not change the
output beyond what the classifier does (no effect check)."""

from __future__ import annotations

from adapters.methods.common import Trainable
from adapters.methods.full import from_peft, fused_ops, peft_config, reference, to_peft, validate

CHECKPOINT = True
PEFT_TYPE = None
VIRTUAL_TOKENS = False
CHANGES_OUTPUT = False
PARTIAL_FREEZE = False
REQUIRED_TENSORS = ()
__all__ = ["build", "peft_config", "to_peft", "validate", "from_peft", "reference", "fused_ops"]


def build(base, cfg) -> Trainable:
    """Nothing beyond the classifier, which every method trains."""
    return Trainable()
