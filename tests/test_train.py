"""Training options: frozen parts stay frozen, optimisers and loss options run, class weights are right."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import train_small
from train.loop import balanced_class_weights


def test_balanced_class_weights():
    w = balanced_class_weights([0, 0, 0, 1], 3)
    assert torch.allclose(w, torch.tensor([4 / 9, 4 / 3, 0.0]))


def test_partial_fine_tuning_leaves_frozen_weights_alone(tmp_path, tiny_bert):
    run = train_small(tmp_path / "run", "full", str(tiny_bert), ["lr=1e-2", "freeze_embeddings=true", "freeze_layers=1"])
    before = load_file(str(tiny_bert / "model.safetensors"))
    after = {k.removeprefix("bert."): v for k, v in load_file(str(run / "adapter" / "model.safetensors")).items()}
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        frozen = key.startswith("embeddings.") or key.startswith("encoder.layer.0.")
        trained = key.startswith("encoder.layer.1.")
        assert not (frozen and changed), key
        if trained and key.endswith("weight") and "LayerNorm" not in key:
            assert changed, key


@pytest.mark.parametrize(
    "options", [["optimizer=sgd", "lr=1e-1"], ["optimizer=adam", "label_smoothing=0.1", "class_weights=balanced"]]
)
def test_optimisers_and_loss_options_train(tmp_path, tiny_bert, options):
    run = train_small(tmp_path / "run", "lora", str(tiny_bert), options)
    m = json.loads((run / "metrics.json").read_text())
    loss = m["history"][0]["train_loss"]
    assert loss == loss and 0 < loss < 10  # finite, and a cross-entropy over 77 classes


@pytest.mark.parametrize("method", ["p_tuning_v2", "lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_bert, method):
    """Recomputing the layers in the backward pass must change memory, not the maths (dropout off to compare)."""
    from tests.helpers import padded_batch
    from train.config import load_config
    from train.model import build_model

    ids, mask = padded_batch(tiny_bert)
    grads = []
    for on in (False, True):
        cfg = load_config(None, [f"method={method}", f"base_model={tiny_bert}", f"gradient_checkpointing={on}"])
        model = build_model(cfg, [f"L{i}" for i in range(5)], seed=0).train()
        assert model.base.is_gradient_checkpointing == on
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model(ids, mask).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 2
    for name, g in grads[0].items():
        assert torch.allclose(g, grads[1][name], atol=1e-6), name
