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
from tests.helpers import random_peft_adapter

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
