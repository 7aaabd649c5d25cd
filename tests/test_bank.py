"""The bank export: many PEFT adapters of one base model in one graph, each row through its own adapter.

Adapters here are written by the peft library itself (random trainable tensors, different label sets) on the tiny
BERT; the gate's sentences are real dev sentences.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, TaskType

from adapters.errors import EdgetuneError, ParityError
from adapters.prefix import split_prefix_table
from bank import layout
from export import bank as bank_export
from export.run import export_run
from tests.helpers import TAGS, random_peft_adapter, tagging_adapters
from text.words import viterbi

CLS = TaskType.SEQ_CLS
FAMILIES = {
    "prefix": [PrefixTuningConfig(task_type=CLS, num_virtual_tokens=5)] * 3,
    "prompt": [PromptTuningConfig(task_type=CLS, num_virtual_tokens=4),
               PromptEncoderConfig(task_type=CLS, num_virtual_tokens=4, encoder_hidden_size=16),
               PromptTuningConfig(task_type=CLS, num_virtual_tokens=4)],
    "lora": [LoraConfig(task_type=CLS, r=4, lora_alpha=8, target_modules=["query", "value"]),
             LoraConfig(task_type=CLS, r=2, lora_alpha=4, target_modules=["query", "dense"]),
             LoraConfig(task_type=CLS, r=8, lora_alpha=8, target_modules=["value"])],
}  # fmt: skip
LABELS = (3, 5, 7)  # each adapter its own label set: the bank pads the heads


def _adapters(root, tiny_bert, family):
    """Three PEFT adapters of ``family``, each in a run-like folder NAME/adapter."""
    out = []
    for i, (config, labels) in enumerate(zip(FAMILIES[family], LABELS, strict=True)):
        folder = root / f"{family}{i}" / "adapter"
        random_peft_adapter(tiny_bert, config, folder, num_labels=labels, seed=i)
        (folder / "labels.json").write_text(json.dumps([f"{family}{i}-{k}" for k in range(labels)]))
        out.append(folder)
    return out


@pytest.fixture(scope="module", params=list(FAMILIES))
def bank(request, tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp(f"bank_{request.param}")
    folders = _adapters(root, tiny_bert, request.param)
    export_run(folders[0].parent, str(tiny_bert), int8=False, adapter_dir=folders[0], data="banking77", fp16=False, triton=False)
    manifest = bank_export.export_bank(root / "bank", [str(f) for f in folders], str(tiny_bert))
    return root / "bank", manifest, folders


def test_every_row_matches_its_adapter(bank):
    """Rows of all adapters, mixed in padded batches, equal each adapter's eager model and its own export."""
    out, manifest, folders = bank
    p = manifest["parity"]
    assert p["adapters"] == 3 and p["argmax_agree"] == 1.0
    assert p["max_abs_diff"] <= 1e-4
    assert max(p["batch_sizes"]) > 1 and p["n_samples"] == 3 * bank_export.ROWS_PER_ADAPTER
    assert p["own_exports_compared"] == 1 and p["max_abs_diff_vs_own_export"] <= 1e-4
    assert p["min_adapter_effect"] > 10 * p["tolerance"]
    if manifest["method"] == "prefix":  # the rows' prefixes into edgetune.PrefixAttention, through the same gate
        op = manifest["prefix_op"]
        assert op["nodes"] == 2 and op["parity"]["max_abs_diff"] <= 1e-4 and (out / op["file"]).is_file()
    else:
        assert manifest["prefix_op"] is None
    _, entries, tensors = layout.read(out, layout.Spec.from_dict(manifest["spec"]))
    assert [e.name for e in entries] == [f.parent.name for f in folders]
    assert [len(e.labels) for e in entries] == list(LABELS) and tensors["head_bias"].shape == (3, max(LABELS))


