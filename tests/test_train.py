"""Training options: frozen parts stay frozen, optimisers and loss options run, class weights are right."""

import copy
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import train_small
from train.loop import balanced_class_weights


def test_balanced_class_weights():
    w = balanced_class_weights([0, 0, 0, 1], 3)
    assert torch.allclose(w, torch.tensor([4 / 9, 4 / 3, 0.0]), rtol=4 * torch.finfo(torch.float32).eps, atol=0)  # 2 roundings


def test_partial_fine_tuning_leaves_frozen_weights_alone(tmp_path, tiny_bert):
    run = train_small(tmp_path / "run", "full", str(tiny_bert), ["lr=1e-2", "freeze_embeddings=true", "freeze_layers=1"])
    before = load_file(str(tiny_bert / "model.safetensors"))
    after = {k.removeprefix("bert."): v for k, v in load_file(str(run / "adapter" / "model.safetensors")).items()}
    for key, value in before.items():
        changed = not torch.equal(value, after[key])
        frozen = key.startswith("embeddings.") or key.startswith("encoder.layer.0.")
        trained = key.startswith("encoder.layer.1.")
        assert not (frozen and changed), key
        if trained and key.endswith("weight") and "LayerNorm" not in key:
            assert changed, key


@pytest.mark.parametrize(
    "options", [["optimizer=sgd", "lr=1e-1"], ["optimizer=adam", "label_smoothing=0.1", "class_weights=balanced"]]
)
def test_optimisers_and_loss_options_train(tmp_path, tiny_bert, options):
    run = train_small(tmp_path / "run", "lora", str(tiny_bert), options)
    m = json.loads((run / "metrics.json").read_text())
    loss = m["history"][0]["train_loss"]
    assert math.isfinite(loss) and 0 < loss < 10  # a cross-entropy over 77 classes


@pytest.mark.parametrize("method", ["p_tuning_v2", "lora", "full"])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_bert, method):
    """Recomputing the layers in the backward pass must change memory, not the maths (dropout off to compare): the
    checkpointed gradients are as close to the float64 gradients as the plain fp32 ones."""
    from adapters.config import load_config
    from adapters.model import build_model
    from tests.helpers import assert_fp32_equivalent, padded_batch

    ids, mask = padded_batch(tiny_bert)
    grads = []
    for on, dtype in ((False, torch.float32), (True, torch.float32), (False, torch.float64)):
        cfg = load_config(None, [f"method={method}", f"base_model={tiny_bert}", f"gradient_checkpointing={on}"])
        model = build_model(cfg, [f"L{i}" for i in range(5)], seed=0).to(dtype).train()
        assert model.base.is_gradient_checkpointing == on
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        model(ids, mask).logsumexp(-1).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() == grads[2].keys() and len(grads[0]) > 2
    for name, g in grads[0].items():
        assert_fp32_equivalent(grads[1][name], g, grads[2][name], name)


def _no_dropout_model(tiny_bert, method: str, device: str = "cpu"):
    from adapters.config import load_config
    from adapters.model import build_model

    model = build_model(load_config(None, [f"method={method}", f"base_model={tiny_bert}"]), [f"L{i}" for i in range(5)], seed=0)
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model.to(device)


@pytest.mark.parametrize("method", ["p_tuning_v2", "lora", "prompt_tuning"])
def test_cuda_graph_padding_leaves_the_logits_alone(tiny_bert, method):
    """cuda_graphs pads batches to a multiple of 16 tokens (masked): the logits must not move, and the width never
    exceeds max(S, max_length)."""
    from tests.helpers import assert_fp32_equivalent, padded_batch
    from train.graphs import SEQ_MULTIPLE, pad_length

    ids, mask = padded_batch(tiny_bert)
    wide_ids, wide_mask = pad_length(ids, mask, 0, 64)
    assert wide_ids.shape[1] % SEQ_MULTIPLE == 0 and wide_ids.shape[1] > ids.shape[1]
    assert torch.equal(wide_ids[:, : ids.shape[1]], ids) and (wide_mask[:, ids.shape[1] :] == 0).all()
    assert pad_length(ids, mask, 0, ids.shape[1])[0].shape == ids.shape  # max_length caps the padding
    model = _no_dropout_model(tiny_bert, method).eval()
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(ids, mask)
        assert_fp32_equivalent(model(wide_ids, wide_mask), model(ids, mask), exact, "padded to a multiple of 16")


