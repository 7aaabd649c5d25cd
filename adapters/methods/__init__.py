"""The training methods: one module each, and the one table from a method's name to its module.

Every module gives the same plain functions and flags, and nothing outside this package branches on a method's name:

  build(base, cfg) -> Trainable        the trainable parts on a frozen base model (or base weights unfrozen, LoRA
                                       modules injected in place)
  peft_config(cfg, config, base_path)  adapter_config.json's method keys after the common ones (None: no PEFT form)
  to_peft(model) -> tensors            the trained tensors under PEFT's names, the classifier included
  validate(adapter, model)             raises AdapterError where a loaded adapter does not fit the loaded base model
  from_peft(adapter, model) -> Frozen  the adapter's tensors, from PEFT's names, as the constants the graph needs
  reference(base, adapter, frozen)     the eager PyTorch model (PrefixModel) the export's parity gate compares with
  fused_ops(config) -> {op: count}     the fused ops onnxruntime must produce in the method's graph
  CHECKPOINT       the adapter folder is a whole fine-tuned model, loaded in the base's place (no PEFT form)
  PEFT_TYPE        adapter_config.json's peft_type, or None
  VIRTUAL_TOKENS   the input is lengthened by num_virtual_tokens positions
  CHANGES_OUTPUT   the adapter must change the output beyond the classifier (the parity gate's effect check)
  PARTIAL_FREEZE   freeze_embeddings / freeze_layers apply
  REQUIRED_TENSORS tensor names an adapter file of the method must hold

``freeze`` below validates a loaded adapter once and returns its Frozen form; the eager model and the graph
(export/run.py) are both built from that, the graph from its fields (weights, prefix, prompt) and never from the
method's name. Adding a method is one module here and one line in METHODS.

Two extensions fit the Frozen form without a branch on names:
- many adapters in one graph: the frozen prefixes (per layer (1, N, P, D)) or prompts (P, H) of several adapters of
  one method stacked into graph inputs (A, ...) and gathered per row by an adapter index input; the export builds
  them from a list of Frozen instead of one, the methods stay as they are.
- small decoder LMs (LLaMA-style): ``from_peft`` splits the prefix table by the model's key/value heads (GQA, as
  PEFT does for such models) and the graph's KV cache holds the prefix keys and values in its first P positions, used
  as they are (rotary positions are applied to the queries and the sequence's keys only; real tokens take positions
  P onwards), with PrefixAttention's causal=1 (export/prefix_op.py). A decoder's base model, mask and graph belong
  to the export's model family, not to the methods.
"""

from __future__ import annotations

from types import ModuleType

from adapters.errors import ConfigError
from adapters.methods import full, head, lora, prefix, prompt, prompt_encoder
from adapters.methods.common import Frozen

METHODS: dict[str, ModuleType] = {
    "p_tuning_v2": prefix,  # P-tuning v2 / prefix tuning
    "lora": lora,
    "prompt_tuning": prompt,
    "p_tuning": prompt_encoder,
    "full": full,  # full and partly frozen fine-tuning
    "head": head,  # head only
}
INTERFACE = ("build", "peft_config", "to_peft", "validate", "from_peft", "reference", "fused_ops")
FLAGS = ("CHECKPOINT", "PEFT_TYPE", "VIRTUAL_TOKENS", "CHANGES_OUTPUT", "PARTIAL_FREEZE", "REQUIRED_TENSORS")


def method_of(name: str) -> ModuleType:
    """The module of the method called ``name``.

    Raises:
        ConfigError: no method has that name.
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ConfigError(f"unknown method {name!r}: the methods are {', '.join(METHODS)}") from None


def freeze(adapter, model) -> Frozen:
    """Validate a loaded adapter against the loaded base model (or, CHECKPOINT, its own model), once, and return
    its frozen form."""
    method = method_of(adapter.method)
    method.validate(adapter, model)
    return method.from_peft(adapter, model)
