"""LoRA merge: a pure state-dict function, equal to the unmerged model and to PEFT's merge_and_unload."""

import copy
import dataclasses

import pytest
import torch
from peft import LoraConfig, TaskType

from adapters.eager import load_adapter_model
from adapters.errors import AdapterError
from adapters.fold import merge_lora
from adapters.model import load_base
from adapters.peft_io import head_state, load_adapter
from tests.helpers import assert_fp32_equivalent, padded_batch, peft_model, random_peft_adapter

CONFIG = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value", "dense"])


@pytest.fixture
def lora_adapter(tmp_path, tiny_bert):
    return random_peft_adapter(tiny_bert, CONFIG, tmp_path / "lora")


def _merged_model(adapter_dir, base_dir, alpha_factor: float = 1.0):
    """The merged model the export traces (export.run.graph_module on the adapter's frozen form, which merge_lora
    builds with the adapter's own r and lora_alpha): a plain BERT classifier. ``alpha_factor`` scales the adapter's
    lora_alpha first."""
    from adapters.methods import freeze, method_of
    from export.run import graph_module

    adapter = load_adapter(adapter_dir)
    if alpha_factor != 1.0:
        config = {**adapter.config, "lora_alpha": adapter.config["lora_alpha"] * alpha_factor}
        adapter = dataclasses.replace(adapter, config=config)
    base = load_base(base_dir, adapter.label_names)
    frozen = freeze(adapter, base)
    eager = method_of("lora").reference(copy.deepcopy(base), adapter, frozen)
    module = graph_module(eager, base, frozen, adapter.task)
    return module.model.eval()  # LogitsOnly around the merged model


@torch.inference_mode()
def test_merged_equals_unmerged(lora_adapter, tiny_bert):
    """The merged model is as close to the unmerged model's float64 logits as the unmerged fp32 model is; a doubled
    delta (wrong scale) or none at all misses that bound."""
    ids, mask = padded_batch(tiny_bert)
    unmerged_model = load_adapter_model(lora_adapter, str(tiny_bert))
    unmerged = unmerged_model(ids, mask)
    exact = unmerged_model.double()(ids, mask)
    merged = _merged_model(lora_adapter, tiny_bert)(input_ids=ids, attention_mask=mask).logits
    assert_fp32_equivalent(merged, unmerged, exact, "merged LoRA")
    doubled = _merged_model(lora_adapter, tiny_bert, alpha_factor=2)(input_ids=ids, attention_mask=mask).logits
    with pytest.raises(AssertionError, match="exceeds"):
        assert_fp32_equivalent(doubled, unmerged, exact, "LoRA merged at twice its scale")
    bare = load_base(tiny_bert, [str(i) for i in range(5)], attn="eager").eval()
    bare.classifier.load_state_dict(head_state(load_adapter(lora_adapter).tensors))
    with pytest.raises(AssertionError, match="exceeds"):
        assert_fp32_equivalent(bare(input_ids=ids, attention_mask=mask).logits, unmerged, exact, "no LoRA delta")


@torch.inference_mode()
def test_merge_matches_peft_merge_and_unload(lora_adapter, tiny_bert):
    """The export's merged weights (summed in float64) and PEFT's, each as close to the float64 W + B A alpha/r as the
    same sum in fp32 is; weights LoRA does not target are copied unchanged by both."""
    adapter = load_adapter(lora_adapter)
    base = load_base(tiny_bert, adapter.label_names, attn="eager").state_dict()
    ours = _merged_model(lora_adapter, tiny_bert).state_dict()
    theirs = peft_model(lora_adapter, tiny_bert, 5).merge_and_unload().state_dict()
    merged = 0
    for k, v in theirs.items():
        key_a = f"base_model.model.{k.removesuffix('.weight')}.lora_A.weight"
        if key_a not in adapter.tensors:
            assert torch.equal(ours[k], v), k  # not a LoRA target: both copied as they were
            continue
        w, a, b = base[k], adapter.tensors[key_a], adapter.tensors[key_a.replace("lora_A", "lora_B")]
        scale = CONFIG.lora_alpha / CONFIG.r
        exact = w.double() + (b.double() @ a.double()) * scale
        fp32 = w + (b @ a) * scale
        assert_fp32_equivalent(ours[k], fp32, exact, f"our merge of {k}")
        assert_fp32_equivalent(v, fp32, exact, f"PEFT's merge of {k}")
        merged += 1
    assert merged == sum(k.endswith("lora_A.weight") for k in adapter.tensors) > 0


def test_merge_is_pure_and_refuses_nan(lora_adapter, tiny_bert):
    adapter = load_adapter(lora_adapter)
    base = load_base(tiny_bert, adapter.label_names).state_dict()
    before = {k: v.clone() for k, v in base.items()}
    merge_lora(base, adapter.tensors, 4, 8)
    assert all(torch.equal(before[k], base[k]) for k in base)  # input untouched
    bad = dict(adapter.tensors)
    key = next(k for k in bad if k.endswith("lora_B.weight"))
    bad[key] = bad[key].clone()
    bad[key][0, 0] = float("nan")
    with pytest.raises(AdapterError, match="NaN/inf"):
        merge_lora(base, bad, 4, 8)
    wrong = {k.replace("layer.0", "layer.9"): v for k, v in adapter.tensors.items()}
    with pytest.raises(AdapterError, match="which the base model does not have"):
        merge_lora(base, wrong, 4, 8)
