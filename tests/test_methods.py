"""The method table (adapters/methods/): every method gives the whole interface, an unknown name fails clearly, each
method's adapter goes to PEFT's names and back to the model it was, and its frozen form reaches the graph."""

from __future__ import annotations

import copy

import pytest
import torch

from adapters.config import load_config
from adapters.eager import bare_model, load_adapter_model, load_model
from adapters.errors import AdapterError, ConfigError
from adapters.methods import FLAGS, INTERFACE, METHODS, freeze, method_of
from adapters.model import build_model
from adapters.peft_io import adapter_tensors, load_adapter, peft_config, save_adapter, save_checkpoint
from export.run import graph_module
from tests.helpers import padded_batch

LABELS = [f"label_{i}" for i in range(5)]


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_gives_the_whole_interface(name):
    method = method_of(name)
    assert all(callable(getattr(method, f, None)) for f in INTERFACE), [f for f in INTERFACE if not hasattr(method, f)]
    assert all(hasattr(method, flag) for flag in FLAGS), [f for f in FLAGS if not hasattr(method, f)]
    assert (method.PEFT_TYPE is None) == method.CHECKPOINT  # a method is saved in PEFT's format or as a whole model
    assert isinstance(method.REQUIRED_TENSORS, tuple)


def test_an_unknown_method_names_itself_and_the_known_ones():
    with pytest.raises(ConfigError, match="unknown method 'adapters'") as e:
        method_of("adapters")
    assert all(name in str(e.value) for name in METHODS)


def trained(name: str, tiny_bert):
    """The method's trainable model on the tiny BERT, with every trainable tensor moved off its initial value (LoRA's
    B starts at zero: an untrained adapter would leave the output as it was)."""
    cfg = load_config(None, [f"method={name}", f"base_model={tiny_bert}", "lora_dropout=0", "num_virtual_tokens=4"])
    model = build_model(cfg, LABELS, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval(), cfg


def saved(model, cfg, name: str, tiny_bert, folder):
    """The adapter folder the training run writes."""
    if method_of(name).CHECKPOINT:
        save_checkpoint(folder, model, name, str(tiny_bert), LABELS, cfg.task)
    else:
        save_adapter(folder, peft_config(cfg, model, str(tiny_bert)), adapter_tensors(model, name), LABELS)
    return folder


@pytest.mark.parametrize("name", list(METHODS))
@torch.inference_mode()
def test_an_adapter_goes_to_peft_names_and_back(name, tiny_bert, tmp_path):
    """The model rebuilt from the written adapter (PEFT's names, validated, frozen, attached) is the trained model."""
    model, cfg = trained(name, tiny_bert)
    ids, mask = padded_batch(tiny_bert)
    rebuilt = load_adapter_model(saved(model, cfg, name, tiny_bert, tmp_path / "adapter"), str(tiny_bert))
    torch.testing.assert_close(rebuilt(ids, mask), model(ids, mask), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", list(METHODS))
@torch.inference_mode()
def test_the_frozen_adapter_reaches_the_graph(name, tiny_bert, tmp_path):
    """The module the export traces equals the eager reference; where the method must change the output, both differ
    from the bare base under the same classifier (a freeze or attach that dropped the adapter fails here)."""
    model, cfg = trained(name, tiny_bert)
    folder = saved(model, cfg, name, tiny_bert, tmp_path / "adapter")
    adapter = load_adapter(folder)
    method = method_of(name)
    loaded = load_model(folder if method.CHECKPOINT else tiny_bert, adapter)
    frozen = freeze(adapter, loaded)
    eager = method.reference(copy.deepcopy(loaded), adapter, frozen)
    bare = bare_model(load_model(tiny_bert, adapter) if method.CHECKPOINT else loaded, frozen)
    graph = graph_module(eager, loaded, frozen, adapter.task)
    ids, mask = padded_batch(tiny_bert)
    ref = eager(ids, mask)
    torch.testing.assert_close(graph(ids, mask), ref, rtol=0, atol=1e-5)
    effect = (ref - bare(ids, mask)).abs().max().item()
    if method.CHANGES_OUTPUT:
        assert effect > 1e-2, f"{name}: the adapter does not change the output ({effect:.3g})"
    else:
        assert effect == 0.0, f"{name}: only the classifier trains, yet the output moved by {effect:.3g}"


@pytest.mark.parametrize("name", [n for n, m in METHODS.items() if not m.CHECKPOINT])
def test_an_adapter_for_another_base_is_refused_once_loaded(name, tiny_bert, tmp_path):
    """validate() checks the adapter against the base model before anything is built from it."""
    model, cfg = trained(name, tiny_bert)
    adapter = load_adapter(saved(model, cfg, name, tiny_bert, tmp_path / "adapter"))
    tensors = {k: (v[..., :-1] if "classifier" not in k else v) for k, v in adapter.tensors.items()}
    with pytest.raises(AdapterError):
        freeze(type(adapter)(**{**adapter.__dict__, "tensors": tensors}), load_model(tiny_bert, adapter))
