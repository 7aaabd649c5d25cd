"""A bank export served: every adapter in it by name, rows of any adapters in one batch, adapters added, replaced and
removed while it serves.

The bank's tensors (bank/layout.py) are graph inputs. What a request runs with is a snapshot, ``BankState``: the
tensors and the adapters, never changed once made. A change builds the next snapshot beside the current one and swaps
it in; rows already queued keep the snapshot (and so the weights and labels) they were admitted with, and a batch
whose rows hold two snapshots runs once per snapshot. Each change is written to the bank folder (renamed into place)
before it is swapped in, so a restarted server serves what the running one did.

A bank of token classifiers (manifest task token-classification) is served by ``BankTagger``: it answers as
serve/tags.Tagger does (words, tags, entities), each row with its adapter's tag names, decoded here from the graph's
emissions with its adapter's CRF from the bank file (bank/layout.crf_of), which the session is never fed.
"""

from __future__ import annotations

import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bank import layout
from serve.runtime import Classifier, Row, ServeError
from serve.tags import Tagger
from text.words import viterbi

UPLOAD_FILES = (layout.PEFT_CONFIG, layout.PEFT_WEIGHTS, layout.LABELS, layout.CRF_WEIGHTS)


@dataclass(frozen=True)
class BankState:
    """One version of the bank: its adapters in slot order and the graph's bank inputs, as arrays and as the
    session's inputs (OrtValues on the session's device: on the CUDA provider they are copied there once, not on
    every run; on the CPU they share the arrays' memory)."""

    spec: layout.Spec
    entries: tuple[layout.Entry, ...]
    tensors: dict[str, np.ndarray]
    device: str = "cpu"
    values: dict[str, ort.OrtValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        graph = layout.input_names(self.spec)  # a tagging bank's CRFs stay arrays: the server decodes with them
        values = {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(self.tensors[k]), self.device, 0) for k in graph}
        object.__setattr__(self, "values", values)

    def slot(self, name: str) -> int | None:
        return next((i for i, e in enumerate(self.entries) if e.name == name), None)


@dataclass(frozen=True, eq=False)
class Adapter:
    """What a bank request runs with: an adapter's slot and labels in one state of the bank."""

    name: str
    slot: int
    labels: list[str]
    state: BankState


