"""Read and write adapters in PEFT's file format (adapter_config.json + adapter_model.safetensors).

Tensor names are PEFT's, so an adapter written here loads with ``peft.PeftModel.from_pretrained`` and the reverse:
  LoRA:   base_model.model.<module path>.lora_A.weight / .lora_B.weight, base_model.model.classifier.{weight,bias}
  prefix: prompt_embeddings (P, 2*L*H), base_model.classifier.{weight,bias}
``labels.json`` beside them holds the class names (PEFT ignores it). Tagging runs have task_type TOKEN_CLS; a CRF head,
which PEFT does not know, sits beside them in ``crf.safetensors`` (start, end, transitions).

Full and head-only fine-tuning have no PEFT form: their "adapter" folder is a complete Hugging Face model folder
(config.json + model.safetensors, loadable by ``AutoModelForSequenceClassification``) plus labels.json and
``edgetune.json`` naming the method and the base model it started from.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from adapters.config import RunConfig
from adapters.errors import AdapterError
from adapters.methods import METHODS, method_of
from adapters.methods.common import head_state
from bank.layout import sha256_of

CONFIG, WEIGHTS, LABELS = "adapter_config.json", "adapter_model.safetensors", "labels.json"
CHECKPOINT, CHECKPOINT_META, CRF_WEIGHTS = "model.safetensors", "edgetune.json", "crf.safetensors"
TASK_TYPES = {"SEQ_CLS": "classification", "TOKEN_CLS": "tagging"}
CHECKPOINT_METHODS = tuple(name for name, m in METHODS.items() if m.CHECKPOINT)
PEFT_TYPES = dict(sorted((m.PEFT_TYPE, name) for name, m in METHODS.items() if m.PEFT_TYPE))  # peft_type -> method
PEFT_VERSION = "0.21.2"


@dataclass(frozen=True)
class Adapter:
    method: str  # a name in adapters.methods.METHODS
    config: dict  # adapter_config.json as read
    tensors: dict[str, torch.Tensor]
    label_names: list[str]
    sha256: str  # of adapter_model.safetensors
    task: str = "classification"  # classification | tagging
    crf: dict[str, torch.Tensor] | None = None  # start, end, transitions of a CRF head


def peft_config(cfg: RunConfig, model, base_path: str) -> dict:
    """The adapter_config.json PEFT expects for this run."""
    common = {
        "base_model_name_or_path": base_path,
        "task_type": {v: k for k, v in TASK_TYPES.items()}[cfg.task],
        "inference_mode": True,
        "peft_version": PEFT_VERSION,
        "revision": None,
    }
    return {**common, **method_of(cfg.method).peft_config(cfg, model.base.config, base_path)}


def adapter_tensors(model, method: str) -> dict[str, torch.Tensor]:
    """The trained tensors under PEFT's names (prefix tables folded, as PEFT saves them)."""
    return {k: v.detach().float().contiguous().cpu() for k, v in method_of(method).to_peft(model).items()}


def save_adapter(folder: Path, config: dict, tensors: dict[str, torch.Tensor], label_names: list[str]) -> None:
    """Write the three adapter files into ``folder`` (which the caller renames into place when complete)."""
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    (folder / CONFIG).write_text(json.dumps(config, indent=2))
    (folder / LABELS).write_text(json.dumps(label_names, indent=1))


def save_checkpoint(folder: Path, model, method: str, base_path: str, label_names: list[str], task: str) -> None:
    """Write a full/head-only fine-tuned model as a Hugging Face model folder (see the module docstring)."""
    model.base.save_pretrained(folder)
    (folder / LABELS).write_text(json.dumps(label_names, indent=1))
    meta = {"method": method, "task": task, "base_model_name_or_path": base_path}
    (folder / CHECKPOINT_META).write_text(json.dumps(meta, indent=2))


def save_crf(folder: Path, crf) -> None:
    save_file({k: v.detach().float().contiguous().cpu() for k, v in crf.state_dict().items()}, str(folder / CRF_WEIGHTS))