def test_a_row_given_another_adapter_fails_the_gate(bank, tiny_bert):
    """The gate tells adapters apart: with two adapters' prefixes (prompts, LoRA pairs) swapped in the bank, their
    heads left in place, it refuses the bank."""
    from transformers import AutoTokenizer

    out, manifest, folders = bank
    _, _, tensors = layout.read(out, layout.Spec.from_dict(manifest["spec"]))
    refs = []
    for slot, folder in enumerate(folders):
        adapter = bank_export.load_adapter(folder)
        model = bank_export.load_model(tiny_bert, adapter)
        frozen = bank_export.freeze(adapter, model)
        bare = bank_export.bare_model(model, frozen)
        eager = bank_export.reference_model(model, adapter, frozen)
        refs.append((eager, bank_export.float64_copy(eager), bare, None, LABELS[slot]))
    rows = [(a, t) for a in range(3) for t in ("book a flight to paris", "what is my balance", "play some jazz")]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    bank_export.check_bank_parity(session, tensors, refs, rows, tok, 64)  # the bank as written passes
    swapped = {k: (v[[1, 0, 2]] if not k.startswith("head_") else v) for k, v in tensors.items()}
    with pytest.raises(ParityError, match="differ|predicted class"):
        bank_export.check_bank_parity(session, swapped, refs, rows, tok, 64)


def test_prefix_slots_are_the_single_export_split(tiny_bert, tmp_path):
    """The bank's prefix slot of layer l is the (keys, values) the single-adapter export freezes for layer l."""
    folder = random_peft_adapter(tiny_bert, PrefixTuningConfig(task_type=CLS, num_virtual_tokens=6), tmp_path / "a")
    peft = layout.read_peft(folder)
    spec = layout.spec_of([peft], 2, 4, 32, {})
    slot = layout.slot(spec, peft)
    kv = split_prefix_table(torch.from_numpy(peft.tensors["prompt_embeddings"]), 2, 4)
    for layer, (k, v) in enumerate(kv):
        np.testing.assert_array_equal(slot[f"prefix.{layer}"][0], k[0].numpy())
        np.testing.assert_array_equal(slot[f"prefix.{layer}"][1], v[0].numpy())


def test_adapters_that_do_not_fit_are_refused_by_name(tiny_bert, tmp_path):
    prefix = random_peft_adapter(tiny_bert, PrefixTuningConfig(task_type=CLS, num_virtual_tokens=5), tmp_path / "p5")
    other_p = random_peft_adapter(tiny_bert, PrefixTuningConfig(task_type=CLS, num_virtual_tokens=3), tmp_path / "p3")
    lora = random_peft_adapter(tiny_bert, FAMILIES["lora"][0], tmp_path / "l")
    with pytest.raises(EdgetuneError, match="3 virtual tokens; every adapter of this bank has 5"):
        bank_export.export_bank(tmp_path / "bank", [str(prefix), str(other_p)], str(tiny_bert))
    with pytest.raises(EdgetuneError, match="LORA.*holds prefix adapters"):
        bank_export.export_bank(tmp_path / "bank", [str(prefix), str(lora)], str(tiny_bert))
    with pytest.raises(EdgetuneError, match="two adapters are named 'x'"):
        bank_export.export_bank(tmp_path / "bank", [f"x={prefix}", f"x={other_p}"], str(tiny_bert))
    with pytest.raises(EdgetuneError, match="adapter name"):
        bank_export.export_bank(tmp_path / "bank", [f"../x={prefix}"], str(tiny_bert))
    assert not (tmp_path / "bank").exists()


