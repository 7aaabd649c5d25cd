"""The model repository: every export folder directly under one directory, each served by name, loaded, reloaded and
unloaded at run time without dropping a request.

A name is a folder directly under the repository directory that holds an export manifest; nothing else can be named
(no paths, no links out of it). An export folder is read through serve.runtime, which opens only ``.onnx``, ``.json``
and tokenizer files (no pickle). A reload loads the new model beside the old one and swaps it in once it is ready;
requests admitted before the swap finish on the old model, whose worker stops when the last of them has.
"""

from __future__ import annotations

import asyncio
import logging
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path

from serve.bank import Adapter, BankClassifier, BankTagger
from serve.batching import Limits, Scheduler
from serve.errors import ApiError
from serve.metrics import Metrics
from serve.runtime import Classifier, ServeError, read_json
from serve.tags import Tagger

log = logging.getLogger("edgetune.serve")
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ModelOptions:
    """How every model of the repository is loaded (``python -m serve`` flags)."""

    providers: str = "auto"
    precision: str = "auto"
    tf32: bool = False
    kernels: str | None = None
    max_length: int | None = None
    threads: int = 0  # onnxruntime intra-op threads per session; 0 = onnxruntime's default (all cores)
    max_rows: int = 32  # the largest batch (the CUDA path's largest bucket)
    cuda_graphs: bool = True  # CUDA provider: replay each bucket from a CUDA graph
    spin: str = "run"  # how onnxruntime's threads wait between runs (serve.runtime.SPIN)

    def load(self, folder: Path) -> Classifier:
        return load_model(
            folder, providers=self.providers, max_length=self.max_length, precision=self.precision, tf32=self.tf32,
            kernels=self.kernels, threads=self.threads, max_rows=self.max_rows, cuda_graphs=self.cuda_graphs,
            spin=self.spin,
        )  # fmt: skip


@dataclass
class Entry:
    """A loaded model and its scheduler; ``in_flight`` counts the requests admitted to it."""

    name: str
    folder: Path
    model: Classifier
    scheduler: Scheduler
    in_flight: int = 0
    retired: bool = False

    def retire(self) -> None:
        self.retired = True
        if self.in_flight == 0:
            _close_later(self.scheduler)


