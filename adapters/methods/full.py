"""Full fine-tuning: every weight of the base model trains, less the embeddings and bottom layers asked frozen
(freeze_embeddings, freeze_layers).

There is no PEFT form: the adapter folder is the whole fine-tuned model (adapters/peft_io.py), loaded in the base's
place, so its frozen form holds only the classifier and the graph is a plain BERT.
"""

from __future__ import annotations

from adapters.errors import ConfigError
from adapters.methods.common import Frozen, Trainable, attach, crf_module, plain_fused_ops
from adapters.prefix import PrefixModel

CHECKPOINT = True
PEFT_TYPE = None
VIRTUAL_TOKENS = False
CHANGES_OUTPUT = True
PARTIAL_FREEZE = True  # freeze_embeddings / freeze_layers apply
REQUIRED_TENSORS = ()


def build(base, cfg) -> Trainable:
    """Unfreeze the base, then freeze the embeddings and the bottom ``freeze_layers`` layers if asked.

    Raises:
        ConfigError: more layers to freeze than the model has.
    """
    encoder = base.base_model
    layers = base.config.num_hidden_layers
    if cfg.freeze_layers > layers:
        raise ConfigError(f"freeze_layers={cfg.freeze_layers} but the model has {layers} layers")
    frozen = [encoder.embeddings] if cfg.freeze_embeddings else []
    frozen += list(encoder.encoder.layer[: cfg.freeze_layers])
    for p in base.parameters():
        p.requires_grad_(True)
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    return Trainable()


def peft_config(cfg, config, base_path: str) -> None:
    """None: the method has no PEFT form (the run saves the whole model)."""
    return None


def to_peft(model: PrefixModel) -> dict:
    """Empty: the method has no PEFT form (the run saves the whole model)."""
    return {}


def validate(adapter, model) -> None:
    """Nothing beyond what loading checked: ``model`` is the adapter folder's own model."""


def from_peft(adapter, model) -> Frozen:
    return Frozen({k: v.detach().clone() for k, v in model.classifier.state_dict().items()})


def reference(base, adapter, frozen: Frozen) -> PrefixModel:
    return attach(base, frozen, crf_module(adapter))


def fused_ops(config) -> dict[str, int]:
    return plain_fused_ops(config)
