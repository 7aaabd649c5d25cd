"""Our prefix hook against PEFT's own prefix-tuning forward, and adapter interchange with PEFT."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, TaskType

from adapters.eager import load_adapter_model
from tests.helpers import (
    PEFT_CONFIGS,
    PEFT_IDS,
    assert_fp32_equivalent,
    minilm_path,
    padded_batch,
    peft_model,
    random_peft_adapter,
)


@torch.inference_mode()
def _compare(adapter_dir, base_dir, num_labels):
    """Our logits as close to PEFT's float64 logits as PEFT's own fp32 logits are."""
    ids, mask = padded_batch(base_dir)
    ours = load_adapter_model(adapter_dir, str(base_dir))(ids, mask)
    peft = peft_model(adapter_dir, base_dir, num_labels)
    theirs = peft(input_ids=ids, attention_mask=mask).logits
    exact = peft.double()(input_ids=ids, attention_mask=mask).logits
    assert_fp32_equivalent(ours, theirs, exact, "our forward against PEFT's")
    return ours


@pytest.mark.parametrize("model", ["tiny", "minilm"])
@pytest.mark.parametrize("method", ["p_tuning_v2", "lora"])
def test_our_adapter_loads_in_peft_with_same_logits(runs, tiny_bert, model, method):
    run = runs(model, method)
    base = tiny_bert if model == "tiny" else minilm_path()
    labels = json.loads((run / "adapter" / "labels.json").read_text())
    _compare(run / "adapter", base, len(labels))


@pytest.mark.parametrize("config", PEFT_CONFIGS, ids=PEFT_IDS)
def test_peft_written_adapter_gives_peft_logits(tmp_path, tiny_bert, config):
    adapter = random_peft_adapter(tiny_bert, config, tmp_path / "peft_adapter")
    ours = _compare(adapter, tiny_bert, 5)
    # and the prefix really matters: without it the logits move
    ids, mask = padded_batch(tiny_bert)
    model = load_adapter_model(adapter, str(tiny_bert))
    model.prefix = None
    model.prompt = None
    if not isinstance(config, LoraConfig):
        with torch.inference_mode():
            assert (model(ids, mask) - ours).abs().max() > 1e-2  # a random prefix moves logits by O(1), fp32 by ~1e-6


def test_prefix_positions_and_padding_are_peft_semantics(tmp_path, tiny_bert):
    """Padding must be masked (changing pad tokens changes nothing) and tokens sit at positions P..P+S-1."""
    adapter = random_peft_adapter(tiny_bert, PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4), tmp_path / "a")
    model = load_adapter_model(adapter, str(tiny_bert))
    ids, mask = padded_batch(tiny_bert)
    with torch.inference_mode():
        ref = model(ids, mask)
        exact = copy.deepcopy(model).double()(ids, mask)
        noisy = ids.masked_fill(mask == 0, 1234)  # different pad ids
        assert_fp32_equivalent(model(noisy, mask), ref, exact, "other pad ids")
        single = model(ids[1:2, : int(mask[1].sum())], mask[1:2, : int(mask[1].sum())])  # no padding at all
        assert_fp32_equivalent(single, ref[1:2], exact[1:2], "the row alone, unpadded")
        moved = model(ids, mask.roll(1, dims=1))  # the padding at the start: other positions, other keys masked
        with pytest.raises(AssertionError, match="exceeds"):
            assert_fp32_equivalent(moved, ref, exact, "positions shifted")


@pytest.mark.parametrize(
    "method, extra",
    [("prompt_tuning", []), ("prompt_tuning", ["prompt_init=text", "prompt_init_text=classify the banking intent"]),
     ("p_tuning", []), ("p_tuning", ["prompt_encoder=lstm", "encoder_hidden_size=16"])],
    ids=["prompt-vocab", "prompt-text", "p-tuning-mlp", "p-tuning-lstm"],
)  # fmt: skip
def test_prompt_methods_train_export_and_load_in_peft(tmp_path, tiny_bert, method, extra):
    from export.run import export_run
    from tests.helpers import train_small

    run = train_small(tmp_path / "run", method, str(tiny_bert), extra)
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING"}[method]
    labels = json.loads((run / "adapter" / "labels.json").read_text())
    _compare(run / "adapter", tiny_bert, len(labels))
    p = export_run(run, int8=False)["parity"]
    assert p["max_abs_diff"] <= p["tolerance"] and p["argmax_agree"] == 1.0 and p["adapter_effect"] > 10 * p["tolerance"]
    m = json.loads((run / "export" / "manifest.json").read_text())
    assert m["num_virtual_tokens"] == 16 and m["max_positions"] == 128 - 16


def test_prefix_is_cast_once_with_the_gradients_of_per_layer_casts():
    """Under autocast PrefixModel casts the whole prefix table once and splits it with one unbind: the per-layer
    keys/values and the table's gradient must be exactly those of casting each layer's slice."""
    from adapters.prefix import PrefixEncoder

    torch.manual_seed(0)
    enc = PrefixEncoder(num_virtual_tokens=5, num_layers=3, num_heads=2, hidden=8)
    weights = torch.randn(6, 1, 2, 5, 4)  # one per key/value tensor
    grads = []
    for once in (True, False):
        enc.zero_grad()
        kv = enc.kv(torch.bfloat16) if once else [(k.to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in enc.kv()]
        flat = [t for pair in kv for t in pair]
        assert all(t.dtype == torch.bfloat16 and t.shape == (1, 2, 5, 4) for t in flat)
        sum((t.float() * w).sum() for t, w in zip(flat, weights, strict=True)).backward()
        grads.append(enc.embedding.weight.grad.clone())
    assert torch.equal(grads[0], grads[1]) and grads[0].abs().sum() > 0
