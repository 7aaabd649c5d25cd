"""LoRA merge: a pure state-dict function, equal to the unmerged model and to PEFT's merge_and_unload."""

import pytest
import torch
from peft import LoraConfig, TaskType

from export.eager import load_adapter_model
from export.fold import merge_lora
from tests.helpers import padded_batch, peft_model, random_peft_adapter
from train.adapter_io import head_state, load_adapter
from train.errors import AdapterError
from train.model import load_base

CONFIG = LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value", "dense"])


@pytest.fixture
def lora_adapter(tmp_path, tiny_bert):
    return random_peft_adapter(tiny_bert, CONFIG, tmp_path / "lora")


def _merged_model(adapter_dir, base_dir):
    adapter = load_adapter(adapter_dir)
    plain = load_base(base_dir, adapter.label_names, attn="eager")
    state = merge_lora(plain.state_dict(), adapter.tensors, 4, 8)
    state.update({f"classifier.{k}": v for k, v in head_state(adapter.tensors).items()})
    plain.load_state_dict(state)
    return plain.eval()


@torch.inference_mode()
def test_merged_equals_unmerged(lora_adapter, tiny_bert):
    ids, mask = padded_batch(tiny_bert)
    unmerged = load_adapter_model(lora_adapter, str(tiny_bert))(ids, mask)
    merged = _merged_model(lora_adapter, tiny_bert)(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)  # logits here are ~10: fp32 rounding
    bare = load_base(tiny_bert, [str(i) for i in range(5)]).eval()
    bare.classifier.load_state_dict(head_state(load_adapter(lora_adapter).tensors))
    assert (bare(input_ids=ids, attention_mask=mask).logits - merged).abs().max() > 1e-2  # the merge did something


@torch.inference_mode()
def test_merge_matches_peft_merge_and_unload(lora_adapter, tiny_bert):
    ours = _merged_model(lora_adapter, tiny_bert).state_dict()
    theirs = peft_model(lora_adapter, tiny_bert, 5).merge_and_unload().state_dict()
    for k, v in theirs.items():
        assert torch.allclose(ours[k], v, atol=1e-6), k


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
