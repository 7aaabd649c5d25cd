"""An adapter bank's tensors, in numpy only: how a PEFT adapter becomes one slot of a bank graph's inputs.

A bank graph (export/bank.py) takes, besides the token inputs, ``adapter_index`` (B,) int64 and one input per bank
tensor, each with the adapters along axis 0, gathered per row inside the graph:

  head_weight   (A, H, C)          every adapter's classifier, transposed, padded with zero columns to the bank's C
  head_bias     (A, C)
  prefix.{l}    (A, 2, N, P, D)    prefix / P-tuning v2: layer l's prefix keys [:, 0] and values [:, 1]
  prompt        (A, P, H)          prompt tuning / P-tuning: the virtual token embeddings
  lora_a.{i}    (A, in, r)         LoRA on the bank's i-th target module: A^T
  lora_b.{i}    (A, r, out)        and B^T * alpha / r, zero-padded to the bank's r

A bank of token classifiers (task TOKEN_CLS; all adapters of a bank share the task) also keeps each adapter's CRF
(crf.safetensors beside the adapter) in the bank file, zero-padded to the bank's C like the heads:

  crf_start       (A, C)
  crf_end         (A, C)
  crf_transitions (A, C, C)        [from, to]

These are not graph inputs: the graph returns emissions and the server decodes each row with its adapter's CRF,
sliced to that adapter's tag count (so padded tags are never chosen). An adapter without a CRF has zeros there, under
which Viterbi is the argmax of each word. ``input_names`` lists the graph's bank inputs, ``decode_names`` the rest.

C (the most labels of any adapter) and r (the largest rank) are dynamic axes of the graph, so an adapter with more
labels or a larger rank re-pads the others. The export and the server both build slots with ``slot`` below, so the
layout has one owner. The server keeps it free of torch.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file, save_file

FILE = "bank.safetensors"  # the bank tensors by graph input name
ADAPTERS = "adapters.json"  # the adapters in slot order: name, labels, source, sha256
PEFT_FAMILIES = {"PREFIX_TUNING": "prefix", "PROMPT_TUNING": "prompt", "P_TUNING": "prompt", "LORA": "lora"}  # peft_type
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RESERVED = ("ready", "versions", "infer", "load", "unload")  # path words of the v2 routes a bank adapter appears in
PEFT_CONFIG, PEFT_WEIGHTS, LABELS = "adapter_config.json", "adapter_model.safetensors", "labels.json"
CRF_WEIGHTS = "crf.safetensors"  # a tagging adapter's CRF head (start, end, transitions), beside its PEFT files
TASKS = ("SEQ_CLS", "TOKEN_CLS")  # PEFT task_types a bank holds: classifiers, token classifiers (taggers)
CRF_NAMES = ("crf_start", "crf_end", "crf_transitions")  # a tagging bank's decode tensors (not graph inputs)
HEADS = ("base_model.classifier", "base_model.model.classifier")  # PEFT's classifier names (prompt learning, LoRA)
LORA_PREFIX = "base_model.model."


class BankError(ValueError):
    """An adapter that does not fit the bank, or a bank folder that is not one; the message says which and why."""


@dataclass(frozen=True)
class Spec:
    """What every adapter of a bank shares: the graph was built for it."""

    family: str  # prefix | prompt | lora
    task: str  # SEQ_CLS | TOKEN_CLS
    base_model: str  # the adapters' base_model_name_or_path
    layers: int
    heads: int
    hidden: int
    virtual_tokens: int = 0  # P (prefix, prompt)
    targets: tuple[str, ...] = ()  # LoRA: the module paths the graph has low-rank branches on, e.g. bert.encoder...query
    shapes: dict[str, tuple[int, int]] = field(default_factory=dict)  # LoRA: module path -> (in, out)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("family", "task", "base_model", "layers", "heads", "hidden", "virtual_tokens")}
        return {**d, "targets": list(self.targets), "shapes": {k: list(v) for k, v in self.shapes.items()}}

    @classmethod
    def from_dict(cls, d: dict) -> Spec:
        shapes = {k: (int(v[0]), int(v[1])) for k, v in d.get("shapes", {}).items()}
        keys = ("family", "task", "base_model", "layers", "heads", "hidden", "virtual_tokens")
        return cls(**{k: d[k] for k in keys}, targets=tuple(d.get("targets", ())), shapes=shapes)


@dataclass(frozen=True)
class PeftAdapter:
    """A PEFT adapter folder as read here: its config, its tensors (float32 numpy), label names and file hash."""

    config: dict
    tensors: dict[str, np.ndarray]
    labels: list[str]
    sha256: str
    source: str
    crf: dict[str, np.ndarray] | None = None  # a tagger's CRF: start (C,), end (C,), transitions (C, C)

    @property
    def family(self) -> str:
        return PEFT_FAMILIES[self.config["peft_type"]]


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def head_of(tensors: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """The classifier's (weight (C, H), bias (C)) under either of PEFT's names."""
    for name in HEADS:
        if f"{name}.weight" in tensors and f"{name}.bias" in tensors:
            return tensors[f"{name}.weight"], tensors[f"{name}.bias"]
    raise BankError(f"the adapter has no classifier ({' or '.join(h + '.weight/.bias' for h in HEADS)})")


def read_peft(folder: str | Path) -> PeftAdapter:
    """Read a PEFT adapter folder (adapter_config.json, adapter_model.safetensors, labels.json if there is one).

    Raises:
        BankError: a file is missing or unreadable, the method cannot be banked, or a tensor is not finite.
    """
    d = Path(folder)
    for name in (PEFT_CONFIG, PEFT_WEIGHTS):
        if not (d / name).is_file():
            raise BankError(f"adapter folder {d} has no {name}")
    try:
        config = json.loads((d / PEFT_CONFIG).read_text())
        tensors = {k: v.astype(np.float32, copy=False) for k, v in load_file(str(d / PEFT_WEIGHTS)).items()}
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, SafetensorError, ValueError) as e:
        raise BankError(f"adapter folder {d} is unreadable: {e}") from None
    if not isinstance(config, dict) or config.get("peft_type") not in PEFT_FAMILIES:
        got = config.get("peft_type") if isinstance(config, dict) else config
        raise BankError(f"{d / PEFT_CONFIG}: peft_type {got!r} cannot be banked (one of {', '.join(PEFT_FAMILIES)})")
    if config.get("task_type") not in TASKS:
        raise BankError(f"{d / PEFT_CONFIG}: task_type {config.get('task_type')!r}; banks serve {' or '.join(TASKS)} adapters")
    for k, t in tensors.items():
        if not np.isfinite(t).all():
            raise BankError(f"adapter tensor {k} holds NaN or inf")
    weight, _ = head_of(tensors)
    labels = [f"LABEL_{i}" for i in range(weight.shape[0])]
    if (d / LABELS).is_file():
        try:
            labels = json.loads((d / LABELS).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BankError(f"{d / LABELS} is not readable JSON: {e}") from None
    if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels) or len(labels) != weight.shape[0]:
        raise BankError(f"{d / LABELS} must list the classifier's {weight.shape[0]} label names")
    return PeftAdapter(config, tensors, labels, sha256_of(d / PEFT_WEIGHTS), str(d), read_crf(d, config, len(labels)))


def read_crf(d: Path, config: dict, tags: int) -> dict[str, np.ndarray] | None:
    """A tagging adapter's CRF (crf.safetensors), checked; None where there is none (or for a classifier)."""
    path = d / CRF_WEIGHTS
    if config.get("task_type") != "TOKEN_CLS" or not path.is_file():
        return None
    try:
        crf = {k: v.astype(np.float32, copy=False) for k, v in load_file(str(path)).items()}
    except (OSError, SafetensorError, ValueError) as e:
        raise BankError(f"{path} is unreadable: {e}") from None
    want = {"start": (tags,), "end": (tags,), "transitions": (tags, tags)}
    if {k: v.shape for k, v in crf.items()} != want:
        raise BankError(f"{path} does not hold a CRF for {tags} tags (start, end, transitions)")
    if not all(np.isfinite(v).all() for v in crf.values()):
        raise BankError(f"{path} holds NaN or inf")
    return crf


