"""The bank export: many adapters of one base model and method in one graph, their tensors graph inputs.

``export_bank(out, adapter_dirs)`` writes OUT/ with model.onnx, bank.safetensors, adapters.json, the tokenizer and a
manifest. The graph takes input_ids, attention_mask, ``adapter_index`` (B,) and the bank tensors (bank/layout.py), and
gathers each row's adapter inside the graph:

- prefix / P-tuning v2: each layer's fused Attention node takes the row's prefix as its past (2, B, N, P, D), the
  same node the single-adapter export writes with a constant past;
- prompt tuning / P-tuning: the row's prompt (P, H) goes before its word embeddings;
- LoRA: each target projection adds the row's low-rank update, x @ A^T @ (B^T alpha / r), to the frozen base;
- every row goes through its adapter's classifier, padded to the bank's largest label set.

A bank of token classifiers (task TOKEN_CLS) also takes ``word_index`` (B, W) after attention_mask and returns
``emissions`` (B, W, C) at each word's first piece (as an emissions-only single export does): each token through its
row's head, the prompt family's virtual positions dropped. The adapters' CRFs stay out of the graph, in the bank file
(bank/layout.py), for the server to decode each row with; the gate decodes the same way and compares the paths with
each adapter's eager decode.

The parity gate serves every adapter's sentences through the bank in batches that mix adapters, with padding, and
compares each row with that adapter's eager PyTorch model; where an adapter folder sits in a run folder with its own
export (RUN/adapter, RUN/export/model.onnx), the rows are also compared with that graph.
"""

from __future__ import annotations

import copy
import json
import random
import shutil
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn
from transformers import AutoTokenizer

from adapters.config import load_config, run_config
from adapters.crf import decode_tags
from adapters.eager import bare_model, load_model, reference_model
from adapters.errors import EdgetuneError, ParityError
from adapters.methods import freeze
from adapters.model import base_model_path
from adapters.peft_io import load_adapter
from adapters.prefix import PrefixModel
from bank import layout
from export.attention import prefix_attention, register_prefix_attention
from export.graph import OPSET, optimize
from export.parity import DEFAULT_TOLERANCE, diff_bound, float64_copy
from export.prefix_op import export_prefix_op
from export.run import TOKENIZER_FILES, replace_folder
from text.words import first_pieces, viterbi
from text.words import word_index as word_index_of
from train.splits import dev_split, parity_texts
from train.staging import staging_dir
from train.tagging import gather_words

BANK_INPUTS = ("input_ids", "attention_mask", "adapter_index")
TAG_BANK_INPUTS = ("input_ids", "attention_mask", "word_index", "adapter_index")  # a tagging bank's
ROWS_PER_ADAPTER = 8  # parity sentences per adapter
BATCH_SIZES = (1, 8, 32)  # the gate's mixed batches, repeated over all rows


class RowHead(nn.Module):
    """Stands in for the classifier: each row through its own adapter's head (weight (B, H, C), bias (B, C)),
    set by BankGraph before each call."""

    weight: torch.Tensor
    bias: torch.Tensor

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, C); a tagger's (B, S, H) -> (B, S, C)
        if pooled.dim() == 3:
            return torch.matmul(pooled, self.weight) + self.bias.unsqueeze(1)
        return torch.matmul(pooled.unsqueeze(1), self.weight).squeeze(1) + self.bias


class RowPrefixAttention(nn.Module):
    """A BERT self-attention as one fused Attention node whose past (2, B, N, P, D), each row's own prefix, is set by
    BankGraph before each call."""

    past: torch.Tensor

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads = attn.num_attention_heads
        w = torch.cat([attn.query.weight.T, attn.key.weight.T, attn.value.weight.T], dim=1)  # (H, 3H)
        self.register_buffer("weight", w.detach().contiguous())
        self.register_buffer("bias", torch.cat([attn.query.bias, attn.key.bias, attn.value.bias]).detach())

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **_):
        mask = attention_mask[:, 0, 0, :].to(torch.int32)  # (B, P+S) from PrefixModel's (B, 1, 1, P+S)
        return prefix_attention(hidden_states, self.weight, self.bias, mask, self.past, self.num_heads), None