def test_cuda_graphs_is_refused_where_it_cannot_run(tmp_path, tiny_bert):
    from adapters.config import load_config
    from adapters.errors import ConfigError

    with pytest.raises(ConfigError, match="device=cpu"):
        load_config(None, ["cuda_graphs=true", "device=cpu"])
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        load_config(None, ["cuda_graphs=true", "gradient_checkpointing=true"])
    if not torch.cuda.is_available():  # the GPU's side: test_gpu_cuda_graph_training_equals_eager
        with pytest.raises(ConfigError, match="none was found"):
            train_small(tmp_path / "run", "p_tuning_v2", str(tiny_bert), ["cuda_graphs=true"])
        assert not (tmp_path / "run").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", ["p_tuning_v2", "lora"])
def test_gpu_cuda_graph_training_equals_eager(tiny_bert, method):
    """Four optimiser steps through GraphedForward (4-row batches of two padded shapes, the first captured and then
    replayed with other rows; then a 3-row batch, eager) reach the same weights as eager steps (dropout off, fp32)."""
    from tests.helpers import SENTENCES, padded_batch
    from train.graphs import GraphedForward, pad_length

    rows = (SENTENCES[:4], SENTENCES[1:], SENTENCES[3::-1])  # padded to 32, 16 and 32 tokens
    batches = [pad_length(*padded_batch(tiny_bert, texts), 0, 64) for texts in rows] + [padded_batch(tiny_bert, SENTENCES[:3])]
    labels = torch.tensor([0, 1, 2, 3])
    weights = []
    for graphs in (False, True):
        model = _no_dropout_model(tiny_bert, method, "cuda").train()
        net = GraphedForward(model, batch_size=4) if graphs else model
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)  # Adam would magnify ulps
        for ids, mask in batches:
            opt.zero_grad(set_to_none=True)
            logits = net(ids.cuda(), mask.cuda())
            torch.nn.functional.cross_entropy(logits, labels[: len(ids)].cuda()).backward()
            opt.step()
        if graphs:
            assert list(net.graphs) == [(4, 32), (4, 16)]
        weights.append({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad})
    for name, w in weights[0].items():
        assert torch.allclose(w, weights[1][name], atol=1e-4), name  # cuBLAS may pick other kernels under capture


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_training_run_with_cuda_graphs(tmp_path, tiny_bert):
    """The loop's side (padding, autocast without its weight cache, the eager last batch): a run trains and learns."""
    run = train_small(tmp_path / "run", "p_tuning_v2", str(tiny_bert), ["cuda_graphs=true", "device=cuda", "batch_size=24"])
    m = json.loads((run / "metrics.json").read_text())
    assert math.isfinite(m["history"][0]["train_loss"])
    assert m["cuda_graph_shapes"] and all(b == 24 and s % 16 == 0 for b, s in m["cuda_graph_shapes"])