@pytest.fixture(scope="module", params=["prefix", "prompt", "lora"])
def tag_bank(request, tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp(f"tag_bank_{request.param}")
    folders = tagging_adapters(root, tiny_bert, request.param)
    export_run(folders[1].parent, str(tiny_bert), int8=False, adapter_dir=folders[1], data="wnut16", fp16=False, triton=False)
    manifest = bank_export.export_bank(root / "bank", [str(f) for f in folders], str(tiny_bert))
    return root / "bank", manifest, folders


def test_a_tagging_bank_matches_each_adapter(tag_bank):
    """Token classifiers of three tag-set sizes, one with a CRF: every row's emissions at its words equal its adapter's
    eager model and its own export, and its decoded path the eager decode; the CRFs travel in the bank file."""
    out, manifest, folders = tag_bank
    assert manifest["task"] == "token-classification" and manifest["outputs"] == ["emissions"]
    assert manifest["decode"] == ["argmax", "crf", "argmax"] and manifest["prefix_op"] is None
    p = manifest["parity"]
    assert p["adapters"] == 3 and p["paths_agree"] == 1.0 and p["max_abs_diff"] <= 1e-4
    assert p["n_samples"] == 3 * bank_export.ROWS_PER_ADAPTER and max(p["batch_sizes"]) > 1
    assert p["own_exports_compared"] == 1 and p["max_abs_diff_vs_own_export"] <= 1e-4
    assert p["min_adapter_effect"] > 10 * p["tolerance"]
    spec = layout.Spec.from_dict(manifest["spec"])
    _, entries, tensors = layout.read(out, spec)
    assert spec.task == "TOKEN_CLS" and [len(e.labels) for e in entries] == list(TAGS)
    assert set(layout.decode_names(spec)) == {"crf_start", "crf_end", "crf_transitions"}
    assert not set(layout.decode_names(spec)) & set(manifest["inputs"])  # the CRFs are not graph inputs
    assert manifest["inputs"][:4] == list(bank_export.TAG_BANK_INPUTS)
    assert tensors["crf_transitions"].shape == (3, max(TAGS), max(TAGS)) and not tensors["crf_start"][[0, 2]].any()
    assert not tensors["crf_transitions"][1, TAGS[1] :].any()  # padded tags hold zeros, sliced off when decoding


def test_a_tagging_bank_with_swapped_adapters_fails_the_gate(tag_bank, tiny_bert):
    from transformers import AutoTokenizer

    out, manifest, folders = tag_bank
    _, _, tensors = layout.read(out, layout.Spec.from_dict(manifest["spec"]))
    refs = []
    for slot, folder in enumerate(folders):
        adapter = bank_export.load_adapter(folder)
        model = bank_export.load_model(tiny_bert, adapter)
        frozen = bank_export.freeze(adapter, model)
        bare = bank_export.bare_model(model, frozen)  # before the adapter goes onto the model (LoRA: in place)
        eager = bank_export.reference_model(model, adapter, frozen)
        refs.append((eager, bank_export.float64_copy(eager), bare, None, TAGS[slot]))
    sentences = [["Going", "to", "Paris", "with", "John", "Smith"], ["watching", "the", "Lakers", "tonight"], ["hi"]]
    rows = [(a, w) for a in range(3) for w in sentences]
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    tok = AutoTokenizer.from_pretrained(tiny_bert)
    bank_export.check_bank_tagging_parity(session, tensors, refs, rows, tok, 64)
    swapped = {k: (v[[1, 0, 2]] if not k.startswith(("head_", "crf_")) else v) for k, v in tensors.items()}
    with pytest.raises(ParityError, match="differ"):  # two adapters' prefixes (prompts, LoRA pairs) swapped
        bank_export.check_bank_tagging_parity(session, swapped, refs, rows, tok, 64)
    crf_swapped = {**tensors, "crf_transitions": -tensors["crf_transitions"]}  # the decode uses the bank's CRF
    with pytest.raises(ParityError, match="decoded tags differ"):
        bank_export.check_bank_tagging_parity(session, crf_swapped, refs, rows, tok, 64)


def test_decode_slices_to_the_adapters_tags():
    """Padded tags are never chosen: each row decodes over its adapter's own tags only."""
    rng = np.random.default_rng(0)
    bank = {"crf_start": np.zeros((1, 5), np.float32), "crf_end": np.zeros((1, 5), np.float32),
            "crf_transitions": np.zeros((1, 5, 5), np.float32)}  # fmt: skip
    bank["crf_transitions"][0, :3, :3] = rng.normal(size=(3, 3))
    emissions = rng.normal(size=(4, 5)).astype(np.float32)
    emissions[:, 3:] = 100.0  # padded columns that would win if they were read
    start, end, t = layout.crf_of(bank, 0, 3)
    assert start.shape == end.shape == (3,) and t.shape == (3, 3)
    np.testing.assert_array_equal(t, bank["crf_transitions"][0, :3, :3])
    path = viterbi(emissions[:, :3].astype(np.float64), 4, start, end, t)
    assert max(path) < 3 and path != viterbi(emissions[:, :3].astype(np.float64), 4, start, end, np.zeros((3, 3)))


def test_a_bank_holds_one_task(tiny_bert, tmp_path):
    cls = random_peft_adapter(tiny_bert, PrefixTuningConfig(task_type=CLS, num_virtual_tokens=5), tmp_path / "c")
    tag = random_peft_adapter(tiny_bert, PrefixTuningConfig(task_type=TaskType.TOKEN_CLS, num_virtual_tokens=5), tmp_path / "t")
    with pytest.raises(EdgetuneError, match="task_type is 'TOKEN_CLS'; this bank holds SEQ_CLS adapters"):
        bank_export.export_bank(tmp_path / "bank", [str(cls), str(tag)], str(tiny_bert))
    (tag / "crf.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(layout.BankError, match="crf.safetensors is unreadable"):
        layout.read_peft(tag)