def lora_pairs(adapter: PeftAdapter) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Module path -> (A (r, in), B (out, r)) of a LoRA adapter."""
    out = {}
    for key in sorted(k for k in adapter.tensors if k.endswith(".lora_A.weight")):
        path = key[len(LORA_PREFIX) : -len(".lora_A.weight")]
        b = adapter.tensors.get(f"{LORA_PREFIX}{path}.lora_B.weight")
        if b is None:
            raise BankError(f"adapter has {key} but no lora_B for {path}")
        out[path] = (adapter.tensors[key], b)
    if not out:
        raise BankError("the LoRA adapter has no lora_A / lora_B pairs")
    return out


def check(spec: Spec, adapter: PeftAdapter) -> None:
    """Raises BankError, naming the difference, where ``adapter`` does not fit a bank built for ``spec``."""
    c = adapter.config
    if c.get("task_type") != spec.task:
        raise BankError(f"the adapter's task_type is {c.get('task_type')!r}; this bank holds {spec.task} adapters")
    if adapter.family != spec.family:
        raise BankError(f"the adapter is {c['peft_type']} ({adapter.family}); this bank holds {spec.family} adapters")
    if c.get("base_model_name_or_path") != spec.base_model:
        raise BankError(f"the adapter's base model is {c.get('base_model_name_or_path')!r}, the bank's {spec.base_model!r}")
    weight, bias = head_of(adapter.tensors)
    if weight.ndim != 2 or weight.shape[1] != spec.hidden or bias.shape != (weight.shape[0],):
        raise BankError(f"the adapter's classifier is {weight.shape} + {bias.shape}; the bank needs (labels, {spec.hidden})")
    FAMILIES[spec.family].check(spec, adapter)


def slot(spec: Spec, adapter: PeftAdapter) -> dict[str, np.ndarray]:
    """The adapter's part of every bank tensor (no adapter axis; unpadded: ``stack`` pads), after ``check``."""
    weight, bias = head_of(adapter.tensors)
    out = {"head_weight": np.ascontiguousarray(weight.T), "head_bias": bias}  # (H, C), (C,)
    out.update(FAMILIES[spec.family].slot(spec, adapter))
    if spec.task == "TOKEN_CLS":  # the CRF, or zeros (Viterbi under zeros is each word's argmax)
        c = weight.shape[0]
        crf = adapter.crf or {"start": np.zeros(c, np.float32), "end": np.zeros(c, np.float32),
                              "transitions": np.zeros((c, c), np.float32)}  # fmt: skip
        out.update({name: crf[name[4:]] for name in CRF_NAMES})
    return out