class RowLoRALinear(nn.Module):
    """A frozen Linear plus each row's low-rank update: y = x W^T + b + (x @ a) @ b_, a (B, in, r) and b_ (B, r, out)
    (alpha / r folded in), set by BankGraph before each call."""

    a: torch.Tensor
    b: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, in), or (B, in) in the pooler
        rows = x if x.dim() == 3 else x.unsqueeze(1)
        update = torch.matmul(torch.matmul(rows, self.a), self.b)
        return self.linear(x) + (update if x.dim() == 3 else update.squeeze(1))


class GatheredPrefix(nn.Module):
    """PrefixModel's prefix in the bank graph: the rows' gathered prefixes (only their length P is read there)."""

    kv_rows: list[tuple[torch.Tensor, torch.Tensor]]

    def kv(self, dtype=None):
        return self.kv_rows


class BankGraph(nn.Module):
    """forward(input_ids, attention_mask, adapter_index, head_weight, head_bias, *bank) -> logits (B, C): each row
    through the base model with its adapter's tensors (``names``: the bank inputs after the head's, in order) and its
    own classifier. A family's graph (GRAPHS) sets up the base model and gathers its tensors per row (``gather``)."""

    FUSED_ATTENTION = True  # onnxruntime still fuses every layer's attention into one Attention node

    def __init__(self, model: nn.Module, spec: layout.Spec, names: list[str]) -> None:
        super().__init__()
        self.base = copy.deepcopy(model)
        self.base.classifier = self.head = RowHead()
        self.names = names

    def forward(self, input_ids, attention_mask, adapter_index, head_weight, head_bias, *bank):
        self.head.weight = head_weight.index_select(0, adapter_index)  # (B, H, C)
        self.head.bias = head_bias.index_select(0, adapter_index)  # (B, C)
        rows = {name: t.index_select(0, adapter_index) for name, t in zip(self.names, bank, strict=True)}
        return self.gather(input_ids, attention_mask, rows)


class PrefixBankGraph(BankGraph):
    """Each layer's attention one fused Attention node whose past is the rows' prefixes, (2, B, N, P, D)."""

    def __init__(self, model: nn.Module, spec: layout.Spec, names: list[str]) -> None:
        super().__init__(model, spec, names)
        self.prefix = GatheredPrefix()
        self.layers = []
        for layer in self.base.base_model.encoder.layer:
            layer.attention.self = RowPrefixAttention(layer.attention.self)
            self.layers.append(layer.attention.self)
        self.model = PrefixModel(self.base, self.prefix, self.base.config.num_attention_heads).eval()

    def gather(self, input_ids, attention_mask, rows):
        pasts = [rows[f"prefix.{i}"].transpose(0, 1) for i in range(len(self.layers))]  # (2, B, N, P, D) each
        for attn, past in zip(self.layers, pasts, strict=True):
            attn.past = past
        self.prefix.kv_rows = [(past[0], past[1]) for past in pasts]
        return self.model(input_ids, attention_mask)


class PromptBankGraph(BankGraph):
    """The rows' prompts (B, P, H) before their word embeddings; transformers' own attention, which onnxruntime fuses."""

    def __init__(self, model: nn.Module, spec: layout.Spec, names: list[str]) -> None:
        super().__init__(model, spec, names)
        self.base.set_attn_implementation("eager")

    def gather(self, input_ids, attention_mask, rows):
        prompt = rows["prompt"]  # (B, P, H)
        embeds = torch.cat([prompt, self.base.base_model.embeddings.word_embeddings(input_ids)], dim=1)
        mask = torch.cat([torch.ones_like(attention_mask[:, :1]).expand(-1, prompt.shape[1]), attention_mask], dim=1)
        logits = self.base(inputs_embeds=embeds, attention_mask=mask).logits
        return logits[:, prompt.shape[1] :] if logits.dim() == 3 else logits  # a tagger: the real tokens only