def _load_crf(folder: Path, num_labels: int) -> dict[str, torch.Tensor] | None:
    path = folder / CRF_WEIGHTS
    if not path.is_file():
        return None
    try:
        crf = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path} is corrupt or not a safetensors file ({e})") from None
    want = {"start": (num_labels,), "end": (num_labels,), "transitions": (num_labels, num_labels)}
    if {k: tuple(v.shape) for k, v in crf.items()} != want:
        raise AdapterError(f"{path} does not hold a CRF for {num_labels} tags (start, end, transitions)")
    if not all(torch.isfinite(v).all() for v in crf.values()):
        raise AdapterError(f"{path} holds NaN or inf")
    return crf


def _load_checkpoint(folder: Path) -> Adapter:
    meta = json.loads((folder / CHECKPOINT_META).read_text())
    if meta.get("method") not in CHECKPOINT_METHODS:
        raise AdapterError(f"{folder / CHECKPOINT_META} names method {meta.get('method')!r}, not one of {CHECKPOINT_METHODS}")
    for name in ("config.json", CHECKPOINT, LABELS):
        if not (folder / name).is_file():
            raise AdapterError(f"checkpoint folder {folder} has no {name}")
    try:
        with safe_open(str(folder / CHECKPOINT), "pt") as f:
            for key in f.keys():
                if not torch.isfinite(f.get_tensor(key)).all():
                    raise AdapterError(f"checkpoint tensor {key} holds NaN or inf")
    except (SafetensorError, OSError) as e:
        raise AdapterError(f"{folder / CHECKPOINT} is corrupt or not a safetensors file ({e})") from None
    label_names = json.loads((folder / LABELS).read_text())
    task = meta.get("task", "classification")
    return Adapter(
        meta["method"], meta, {}, label_names, sha256_of(folder / CHECKPOINT), task, _load_crf(folder, len(label_names))
    )


def load_adapter(folder: Path) -> Adapter:
    """Read and validate an adapter folder.

    Raises:
        AdapterError: a file is missing or corrupt, the method is not supported, or tensors are not finite.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist (run `make train` first)")
    if (folder / CHECKPOINT_META).is_file():
        return _load_checkpoint(folder)
    for name in (CONFIG, WEIGHTS):
        if not (folder / name).is_file():
            raise AdapterError(f"adapter folder {folder} has no {name}")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterError(f"{folder / CONFIG} is not valid JSON: {e.msg}") from None
    try:
        tensors = load_file(str(folder / WEIGHTS))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{folder / WEIGHTS} is corrupt or not a safetensors file ({e})") from None
    peft_type = config.get("peft_type")
    method = PEFT_TYPES.get(peft_type)
    if method is None:
        raise AdapterError(f"adapter peft_type {peft_type!r} is not supported here ({', '.join(PEFT_TYPES)})")
    task = TASK_TYPES.get(config.get("task_type"))
    if task is None:
        raise AdapterError(f"adapter task_type {config.get('task_type')!r} is not supported here ({', '.join(TASK_TYPES)})")
    for name in method_of(method).REQUIRED_TENSORS:
        if name not in tensors:
            raise AdapterError(f"{folder / WEIGHTS} has no {name} tensor")
    for k, t in tensors.items():
        if not torch.isfinite(t).all():
            raise AdapterError(f"adapter tensor {k} holds NaN or inf")
    head = head_state(tensors)
    if "weight" not in head:
        raise AdapterError(f"{folder / WEIGHTS} has no classifier weights (base_model[.model].classifier.weight)")
    labels_path = folder / LABELS
    if labels_path.is_file():
        label_names = json.loads(labels_path.read_text())
    else:  # an adapter written by PEFT itself: label names unknown
        label_names = [f"LABEL_{i}" for i in range(head["weight"].shape[0])]
    if len(label_names) != head["weight"].shape[0]:
        raise AdapterError(f"{labels_path} names {len(label_names)} labels, the classifier has {head['weight'].shape[0]}")
    crf = _load_crf(folder, len(label_names))
    return Adapter(method, config, tensors, label_names, sha256_of(folder / WEIGHTS), task, crf)
