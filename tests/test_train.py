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