class BankClassifier(Classifier):
    """A bank export folder (manifest kind "bank"): ``adapter(name)`` is what a request names; rows carry it."""

    FILES = ("tokenizer.json", "manifest.json", layout.FILE)
    BUCKETS = False  # the CUDA path runs the session directly

    def __init__(self, export_dir: str | Path, **kw) -> None:
        super().__init__(export_dir, **kw)
        if self.device != self.state.device:  # read before the session existed: now on its device
            state = self.state
            self.state = BankState(state.spec, state.entries, state.tensors, self.device)

    @property
    def device(self) -> str:
        """Where the bank's tensors live: on the GPU when the session runs on the CUDA provider."""
        return "cuda" if getattr(self, "session", None) and self.provider == "CUDAExecutionProvider" else "cpu"

    def read_labels(self, d: Path) -> list[str]:
        try:
            spec, entries, tensors = layout.read(d)
        except layout.BankError as e:
            raise ServeError(str(e)) from None
        self.state = BankState(spec, tuple(entries), tensors, self.device)
        self._change = threading.Lock()  # one change at a time
        return []  # each adapter has its own (labels_of)

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.state.entries]

    def adapter(self, name: str) -> Adapter:
        """The adapter called ``name`` in the current state; KeyError if the bank has none."""
        state = self.state
        slot = state.slot(name)
        if slot is None:
            raise KeyError(name)
        return Adapter(name, slot, state.entries[slot].labels, state)

    def labels_of(self, row: Row) -> list[str]:
        return row.adapter.labels

    def run(self, rows: list[Row]) -> list[np.ndarray]:
        """One session run per bank state among the rows (one, but while the bank changes): each row's logits over
        its adapter's labels."""
        out: list[np.ndarray | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if not isinstance(row.adapter, Adapter):
                raise ServeError("a bank row without an adapter")
            groups.setdefault(id(row.adapter.state), []).append(i)
        for members in groups.values():
            state = rows[members[0]].adapter.state
            feeds = self.feeds([rows[i] for i in members])
            feeds["adapter_index"] = np.asarray([rows[i].adapter.slot for i in members], np.int64)
            logits = self.session_run(["logits"], {**state.values, **feeds})[0]
            for i, row_logits in zip(members, logits, strict=True):
                out[i] = row_logits[: len(rows[i].adapter.labels)]
        return out

    # changes

    def add(self, name: str, folder: str | Path, source: str = "") -> layout.Entry:
        """Add the PEFT adapter folder ``folder`` as ``name``, or replace the adapter of that name.

        Raises:
            ServeError: the name is not valid, or the adapter does not fit the bank (another method, base model,
                prefix length, layer count or hidden size; tensors not finite; labels not named right).
        """
        try:
            layout.check_name(name)
            adapter = layout.read_peft(folder)
            layout.check(self.state.spec, adapter)
            slot = layout.slot(self.state.spec, adapter)
        except layout.BankError as e:
            raise ServeError(f"adapter {name!r}: {e}") from None
        entry = layout.Entry(name, adapter.labels, adapter.sha256, source or str(folder))
        with self._change:
            old = self.state
            slots = self._slots(old)
            entries = list(old.entries)
            at = old.slot(name)
            if at is None:
                slots.append(slot)
                entries.append(entry)
            else:
                slots[at], entries[at] = slot, entry
            self._swap(BankState(old.spec, tuple(entries), layout.stack(slots), self.device))
        return entry

    def add_files(self, name: str, files: dict[str, bytes]) -> layout.Entry:
        """Add an uploaded adapter: its files by name (adapter_config.json, adapter_model.safetensors, labels.json)."""
        unknown = sorted(set(files) - set(UPLOAD_FILES))
        if unknown:
            raise ServeError(f"adapter {name!r}: upload files named {', '.join(UPLOAD_FILES)}, not {', '.join(unknown)}")
        with tempfile.TemporaryDirectory(prefix="edgetune-adapter-") as tmp:
            for file, data in files.items():
                (Path(tmp) / file).write_bytes(data)
            return self.add(name, tmp, "upload")

    def remove(self, name: str) -> None:
        """Remove the adapter ``name``. Raises KeyError if there is none, ServeError for the last one."""
        with self._change:
            old = self.state
            at = old.slot(name)
            if at is None:
                raise KeyError(name)
            if len(old.entries) == 1:
                raise ServeError(f"adapter {name!r} is the bank's last: unload the bank instead")
            slots = self._slots(old)
            del slots[at]
            entries = [e for i, e in enumerate(old.entries) if i != at]
            self._swap(BankState(old.spec, tuple(entries), layout.stack(slots), self.device))

    @staticmethod
    def _slots(state: BankState) -> list[dict[str, np.ndarray]]:
        return [{k: v[i] for k, v in state.tensors.items()} for i in range(len(state.entries))]

    def _swap(self, state: BankState) -> None:
        layout.write(self.export_dir, state.spec, list(state.entries), state.tensors)
        self.state = state


class BankTagger(BankClassifier, Tagger):
    """A tagging bank export folder (manifest kind "bank", task token-classification): rows are split into words as
    for a Tagger, and each row's emissions are decoded with its adapter's CRF (or argmax) over its own tags."""

    def run(self, rows: list[Row]) -> list[list[int]]:
        """One session run per bank state among the rows: each row's tag ids, one per kept word."""
        out: list[list[int] | None] = [None] * len(rows)
        groups: dict[int, list[int]] = {}
        for i, row in enumerate(rows):
            if not isinstance(row.adapter, Adapter):
                raise ServeError("a bank row without an adapter")
            groups.setdefault(id(row.adapter.state), []).append(i)
        for members in groups.values():
            state = rows[members[0]].adapter.state
            feeds = self.feeds([rows[i] for i in members])
            feeds["adapter_index"] = np.asarray([rows[i].adapter.slot for i in members], np.int64)
            emissions = self.session_run(["emissions"], {**state.values, **feeds})[0]
            for i, row_emissions in zip(members, emissions, strict=True):
                row = rows[i]
                tags = len(row.adapter.labels)
                crf = layout.crf_of(state.tensors, row.adapter.slot, tags)
                out[i] = viterbi(row_emissions[: len(row.kept), :tags].astype(np.float64), len(row.kept), *crf)
        return out