def stack(slots: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """The bank tensors (adapter axis first) from the slots, each padded with zeros to the largest of its kind (the
    head's label axis, LoRA's rank)."""
    if not slots:
        raise BankError("a bank needs at least one adapter")
    out = {}
    for name in slots[0]:
        parts = [s[name] for s in slots]
        shape = tuple(max(p.shape[k] for p in parts) for k in range(parts[0].ndim))
        bank = np.zeros((len(parts), *shape), np.float32)
        for i, p in enumerate(parts):
            bank[(i, *(slice(0, n) for n in p.shape))] = p
        out[name] = bank
    return out


def spec_of(adapters: list[PeftAdapter], layers: int, heads: int, hidden: int, shapes: dict[str, tuple[int, int]]) -> Spec:
    """The spec a bank of ``adapters`` is built for, on a base model of those sizes (``shapes``: every Linear's (in,
    out), for LoRA); checks every adapter against it."""
    if not adapters:
        raise BankError("a bank needs at least one adapter")
    first = adapters[0]
    c = first.config
    spec = Spec(first.family, c["task_type"], c.get("base_model_name_or_path") or "", layers, heads, hidden)
    spec = FAMILIES[spec.family].spec(spec, adapters, shapes)
    for a in adapters:
        try:
            check(spec, a)
        except BankError as e:
            raise BankError(f"{a.source}: {e}") from None
    return spec


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME.match(name) or name in RESERVED:
        raise BankError(
            f"adapter name {name!r}: use 1-64 letters, digits, '_', '.' or '-', starting with a letter or digit, not {', '.join(RESERVED)}"
        )
    return name


@dataclass(frozen=True)
class Entry:
    """One adapter of a bank: its name, labels and where it came from."""

    name: str
    labels: list[str]
    sha256: str
    source: str

    def to_dict(self) -> dict:
        return {"name": self.name, "labels": self.labels, "sha256": self.sha256, "source": self.source}


def write(folder: Path, spec: Spec, entries: list[Entry], tensors: dict[str, np.ndarray]) -> None:
    """bank.safetensors (the tensors, with the spec and the adapters in its metadata) and adapters.json (the same
    list, to read) into ``folder``, each written beside and renamed into place: a bank changed while served is never
    seen half-written."""
    meta = {"spec": json.dumps(spec.to_dict()), "adapters": json.dumps([e.to_dict() for e in entries])}
    staged = folder / f".{FILE}.tmp"
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(staged), metadata=meta)
    os.chmod(staged, 0o644)  # safetensors writes 0600: the bank is read like the graph beside it
    os.replace(staged, folder / FILE)
    staged = folder / f".{ADAPTERS}.tmp"
    staged.write_text(json.dumps([e.to_dict() for e in entries], indent=1))
    os.replace(staged, folder / ADAPTERS)


