"""Run configuration: one frozen dataclass, loaded from YAML with ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields
from pathlib import Path

import yaml

from adapters.errors import ConfigError, EdgetuneError
from adapters.methods import METHODS, method_of

OPTIMIZERS = ("adamw", "adam", "sgd")
TASKS = ("classification", "tagging")
HEADS = ("linear", "crf")
# The keys a without_bf16 entry may set: how the run optimises, never what it builds (the export reads the rest back)
SCHEDULE_KEYS = ("epochs", "batch_size", "lr", "head_lr", "weight_decay", "optimizer", "momentum", "label_smoothing",
                 "class_weights", "warmup_ratio", "max_grad_norm", "max_steps", "patience", "gradient_checkpointing")  # fmt: skip


@dataclass(frozen=True)
class RunConfig:
    """Everything a training run depends on. Field comments are the documentation of each key."""

    # model
    base_model: str = ""  # local Hugging Face model folder; "" = bundled all-MiniLM-L6-v2
    # task
    task: str = "classification"  # classification (one label per text) | tagging (one tag per word: NER, sequence labelling)
    head: str = "linear"  # linear | crf (tagging only: a linear-chain CRF over the word emissions, Viterbi in the graph)
    # data
    # classification: builtin dataset (banking77, clinc150, hwu64) or a .csv/.tsv/.jsonl train file
    # tagging: builtin wnut16 (WNUT-16 Twitter NER) or a CoNLL file (token<TAB>tag lines, blank line between sentences)
    data: str = "banking77"
    dev_data: str = ""  # dev file for a file dataset; "" = split dev_fraction off the train file
    test_data: str = ""  # test file for a file dataset; "" = split test_fraction off the train file
    text_column: str = "text"
    label_column: str = "label"
    dev_fraction: float = 0.1
    test_fraction: float = 0.1
    max_length: int = 64  # tokens per example after truncation (virtual tokens not counted)
    max_train_samples: int = 0  # 0 = all; for smoke runs
    max_eval_samples: int = 0  # 0 = all; for smoke runs
    # method
    # p_tuning_v2 | lora | prompt_tuning | p_tuning | full (all weights, optionally partly frozen) | head (classifier only)
    method: str = "p_tuning_v2"
    num_virtual_tokens: int = 16  # prefix length (p_tuning_v2) or prompt length (prompt_tuning, p_tuning) P
    prefix_projection: bool = False  # p_tuning_v2: reparameterise the prefix through an MLP while training
    encoder_hidden_size: int = 0  # hidden size of that MLP or of P-tuning's prompt encoder; 0 = model hidden size
    prompt_init: str = "vocab"  # prompt_tuning: vocab (embeddings of random tokens) | random (N(0,1)) | text
    prompt_init_text: str = ""  # prompt_tuning with prompt_init=text: the text whose token embeddings start the prompt
    prompt_encoder: str = "mlp"  # p_tuning: mlp | lstm
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_target_modules: tuple[str, ...] = ("query", "value")
    freeze_embeddings: bool = False  # method=full: keep the embedding layer frozen
    freeze_layers: int = 0  # method=full: keep the bottom N encoder layers frozen
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    lr: float = 2e-2  # adapter learning rate
    head_lr: float = 0.0  # classifier learning rate; 0 = same as lr
    weight_decay: float = 0.0
    optimizer: str = "adamw"  # adamw | adam | sgd (with momentum)
    momentum: float = 0.9  # sgd only
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    class_weights: str = "none"  # none | balanced (weight each class by n / (classes * count))
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_steps: int = 0  # stop after this many optimiser steps; 0 = run all epochs
    patience: int = 0  # stop once the dev score has not improved for this many epochs; 0 = run all epochs
    seed: int = 42
    bf16: str = "auto"  # auto (on where the hardware has native bf16) | true | false
    # key=value entries that replace the keys above where bf16 autocast is off (a CPU without native bf16, or bf16=false),
    # e.g. a shorter schedule for the slower fp32 steps; keys given as command-line overrides win over them
    without_bf16: tuple[str, ...] = ()
    device: str = "auto"  # auto | cpu | cuda
    gradient_checkpointing: bool = False  # recompute encoder layers in the backward pass: less memory, ~30 % slower steps
    # GPU only: replay each batch shape's forward+backward from a CUDA graph (batches padded to a multiple of 16 tokens);
    # a small model's eager GPU step is bound by Python's launch cost (train/graphs.py)
    cuda_graphs: bool = False
    # GPU, p_tuning_v2: attention through the Triton prefix kernel (kernels/); false = SDPA over concat(prefix, keys)
    prefix_kernel: bool = True

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method={self.method!r} is not one of {', '.join(METHODS)}")
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not one of {', '.join(TASKS)}")
        if self.head not in HEADS:
            raise ConfigError(f"head={self.head!r} is not one of {', '.join(HEADS)}")
        if self.head == "crf" and self.task != "tagging":
            raise ConfigError("head=crf needs task=tagging: a CRF scores tag sequences, a text classifier has one label")
        if self.head == "crf" and (self.class_weights != "none" or self.label_smoothing):
            raise ConfigError(
                "class_weights / label_smoothing apply to the cross-entropy loss; head=crf trains on the CRF likelihood"
            )
        if self.prompt_init not in ("vocab", "random", "text"):
            raise ConfigError(f"prompt_init={self.prompt_init!r} must be vocab, random or text")
        if self.prompt_init == "text" and not self.prompt_init_text.strip():
            raise ConfigError("prompt_init=text needs prompt_init_text=...")
        if self.prompt_encoder not in ("mlp", "lstm"):
            raise ConfigError(f"prompt_encoder={self.prompt_encoder!r} must be mlp or lstm")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer={self.optimizer!r} is not one of {', '.join(OPTIMIZERS)}")
        if self.class_weights not in ("none", "balanced"):
            raise ConfigError(f"class_weights={self.class_weights!r} must be none or balanced")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing={self.label_smoothing} must be in [0, 1)")
        if (self.freeze_embeddings or self.freeze_layers) and not method_of(self.method).PARTIAL_FREEZE:
            which = "/".join(name for name, m in METHODS.items() if m.PARTIAL_FREEZE)
            raise ConfigError(
                f"freeze_embeddings / freeze_layers apply to method={which} only (other methods freeze the whole base)"
            )
        if self.freeze_layers < 0:
            raise ConfigError(f"freeze_layers={self.freeze_layers} must be 0 or more")
        if self.bf16 not in ("auto", "true", "false"):
            raise ConfigError(f"bf16={self.bf16!r} must be auto, true or false")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"device={self.device!r} must be auto, cpu or cuda")
        if self.cuda_graphs and self.device == "cpu":
            raise ConfigError("cuda_graphs=true needs a CUDA GPU, and device=cpu was asked for")
        if self.cuda_graphs and self.gradient_checkpointing:
            raise ConfigError("cuda_graphs=true and gradient_checkpointing=true do not combine: pick one")
        for name in ("epochs", "batch_size", "max_length", "lora_r", "num_virtual_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be at least 1")
        if self.lr <= 0:
            raise ConfigError(f"lr={self.lr} must be positive")
        if self.patience < 0:
            raise ConfigError(f"patience={self.patience} must be 0 (off) or more")
        if not self.lora_target_modules:
            raise ConfigError("lora_target_modules must name at least one module")
        if self.without_bf16:
            self._check_without_bf16()

    def _check_without_bf16(self) -> None:
        """Refuse, on every machine, a without_bf16 entry that would fail only on a machine without bf16."""
        entries = parse_overrides(list(self.without_bf16), "without_bf16")
        for key in entries:
            if key not in SCHEDULE_KEYS:
                raise ConfigError(f"without_bf16 sets {key}; it may set only how the run optimises: {', '.join(SCHEDULE_KEYS)}")
        try:
            self.for_precision(bf16=False)
        except ConfigError as e:
            raise ConfigError(
                f"without_bf16={','.join(self.without_bf16)}: {e} (where bf16 is off; set the key itself, or without_bf16=)"
            ) from None

    def for_precision(self, bf16: bool) -> RunConfig:
        """The config a run trains with: this one where bf16 autocast is on, else with the without_bf16 entries applied."""
        if bf16 or not self.without_bf16:
            return self
        entries = parse_overrides(list(self.without_bf16), "without_bf16")
        return dataclasses.replace(self, without_bf16=(), **{k: _coerce(k, v) for k, v in entries.items()})

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules)
        return d


_TYPES = typing.get_type_hints(RunConfig)


def _coerce(key: str, value: object) -> object:
    """Turn a YAML value or an override string into the field's type."""
    typ = _TYPES[key]
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if typ is float:
            return float(value)
        if typ is str:
            if isinstance(value, bool):  # YAML reads `bf16: true` as a bool
                return "true" if value else "false"
            return "" if value is None else str(value)
        if typ == tuple[str, ...]:
            items = value if isinstance(value, (list, tuple)) else str(value).split(",")
            return tuple(str(v).strip() for v in items if str(v).strip())
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {getattr(typ, '__name__', typ)}") from None
    raise AssertionError(f"unhandled type {typ} for {key}")