class LoraBankGraph(BankGraph):
    """Each target projection with the rows' low-rank updates (RowLoRALinear)."""

    FUSED_ATTENTION = False  # the updates on the Q/K/V projections keep onnxruntime from fusing the attention

    def __init__(self, model: nn.Module, spec: layout.Spec, names: list[str]) -> None:
        super().__init__(model, spec, names)
        self.base.set_attn_implementation("eager")
        self.lora = []
        for path in spec.targets:
            parent, leaf = path.rsplit(".", 1)
            row = RowLoRALinear(self.base.get_submodule(path))
            setattr(self.base.get_submodule(parent), leaf, row)
            self.lora.append(row)

    def gather(self, input_ids, attention_mask, rows):
        for i, row in enumerate(self.lora):
            row.a, row.b = rows[f"lora_a.{i}"], rows[f"lora_b.{i}"]  # (B, in, r), (B, r, out)
        return self.base(input_ids=input_ids, attention_mask=attention_mask).logits


GRAPHS = {"prefix": PrefixBankGraph, "prompt": PromptBankGraph, "lora": LoraBankGraph}  # Spec.family -> its graph


class TagBankGraph(nn.Module):
    """forward(input_ids, attention_mask, word_index, adapter_index, head_weight, head_bias, *bank) -> emissions
    (B, W, C): a family's bank graph over token classifiers, at each word's first piece."""

    def __init__(self, inner: BankGraph) -> None:
        super().__init__()
        self.inner, self.names, self.FUSED_ATTENTION = inner, inner.names, inner.FUSED_ATTENTION

    def forward(self, input_ids, attention_mask, word_index, adapter_index, head_weight, head_bias, *bank):
        return gather_words(self.inner(input_ids, attention_mask, adapter_index, head_weight, head_bias, *bank), word_index)


def bank_graph(model: nn.Module, spec: layout.Spec) -> nn.Module:
    """The module to trace for a bank of ``spec``: its family's graph, for a tagging bank under TagBankGraph."""
    module = GRAPHS[spec.family](model, spec, layout.input_names(spec)[2:])
    return TagBankGraph(module) if spec.task == "TOKEN_CLS" else module