def read(folder: Path, spec: Spec | None = None) -> tuple[Spec, list[Entry], dict[str, np.ndarray]]:
    """The spec, adapters and bank tensors of a bank folder, checked against each other (and against ``spec``).

    Raises:
        BankError: the file is missing, unreadable or inconsistent.
    """
    path = folder / FILE
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
        stored = Spec.from_dict(json.loads(meta["spec"]))
        entries = [
            Entry(check_name(e["name"]), list(e["labels"]), e["sha256"], e["source"]) for e in json.loads(meta["adapters"])
        ]
        tensors = load_file(str(path))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, SafetensorError, ValueError) as e:
        raise BankError(f"{path} is not a readable bank (tensors, with the spec and adapters in its metadata): {e}") from None
    if spec is not None and stored != spec:
        raise BankError(f"{path} was built for {stored.to_dict()}, not {spec.to_dict()}")
    if len({e.name for e in entries}) != len(entries) or not entries:
        raise BankError(f"{path} must name at least one adapter, each once")
    want = set(input_names(stored)) | set(decode_names(stored))
    if set(tensors) != want or any(t.shape[0] != len(entries) for t in tensors.values()):
        raise BankError(f"{path} does not hold {sorted(want)} for {len(entries)} adapters")
    classes = tensors["head_bias"].shape[1]
    crf_shapes = {"crf_start": (classes,), "crf_end": (classes,), "crf_transitions": (classes, classes)}
    if stored.task == "TOKEN_CLS" and any(tensors[n].shape[1:] != crf_shapes[n] for n in CRF_NAMES):
        raise BankError(f"{path}: the CRF tensors do not match the heads' {classes} tags")
    for e in entries:
        if len(e.labels) > classes:
            raise BankError(f"adapter {e.name} names {len(e.labels)} labels; the bank's heads have {classes}")
    return stored, entries, tensors


def input_names(spec: Spec) -> list[str]:
    """The bank tensors, in the graph's input order (after input_ids, attention_mask, adapter_index)."""
    tail = FAMILIES[spec.family].names(spec)
    return ["head_weight", "head_bias", *tail]


def decode_names(spec: Spec) -> list[str]:
    """The bank tensors that are not graph inputs: a tagging bank's CRFs, which the server decodes with."""
    return list(CRF_NAMES) if spec.task == "TOKEN_CLS" else []