def _check_key(key: str, source: str) -> None:
    if key not in _TYPES:
        valid = ", ".join(f.name for f in fields(RunConfig))
        raise ConfigError(f"unknown config key {key!r} in {source} (valid keys: {valid})")


def parse_overrides(items: list[str], source: str = "overrides") -> dict[str, str]:
    """Parse ``key=value`` strings into a dict, refusing malformed items and unknown keys."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(
                f"{'override' if source == 'overrides' else source + ' entry'} {item!r} is not of the form key=value"
            )
        key, value = item.split("=", 1)
        key = key.strip()
        _check_key(key, source)
        out[key] = value
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a RunConfig from a YAML file (or the defaults) and apply ``key=value`` overrides.

    Raises:
        ConfigError: unreadable file, unknown key, or a value of the wrong type.
    """
    values: dict[str, object] = {}
    if path:
        p = Path(path)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except OSError as e:
            raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of key: value")
        for key, value in loaded.items():
            _check_key(str(key), str(p))
            values[key] = value
    explicit = parse_overrides(overrides or [])
    values.update(explicit)
    coerced = {k: _coerce(k, v) for k, v in values.items()}
    if coerced.get("without_bf16"):  # a key the command line sets is not replaced where bf16 is off
        coerced["without_bf16"] = tuple(e for e in coerced["without_bf16"] if e.split("=", 1)[0].strip() not in explicit)
    return RunConfig(**coerced)


def save_config(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def run_config(run_dir: Path):
    """The RunConfig a run was trained with (RUN/config.yaml)."""

    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise EdgetuneError(
            f"{cfg_path} is missing: the parity gate needs the run's dev data "
            "(pass --run of a trained run, or --data to name the data of an adapter trained elsewhere)"
        )
    return load_config(cfg_path)