def trace_bank(module: nn.Module, tensors: dict[str, np.ndarray], path: Path, example_len: int = 16) -> None:
    """TorchScript-export the bank graph with dynamic batch, sequence, adapter, label and rank axes (and words, for a
    tagging bank)."""
    ids = torch.ones((2, example_len), dtype=torch.long)
    mask = torch.ones((2, example_len), dtype=torch.long)
    mask[1, example_len // 2 :] = 0
    index = torch.tensor([0, len(tensors["head_bias"]) - 1], dtype=torch.long)
    names = ["head_weight", "head_bias", *module.names]
    bank = [torch.from_numpy(tensors[n]) for n in names]
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "sequence"},
            "adapter_index": {0: "batch"}, "logits": {0: "batch", 1: "labels"},
            "head_weight": {0: "adapters", 2: "labels"}, "head_bias": {0: "adapters", 1: "labels"}}  # fmt: skip
    args, inputs, output = (ids, mask, index), list(BANK_INPUTS), "logits"
    if isinstance(module, TagBankGraph):
        words = torch.arange(1, example_len // 2 + 1).repeat(2, 1)
        args, inputs, output = (ids, mask, words, index), list(TAG_BANK_INPUTS), "emissions"
        axes["word_index"] = {0: "batch", 1: "words"}
        axes["emissions"] = {0: "batch", 1: "words", 2: "labels"}
        del axes["logits"]
    for n in module.names:  # each LoRA target's rank: the last axis of its A^T, the first of its B^T
        rank = {"lora_a": {2: f"rank{n[6:]}"}, "lora_b": {1: f"rank{n[6:]}"}}.get(n[:6], {})
        axes[n] = {0: "adapters", **rank}
    register_prefix_attention()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # TracerWarnings about shape-dependent Python control flow in transformers
        torch.onnx.export(
            module.eval(),
            (*args, *bank),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[*inputs, *names],
            output_names=[output],
            dynamic_axes=axes,
            do_constant_folding=True,
        )


def adapter_name(folder: Path) -> str:
    """An adapter's default name in the bank: its run's name for RUN/adapter, else its folder's name."""
    folder = folder.resolve()
    return folder.parent.name if folder.name == "adapter" else folder.name


def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    """``NAME=DIR`` or ``DIR`` (named by adapter_name) -> (name, folder); names checked and unique."""
    out = []
    for s in specs:
        name, _, folder = s.rpartition("=") if "=" in s else ("", "", s)
        folder_path = Path(folder)
        out.append((layout.check_name(name or adapter_name(folder_path)), folder_path))
    seen = [n for n, _ in out]
    dup = sorted({n for n in seen if seen.count(n) > 1})
    if dup:
        raise EdgetuneError(f"two adapters are named {dup[0]!r}: name them NAME=DIR")
    return out


def adapter_config(folder: Path, data: str, tagging: bool = False):
    """The run config an adapter's gate sentences and max_length come from: its run's (RUN/config.yaml beside
    RUN/adapter), else the defaults with ``data`` (for a tagger: task=tagging, data ``data`` or wnut16)."""
    run = folder.resolve().parent
    if folder.resolve().name == "adapter" and (run / "config.yaml").is_file():
        return run_config(run)
    if tagging:
        return load_config(None, ["task=tagging", f"data={data or 'wnut16'}"])
    return load_config(None, [f"data={data}"] if data else [])


def with_head(model: nn.Module, labels: int) -> nn.Module:
    """A copy of ``model`` with a fresh classifier for ``labels`` classes."""
    out = copy.deepcopy(model)
    out.classifier = nn.Linear(model.config.hidden_size, labels)
    return out


def own_export(folder: Path) -> Path | None:
    graph = folder.resolve().parent / "export" / "model.onnx"
    return graph if folder.resolve().name == "adapter" and graph.is_file() else None


@torch.inference_mode()
def check_bank_parity(session, bank, refs, rows, tok, max_length, tolerance=None, seed=0) -> dict:
    """Serve ``rows`` ((adapter slot, text) pairs, shuffled so that batches mix adapters) through the bank graph
    (``bank``: its bank tensors) and
    compare each row's logits with its adapter's eager model (``refs[slot]``: eager, float64 copy, bare base with
    the same head, own export session or None, label count).

    Raises:
        ParityError: a row differs by more than the tolerance (default: the larger of 1e-4 and this machine's fp32
            bound), an argmax differs, or an adapter changes its rows' logits by less than 10x the tolerance.
    """
    order = list(rows)
    random.Random(seed).shuffle(order)
    diffs, ref_errs, own = [], [], []
    scale, agree, n = 0.0, 0, 0
    effect = [0.0] * len(refs)
    start, sizes = 0, []
    while start < len(order):
        size = BATCH_SIZES[len(sizes) % len(BATCH_SIZES)]
        batch = order[start : start + size]
        start += size
        sizes.append(len(batch))
        enc = tok([t for _, t in batch], padding=True, truncation=True, max_length=max_length, return_tensors="np")
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        index = np.asarray([a for a, _ in batch], np.int64)
        out = session.run(["logits"], {**bank, "input_ids": ids, "attention_mask": mask, "adapter_index": index})[0]
        for r, (a, _) in enumerate(batch):
            eager, exact, bare, single, labels = refs[a]
            ti, tm = torch.from_numpy(ids[r : r + 1]), torch.from_numpy(mask[r : r + 1])
            keep = int(tm.sum())  # each row alone, unpadded: what the eager model gives it
            ti, tm = ti[:, :keep], tm[:, :keep]
            ref = eager(ti, tm).float().numpy()[0]
            x = exact(ti, tm).numpy()[0]
            got = out[r, :labels]
            diffs.append(float(np.abs(got - ref).max()))
            ref_errs.append(float(np.abs(ref - x).max()))
            scale = max(scale, float(np.abs(x).max()))
            agree += int(got.argmax() == ref.argmax())
            effect[a] = max(effect[a], float(np.abs(ref - bare(ti, tm).float().numpy()[0]).max()))
            if single is not None:
                theirs = single.run(["logits"], {"input_ids": ids[r : r + 1, :keep], "attention_mask": mask[r : r + 1, :keep]})
                own.append(float(np.abs(got - theirs[0][0]).max()))
            n += 1
    if tolerance is None:
        tolerance = max(DEFAULT_TOLERANCE, diff_bound(max(ref_errs), scale))
    result = {
        "max_abs_diff": max(diffs),
        "argmax_agree": agree / n,
        "n_samples": n,
        "batch_sizes": sizes,
        "adapters": len(refs),
        "min_adapter_effect": min(effect),
        "tolerance": tolerance,
        "reference_error": max(ref_errs),
        "scale": scale,
        "provider": session.get_providers()[0],
        "max_abs_diff_vs_own_export": max(own) if own else None,
        "own_exports_compared": sum(r[3] is not None for r in refs),
    }
    if not result["max_abs_diff"] <= tolerance:
        raise ParityError(
            f"bank parity gate failed: a row's logits differ from its adapter's eager PyTorch model by "
            f"{result['max_abs_diff']:.3g} (tolerance {tolerance:g}); the bank is not kept"
        )
    if agree < n:
        raise ParityError(f"bank parity gate failed: predicted class differs on {n - agree} of {n} rows; the bank is not kept")
    weakest = int(np.argmin(effect))
    if effect[weakest] < 10 * tolerance:
        raise ParityError(
            f"bank parity gate failed: adapter {weakest} changes its rows' logits by only {effect[weakest]:.3g}, too "
            "little to check that the bank applies it (is it trained?)"
        )
    return result


@torch.inference_mode()
def check_bank_tagging_parity(session, bank, refs, rows, tok, max_length, tolerance=None, seed=0) -> dict:
    """check_bank_parity for a tagging bank: ``rows`` are (adapter slot, words) pairs, ``refs[slot]`` (eager, float64
    copy, bare, own export session or None, tag count); each row's emissions at its words' first pieces against its
    adapter's eager model (alone, unpadded), and its path (Viterbi with layout.crf_of, as the server decodes) against
    the eager decode (its CRF's Viterbi, or the argmax).

    Raises:
        ParityError: emissions differ by more than the tolerance, a decoded path differs, or an adapter changes its
            rows' emissions by less than 10x the tolerance.
    """
    order = list(rows)
    random.Random(seed).shuffle(order)
    graph_inputs = {i.name for i in session.get_inputs()}
    feeds_bank = {k: v for k, v in bank.items() if k in graph_inputs}
    diffs, ref_errs, own = [], [], []
    scale, agree, n = 0.0, 0, 0
    effect = [0.0] * len(refs)
    start, sizes = 0, []
    while start < len(order):
        size = BATCH_SIZES[len(sizes) % len(BATCH_SIZES)]
        batch = order[start : start + size]
        start += size
        sizes.append(len(batch))
        enc = tok([w for _, w in batch], is_split_into_words=True, padding=True, truncation=True, max_length=max_length,
                  return_tensors="np")  # fmt: skip
        positions = [first_pieces(enc.word_ids(i))[0] for i in range(len(batch))]
        index_words, mask_words = word_index_of(positions)
        ids, mask = enc["input_ids"].astype(np.int64), enc["attention_mask"].astype(np.int64)
        index = np.asarray([a for a, _ in batch], np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "word_index": index_words, "adapter_index": index}
        out = session.run(["emissions"], {**feeds_bank, **feeds})[0]
        for r, (a, _) in enumerate(batch):
            eager, exact, bare, single, labels = refs[a]
            words = len(positions[r])
            keep = int(mask[r].sum())  # each row alone, unpadded: what the eager model gives it
            ti, tm = torch.from_numpy(ids[r : r + 1, :keep]), torch.from_numpy(mask[r : r + 1, :keep])
            wi = torch.from_numpy(index_words[r : r + 1, :words])
            ref = gather_words(eager(ti, tm).float(), wi)  # (1, n, C)
            x = gather_words(exact(ti, tm), wi).numpy()[0]
            got = out[r, :words, :labels]
            diffs.append(float(np.abs(got - ref.numpy()[0]).max(initial=0.0)))
            ref_errs.append(float(np.abs(ref.numpy()[0] - x).max(initial=0.0)))
            scale = max(scale, float(np.abs(x).max(initial=0.0)))
            want = decode_tags(eager.crf, ref, torch.ones((1, words), dtype=torch.bool))[0].tolist()
            agree += int(viterbi(got.astype(np.float64), words, *layout.crf_of(bank, a, labels)) == want)
            base = gather_words(bare(ti, tm).float(), wi).numpy()[0]
            effect[a] = max(effect[a], float(np.abs(ref.numpy()[0] - base).max(initial=0.0)))
            if single is not None:
                single_feeds = {"input_ids": ids[r : r + 1, :keep], "attention_mask": mask[r : r + 1, :keep],
                                "word_index": index_words[r : r + 1, :words],
                                "word_mask": mask_words[r : r + 1, :words]}  # fmt: skip
                names = {i.name for i in single.get_inputs()}
                theirs = single.run(["emissions"], {k: v for k, v in single_feeds.items() if k in names})[0][0]
                own.append(float(np.abs(got - theirs).max(initial=0.0)))
            n += 1
    if tolerance is None:
        tolerance = max(DEFAULT_TOLERANCE, diff_bound(max(ref_errs), scale))
    result = {
        "max_abs_diff": max(diffs),
        "paths_agree": agree / n,
        "n_samples": n,
        "batch_sizes": sizes,
        "adapters": len(refs),
        "min_adapter_effect": min(effect),
        "tolerance": tolerance,
        "reference_error": max(ref_errs),
        "scale": scale,
        "provider": session.get_providers()[0],
        "max_abs_diff_vs_own_export": max(own) if own else None,
        "own_exports_compared": sum(r[3] is not None for r in refs),
    }
    if not result["max_abs_diff"] <= tolerance:
        raise ParityError(
            f"bank parity gate failed: a row's emissions differ from its adapter's eager PyTorch model by "
            f"{result['max_abs_diff']:.3g} (tolerance {tolerance:g}); the bank is not kept"
        )
    if agree < n:
        raise ParityError(f"bank parity gate failed: the decoded tags differ on {n - agree} of {n} rows; the bank is not kept")
    weakest = int(np.argmin(effect))
    if effect[weakest] < 10 * tolerance:
        raise ParityError(
            f"bank parity gate failed: adapter {weakest} changes its rows' emissions by only {effect[weakest]:.3g}, too "
            "little to check that the bank applies it (is it trained?)"
        )
    return result


def _linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    return {p: (m.in_features, m.out_features) for p, m in model.named_modules() if isinstance(m, nn.Linear)}


def export_bank(
    out: Path, adapter_specs: list[str], base_model: str = "", data: str = "", tolerance: float | None = None
) -> dict:
    """Build the bank of the adapters ``adapter_specs`` (``NAME=DIR`` or ``DIR``) into ``out``, through the bank
    parity gate. Returns the manifest. Raises EdgetuneError subclasses; on failure nothing is left at ``out``."""
    t0 = time.perf_counter()
    try:
        named = parse_adapters(adapter_specs)
        peft = [layout.read_peft(folder) for _, folder in named]
    except layout.BankError as e:
        raise EdgetuneError(str(e)) from None
    adapters = [load_adapter(folder) for _, folder in named]
    base_name = base_model or adapters[0].config.get("base_model_name_or_path") or ""
    if base_name and not base_model and not Path(base_name).is_dir():
        raise EdgetuneError(f"the adapters' base model {base_name!r} is not a folder here (offline): pass --base-model DIR")
    base_path = base_model_path(base_name)
    model = load_model(base_path, adapters[0])  # the base model, loaded once
    c = model.config
    try:
        spec = layout.spec_of(peft, c.num_hidden_layers, c.num_attention_heads, c.hidden_size, _linear_shapes(model))
    except layout.BankError as e:
        raise EdgetuneError(str(e)) from None
    tensors = layout.stack([layout.slot(spec, a) for a in peft])
    tagging = spec.task == "TOKEN_CLS"
    module = bank_graph(model, spec)
    max_length = adapter_config(named[0][1], data, tagging).max_length
    tok = AutoTokenizer.from_pretrained(base_path)

    refs, rows = [], []
    for slot, ((_, folder), adapter) in enumerate(zip(named, adapters, strict=True)):
        own = with_head(model, len(adapter.label_names))
        frozen = freeze(adapter, own)
        bare = bare_model(own, frozen)  # the pretrained base under the adapter's head
        eager = reference_model(own, adapter, frozen)
        single = own_export(folder)
        session = ort.InferenceSession(str(single), providers=["CPUExecutionProvider"]) if single else None
        refs.append((eager, float64_copy(eager), bare, session, len(adapter.label_names)))
        cfg = adapter_config(folder, data, tagging)
        if tagging:  # real sentences, as words
            rows += [(slot, list(words)) for words in list(dev_split(cfg).tokens)[:ROWS_PER_ADAPTER]]
        else:
            rows += [(slot, t) for t in parity_texts(cfg, ROWS_PER_ADAPTER)]
    gate = check_bank_tagging_parity if tagging else check_bank_parity

    with staging_dir(out.parent, f".{out.name}.") as tmp:
        trace_bank(module, tensors, tmp / "raw.onnx")
        expected = {"SkipLayerNormalization": 2 * c.num_hidden_layers - 1}
        if module.FUSED_ATTENTION:
            expected["Attention"] = c.num_hidden_layers
        fused = optimize(tmp / "raw.onnx", tmp / "model.onnx", c.num_attention_heads, c.hidden_size, expected)
        (tmp / "raw.onnx").unlink()
        session = ort.InferenceSession(str(tmp / "model.onnx"), providers=["CPUExecutionProvider"])
        parity = gate(session, tensors, refs, rows, tok, max_length, tolerance)
        prefix_op = None
        if isinstance(module, PrefixBankGraph):  # each row's prefix into edgetune.PrefixAttention (kernels/ort/), same gate
            prefix_op = export_prefix_op(
                tmp, None, lambda s: check_bank_parity(s, tensors, refs, rows, tok, max_length, tolerance)
            )
        entries = [layout.Entry(name, a.labels, a.sha256, str(folder)) for (name, folder), a in zip(named, peft, strict=True)]
        layout.write(tmp, spec, entries, tensors)
        for name in TOKENIZER_FILES:
            if (base_path / name).is_file():
                shutil.copy2(base_path / name, tmp / name)
        virtual = spec.virtual_tokens
        manifest = {
            "kind": "bank",
            "method": spec.family,
            "task": "token-classification" if tagging else "sequence-classification",
            "spec": spec.to_dict(),
            "base_model": str(base_path),
            "adapters": [e.name for e in entries],
            "inputs": [i.name for i in session.get_inputs()],
            "outputs": ["emissions" if tagging else "logits"],
            "decode": (["crf" if a.crf is not None else "argmax" for a in peft] if tagging else None),
            "max_length": max_length,
            "max_positions": c.max_position_embeddings - virtual,
            "num_virtual_tokens": virtual,
            "opset": OPSET,
            "fused_ops": fused,
            "onnxruntime_version": ort.__version__,
            "torch_version": torch.__version__,
            "parity": parity,
            "prefix_op": prefix_op,
            "export_seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
        replace_folder(tmp, out)
    return manifest
