import dataclasses

import pytest

from train.config import RunConfig, load_config
from train.errors import ConfigError


def test_default_config_file_loads():
    cfg = load_config("train/configs/default.yaml")
    assert cfg.method == "p_tuning_v2" and cfg.num_virtual_tokens == 16 and cfg.lr == 2e-2


def test_overrides_are_typed():
    cfg = load_config(
        "train/configs/lora.yaml", ["lora_r=4", "lr=3e-4", "prefix_projection=yes", "lora_target_modules=query,key,value"]
    )
    assert cfg.lora_r == 4 and cfg.lr == 3e-4 and cfg.prefix_projection is True
    assert cfg.lora_target_modules == ("query", "key", "value")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        RunConfig().lr = 1.0  # type: ignore[misc]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["learning_rate=1e-3"], "unknown config key 'learning_rate'"),
        (["epochs=three"], "epochs='three' is not a valid int"),
        (["method=adapters"], "method='adapters' is not one of"),
        (["epochs"], "not of the form key=value"),
        (["prefix_projection=maybe"], "prefix_projection='maybe'"),
        (["freeze_layers=2"], "apply to method=full only"),
        (["optimizer=lamb"], "optimizer='lamb' is not one of"),
        (["label_smoothing=1.5"], "label_smoothing=1.5 must be in"),
        (["patience=-1"], r"patience=-1 must be 0 \(off\) or more"),
    ],
)
def test_bad_config_is_named(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("train/configs/default.yaml", overrides)


def test_unknown_key_in_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("method: lora\nrank: 8\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'rank' in .*c.yaml"):
        load_config(p)