@dataclass
class Repository:
    root: Path | None  # None: one export served by itself (--export)
    options: ModelOptions
    limits: Limits
    metrics: Metrics
    single: Path | None = None
    single_name: str = ""
    entries: dict[str, Entry] = field(default_factory=dict)
    failures: dict[str, str] = field(default_factory=dict)  # name -> why it did not load
    lock: threading.Lock = field(default_factory=threading.Lock)  # one session run at a time on the shared cores
    _loading: dict[str, asyncio.Lock] = field(default_factory=dict)

    # names and folders

    def names(self) -> list[str]:
        """Every model this repository can serve: the subfolders holding a manifest (or the single export)."""
        if self.root is None:
            return [self.single_name]
        return sorted(p.name for p in self.root.iterdir() if NAME.fullmatch(p.name) and (p / MANIFEST).is_file())

    def folder(self, name: str) -> Path:
        """The export folder a model name stands for; ApiError if the name is not one this repository serves."""
        if self.root is None:
            if name != self.single_name:
                raise ApiError("not_found", f"unknown model {name!r}; this server serves {self.single_name!r} only")
            return self.single
        if not NAME.fullmatch(name):
            raise ApiError("not_found", f"unknown model {name!r}: a model is named by a folder directly under the repository")
        folder = self.root / name
        try:
            inside = folder.resolve().parent == self.root.resolve()
        except OSError:
            inside = False
        if not inside or not (folder / MANIFEST).is_file():
            raise ApiError("not_found", f"unknown model {name!r}: no export folder {name}/ with a {MANIFEST} in the repository")
        return folder

    # load, reload, unload

    def load_all(self) -> None:
        """Load every model at start; a folder that fails is logged and reported, and the others serve."""
        for name in self.names():
            try:
                self._install(name, self.options.load(self.folder(name)))
            except ServeError as e:
                self._failed(name, str(e))

    async def load(self, name: str) -> None:
        """Load (or reload) a model; the old one serves until the new one is ready."""
        folder = self.folder(name)
        async with self._loading.setdefault(name, asyncio.Lock()):
            try:
                model = await asyncio.to_thread(self.options.load, folder)
            except ServeError as e:
                self._failed(name, str(e))
                raise ApiError("validation", f"model {name!r} failed to load: {e}") from None
            self._install(name, model)

    async def unload(self, name: str) -> None:
        self.folder(name)
        async with self._loading.setdefault(name, asyncio.Lock()):
            entry = self.entries.pop(name, None)
            self.failures.pop(name, None)
            self.metrics.model_ready.labels(name).set(0)
            if entry is None:
                raise ApiError("validation", f"model {name!r} is not loaded")
            entry.retire()

    def _install(self, name: str, model: Classifier) -> None:
        scheduler = Scheduler(name, model.rows, model.run, self.limits, self.lock, self.metrics)
        self.metrics.queue_depth.labels(name).set_function(scheduler.depth)
        old = self.entries.get(name)
        self.entries[name] = Entry(name, model.export_dir, model, scheduler)
        self.failures.pop(name, None)
        self.metrics.model_ready.labels(name).set(1)
        log.info("model %s: %s (%s, %d labels) on %s", name, model.export_dir, model.manifest.get("method"),
                 len(model.labels), model.provider)  # fmt: skip
        if old is not None:
            old.retire()

    def _failed(self, name: str, reason: str) -> None:
        self.failures[name] = reason
        self.metrics.model_ready.labels(name).set(0)
        log.error("model %s did not load: %s", name, reason)

    # requests

    def get(self, name: str | None) -> Entry:
        """The entry a request names (or the only one); ApiError if there is none to serve it."""
        if name is None:
            if len(self.entries) == 1:
                return next(iter(self.entries.values()))
            if not self.entries:
                raise ApiError("unavailable", "no model is loaded")
            raise ApiError("validation", f'several models are served; name one with "model": {", ".join(sorted(self.entries))}')
        if name in self.entries:
            return self.entries[name]
        self.folder(name)  # unknown names: 404
        reason = self.failures.get(name)
        raise ApiError("unavailable", f"model {name!r} is not loaded" + (f": {reason}" if reason else ""))

    def target(self, name: str | None) -> tuple[Entry, Adapter | None]:
        """The entry a request names and, for a bank, the adapter: a bank's adapters are named "BANK/ADAPTER"."""
        bank, _, adapter = (name or "").partition("/")
        entry = self.entries.get(bank) if adapter else None
        if entry is None or not isinstance(entry.model, BankClassifier):  # a model's own name
            entry = self.get(name)
            if isinstance(entry.model, BankClassifier):
                few = ", ".join(f"{entry.name}/{n}" for n in entry.model.names[:3])
                raise ApiError("validation", f"model {entry.name!r} is a bank of adapters: name one ({few}, ...)")
            return entry, None
        try:
            return entry, entry.model.adapter(adapter)
        except KeyError:
            raise ApiError("not_found", f"bank {bank!r} has no adapter {adapter!r} ({len(entry.model.names)} adapters)") from None

    def bank(self, name: str) -> BankClassifier:
        """The loaded bank called ``name``; ApiError if it is not one."""
        model = self.get(name).model
        if not isinstance(model, BankClassifier):
            raise ApiError("validation", f"model {name!r} is not a bank of adapters")
        return model

    def overloaded(self, entry: Entry) -> ApiError:
        """The 429 for a model at its limit (counted)."""
        self.metrics.overloaded.labels(entry.name).inc()
        return overload_error(entry)

    def acquire(self, entry: Entry, max_in_flight: int) -> None:
        if entry.in_flight >= max_in_flight:
            raise self.overloaded(entry)
        entry.in_flight += 1
        self.metrics.in_flight.labels(entry.name).inc()

    def release(self, entry: Entry) -> None:
        entry.in_flight -= 1
        self.metrics.in_flight.labels(entry.name).dec()
        if entry.retired and entry.in_flight == 0:
            _close_later(entry.scheduler)

    def index(self) -> list[dict]:
        """The repository extension's index: every model, its state, and why it is not ready."""
        out = []
        for name in sorted(set(self.names()) | set(self.entries) | set(self.failures)):
            if name in self.entries:
                out.append({"name": name, "version": "1", "state": "READY"})
                model = self.entries[name].model
                if isinstance(model, BankClassifier):  # and each of its adapters
                    out += [{"name": f"{name}/{a}", "version": "1", "state": "READY"} for a in model.names]
            else:
                reason = self.failures.get(name, "not loaded")
                out.append({"name": name, "version": "1", "state": "UNAVAILABLE", "reason": reason})
        return out

    def close(self) -> None:
        for entry in self.entries.values():
            entry.scheduler.close()


def _close_later(scheduler: Scheduler) -> None:
    threading.Thread(target=scheduler.close, name=f"close-{scheduler.name}", daemon=True).start()


def load_model(export_dir: str | Path, **kw) -> Classifier:
    """The right runtime for an export folder: a Classifier, a Tagger for a token-classification export, a
    BankClassifier for a bank (a BankTagger for a bank of token classifiers)."""
    manifest = Path(export_dir) / "manifest.json"
    meta = read_json(manifest) if manifest.is_file() else {}
    if meta.get("kind") == "bank":
        return (BankTagger if meta.get("task") == "token-classification" else BankClassifier)(export_dir, **kw)
    if meta.get("task") == "token-classification":
        return Tagger(export_dir, **kw)
    return Classifier(export_dir, **kw)


def overload_error(entry: Entry) -> ApiError:
    """The 429 for a model at its limit (not counted)."""
    return ApiError(
        "overloaded", f"model {entry.name!r} is overloaded: {entry.in_flight} requests in flight", headers={"Retry-After": "1"}
    )
