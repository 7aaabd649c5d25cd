import dataclasses

import pytest

from adapters.config import RunConfig, load_config
from adapters.errors import ConfigError


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


def test_without_bf16_entries_apply_only_without_bf16():
    cfg = load_config("train/configs/default.yaml")
    assert cfg.for_precision(bf16=True) == cfg
    fp32 = cfg.for_precision(bf16=False)
    assert (fp32.epochs, fp32.label_smoothing, fp32.without_bf16) == (8, 0.1, ())
    assert (cfg.epochs, cfg.label_smoothing) == (10, 0.0)


def test_command_line_overrides_win_over_without_bf16():
    cfg = load_config("train/configs/default.yaml", ["epochs=3"])
    assert cfg.without_bf16 == ("label_smoothing=0.1",)
    fp32 = cfg.for_precision(bf16=False)
    assert (fp32.epochs, fp32.label_smoothing) == (3, 0.1)
    assert load_config("train/configs/default.yaml", ["without_bf16="]).for_precision(bf16=False).epochs == 10


@pytest.mark.parametrize(
    "entries, message",
    [
        ("epochs=0", r"without_bf16=epochs=0: epochs=0 must be at least 1"),
        ("rank=8", "unknown config key 'rank' in without_bf16"),
        ("epochs", "without_bf16 entry 'epochs' is not of the form key=value"),
        ("max_length=32", "without_bf16 sets max_length; it may set only how the run optimises"),
        ("bf16=true", "without_bf16 sets bf16"),
    ],
)
def test_bad_without_bf16_entry_is_refused_on_every_machine(entries, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [f"without_bf16={entries}"])


def test_without_bf16_that_a_crf_cannot_take_is_refused_at_load():
    with pytest.raises(
        ConfigError, match=r"without_bf16=epochs=8,label_smoothing=0.1: class_weights / label_smoothing apply.*without_bf16=\)"
    ):
        load_config("train/configs/default.yaml", ["task=tagging", "head=crf", "data=wnut16"])
    load_config("train/configs/default.yaml", ["task=tagging", "head=crf", "data=wnut16", "label_smoothing=0"])