class _ClaimsCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: handed to adapters.prefix.prefix_attention, it makes the attention dispatch
    choose as it would on a GPU, while whatever that choice calls still runs on the CPU."""

    @property
    def is_cuda(self) -> bool:
        return True


def _plain(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, torch.Tensor) else t


def test_prefix_kernel_switch_reaches_the_model(tiny_bert, monkeypatch):
    """prefix_kernel (the config key) must reach the attention dispatch: on a GPU, True runs the Triton kernel
    (kernels.op.prefix_attn) in every layer and False PEFT's SDPA over the concatenation (sdpa_concat_attention).
    On the CPU each layer's query is handed to the dispatch as a tensor that says it is on CUDA, and both callees are
    wrapped to record which one each layer asks for; they still compute on the CPU (the op on its PyTorch reference),
    so the two settings' logits must also agree within the fp32 bound around the float64 model's."""
    import adapters.prefix
    import kernels.op
    from adapters.config import load_config
    from adapters.model import build_model
    from tests.helpers import assert_fp32_equivalent, padded_batch

    calls: list[str] = []
    dispatch, kernel, concat = adapters.prefix.prefix_attention, kernels.op.prefix_attn, adapters.prefix.sdpa_concat_attention

    def as_on_a_gpu(module, query, *args, **kwargs):
        return dispatch(module, query.as_subclass(_ClaimsCuda), *args, **kwargs)

    def kernel_call(q, k, v, pk, pv, lengths, *args, **kwargs):
        calls.append("kernel")
        return kernel(*map(_plain, (q, k, v, pk, pv, lengths)), *args, **kwargs)

    def concat_call(module, query, *args, **kwargs):
        calls.append("concat")
        return concat(module, _plain(query), *args, **kwargs)

    ids, mask = padded_batch(tiny_bert)
    logits, asked = {}, {}
    try:
        monkeypatch.setattr(adapters.prefix, "prefix_attention", as_on_a_gpu)  # what load_base's register_attention registers
        monkeypatch.setattr(kernels.op, "prefix_attn", kernel_call)
        monkeypatch.setattr(adapters.prefix, "sdpa_concat_attention", concat_call)
        for flag in (True, False):
            cfg = load_config(None, ["method=p_tuning_v2", f"base_model={tiny_bert}", f"prefix_kernel={flag}"])
            model = build_model(cfg, [f"L{i}" for i in range(5)], seed=0).eval()
            assert model.prefix_kernel is flag
            calls.clear()
            with torch.no_grad():
                logits[flag] = _plain(model(ids, mask))
            asked[flag] = list(calls)
    finally:
        monkeypatch.undo()
        adapters.prefix.register_attention()  # the real dispatch again, for the tests after this one
    layers = model.num_layers
    assert asked == {True: ["kernel"] * layers, False: ["concat"] * layers}, asked
    with torch.no_grad():
        exact = model.double()(ids, mask)  # prefix_kernel=False on the CPU: the SDPA path, in float64
    assert_fp32_equivalent(logits[True], logits[False], exact, "the kernel's path against the concatenation's")


def test_bf16_auto_follows_the_cpu_and_the_onednn_cap(monkeypatch):
    """bf16=auto is on where the CPU has native bf16, and off under a oneDNN cap below it (make test-portable)."""
    from train.loop import cpu_has_bf16

    flags = open("/proc/cpuinfo").read()
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert not cpu_has_bf16()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "avx512_core_bf16")
    assert cpu_has_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_patience_stops_when_dev_stops_improving(tmp_path, tiny_bert):
    """At a learning rate too small to move the dev score, patience=2 stops after epoch 3 with epoch 1 as the best."""
    run = train_small(tmp_path / "run", "lora", str(tiny_bert), ["epochs=6", "max_steps=0", "max_train_samples=64",
                                                                   "lr=1e-12", "head_lr=1e-12", "patience=2"])  # fmt: skip
    m = json.loads((run / "metrics.json").read_text())
    assert m["epochs_run"] == 3 and m["best_epoch"] == 1 and len(m["history"]) == 3


def test_without_bf16_entries_reach_a_run_without_bf16(tmp_path, tiny_bert):
    """A without_bf16 entry trains exactly as the key set directly, is named in metrics.json, and config.yaml keeps it."""
    from adapters.config import load_config

    via_entry = train_small(tmp_path / "a", "lora", str(tiny_bert), ["bf16=false", "without_bf16=label_smoothing=0.5"])
    direct = train_small(tmp_path / "b", "lora", str(tiny_bert), ["bf16=false", "without_bf16=", "label_smoothing=0.5"])
    plain = train_small(tmp_path / "c", "lora", str(tiny_bert), ["bf16=false", "without_bf16="])
    a, b, c = (json.loads((r / "metrics.json").read_text()) for r in (via_entry, direct, plain))
    assert a["without_bf16_applied"] == ["label_smoothing=0.5"] and b["without_bf16_applied"] == []
    assert a["history"][0]["train_loss"] == b["history"][0]["train_loss"] != c["history"][0]["train_loss"]
    saved = load_config(via_entry / "config.yaml")
    assert saved.without_bf16 == ("label_smoothing=0.5",) and saved.label_smoothing == 0.0