def crf_of(tensors: dict[str, np.ndarray], slot: int, tags: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A tagging bank adapter's CRF (start, end, transitions), float64, sliced to its ``tags``: what each of its rows
    is decoded with (text.words.viterbi over the row's emissions[:, :tags]), so padded tags are never chosen; zeros
    for an adapter without a CRF, under which Viterbi is each word's argmax. The export's gate and the server both
    decode so."""
    start, end, transitions = (tensors[n][slot].astype(np.float64) for n in CRF_NAMES)
    return start[:tags], end[:tags], transitions[:tags, :tags]


# --- the method families: what each adds to the bank (its tensors, its checks, what its spec records) ----------------


class Prefix:
    """Prefix / P-tuning v2: PEFT's table (P, 2*L*H) as each layer's keys and values, ``prefix.{l}`` (2, N, P, D)."""

    @staticmethod
    def spec(spec: Spec, adapters: list[PeftAdapter], shapes: dict) -> Spec:
        return replace(spec, virtual_tokens=int(adapters[0].config.get("num_virtual_tokens", 0)))

    @staticmethod
    def width(spec: Spec) -> int:
        return 2 * spec.layers * spec.hidden

    @classmethod
    def check(cls, spec: Spec, adapter: PeftAdapter) -> None:
        p = int(adapter.config.get("num_virtual_tokens", -1))
        if p != spec.virtual_tokens:
            raise BankError(f"the adapter has {p} virtual tokens; every adapter of this bank has {spec.virtual_tokens}")
        table = adapter.tensors.get("prompt_embeddings")
        if table is None or table.shape != (p, cls.width(spec)):
            got = None if table is None else table.shape
            raise BankError(f"the adapter's prompt_embeddings is {got}; this bank needs ({p}, {cls.width(spec)})")

    @staticmethod
    def slot(spec: Spec, adapter: PeftAdapter) -> dict[str, np.ndarray]:
        p, n, d = spec.virtual_tokens, spec.heads, spec.hidden // spec.heads
        kv = adapter.tensors["prompt_embeddings"].reshape(p, 2 * spec.layers, n, d)  # (P, 2L, N, D)
        kv = kv.transpose(1, 2, 0, 3).reshape(spec.layers, 2, n, p, d)  # layer l: keys [l, 0], values [l, 1]
        return {f"prefix.{layer}": np.ascontiguousarray(kv[layer]) for layer in range(spec.layers)}

    @staticmethod
    def names(spec: Spec) -> list[str]:
        return [f"prefix.{i}" for i in range(spec.layers)]


class Prompt(Prefix):
    """Prompt tuning / P-tuning: the virtual token embeddings (P, H), ``prompt``."""

    @staticmethod
    def width(spec: Spec) -> int:
        return spec.hidden

    @staticmethod
    def slot(spec: Spec, adapter: PeftAdapter) -> dict[str, np.ndarray]:
        return {"prompt": adapter.tensors["prompt_embeddings"]}

    @staticmethod
    def names(spec: Spec) -> list[str]:
        return ["prompt"]


class Lora:
    """LoRA: on each of the bank's target modules, ``lora_a.{i}`` A^T (in, r) and ``lora_b.{i}`` B^T alpha / r (r,
    out); an adapter without a pair on a target gets rank 0 there (zeros once padded)."""

    @staticmethod
    def spec(spec: Spec, adapters: list[PeftAdapter], shapes: dict) -> Spec:
        targets = sorted({path for a in adapters if a.family == spec.family for path in lora_pairs(a)})
        unknown = [t for t in targets if t not in shapes]
        if unknown:
            raise BankError(f"LoRA on {unknown[0]}, which is not a Linear module of the base model")
        return replace(spec, targets=tuple(targets), shapes={t: shapes[t] for t in targets})

    @staticmethod
    def check(spec: Spec, adapter: PeftAdapter) -> None:
        for path, (a, b) in lora_pairs(adapter).items():
            if path not in spec.shapes:
                raise BankError(f"the adapter has LoRA on {path}; this bank's graph has it on {', '.join(spec.targets)}")
            n_in, n_out = spec.shapes[path]
            if a.ndim != 2 or a.shape[1] != n_in or b.shape != (n_out, a.shape[0]):
                raise BankError(f"the adapter's LoRA pair on {path} is A{a.shape} B{b.shape}; the module is {n_in} -> {n_out}")

    @staticmethod
    def slot(spec: Spec, adapter: PeftAdapter) -> dict[str, np.ndarray]:
        scale = float(adapter.config["lora_alpha"]) / int(adapter.config["r"])  # PEFT's scaling (no rslora)
        pairs, out = lora_pairs(adapter), {}
        for i, path in enumerate(spec.targets):
            n_in, n_out = spec.shapes[path]
            a, b = pairs.get(path, (np.zeros((0, n_in), np.float32), np.zeros((n_out, 0), np.float32)))
            out[f"lora_a.{i}"] = np.ascontiguousarray(a.T)  # (in, r)
            out[f"lora_b.{i}"] = np.ascontiguousarray(b.T * np.float32(scale))  # (r, out)
        return out

    @staticmethod
    def names(spec: Spec) -> list[str]:
        return [f"lora_{p}.{i}" for i in range(len(spec.targets)) for p in "ab"]


FAMILIES = {"prefix": Prefix, "prompt": Prompt, "lora": Lora}  # a family's name (Spec.family) -> its rules
