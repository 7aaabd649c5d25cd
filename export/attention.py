"""The prefix attention as onnxruntime's fused ``com.microsoft.Attention`` in the exported graph.

The plain-op export of the prefix path (Expand + Concat of the prefix, MatMul, Where, Softmax, MatMul per layer) is
not recognised by onnxruntime's attention fusion. ``com.microsoft.Attention`` takes the layer's packed Q/K/V weights,
the prefix as its ``past`` state (2, B, N, P, D) and the padding as a (B, P+S) mask, so each layer's whole
self-attention becomes one fused node on CPU and CUDA, and int8 quantisation turns it into ``QAttention``.
While tracing, the node's output is computed by an SDPA reference, checked again by the export's parity gate.

onnxruntime (1.31, CPU) insists on the ``present`` output whenever ``past`` is given, so the node declares it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.onnx.symbolic_helper import parse_args

from export.graph import OPSET


@torch.library.custom_op("edgetune::prefix_attention", mutates_args=())
def prefix_attention(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    key_padding_mask: torch.Tensor,
    past: torch.Tensor,
    num_heads: int,
) -> torch.Tensor:
    """hidden (B, S, H), packed weight (H, 3H), bias (3H), mask (B, P+S), past (2, B, N, P, D) -> (B, S, H)."""
    b, s, h = hidden.shape
    q, k, v = (hidden @ weight + bias).split(h, dim=-1)  # (B, S, H) each

    def heads(t):
        return t.view(b, s, num_heads, h // num_heads).transpose(1, 2)  # (B, N, S, D)

    key = torch.cat([past[0], heads(k)], dim=2)  # (B, N, P+S, D)
    value = torch.cat([past[1], heads(v)], dim=2)
    keep = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, P+S)
    out = F.scaled_dot_product_attention(heads(q), key, value, attn_mask=keep)  # (B, N, S, D)
    return out.transpose(1, 2).reshape(b, s, h)


@prefix_attention.register_fake
def _(hidden, weight, bias, key_padding_mask, past, num_heads):
    return torch.empty_like(hidden)


@parse_args("v", "v", "v", "v", "v", "i")
def _prefix_attention_symbolic(g, hidden, weight, bias, key_padding_mask, past, num_heads):
    out, _present = g.op(
        "com.microsoft::Attention", hidden, weight, bias, key_padding_mask, past,
        num_heads_i=num_heads, unidirectional_i=0, outputs=2,
    )  # fmt: skip
    out.setType(hidden.type())  # (B, S, H), like the input
    return out


class PrefixSelfAttention(nn.Module):
    """Stands in for a BERT self-attention module in the export: one fused Attention node with a constant prefix."""

    def __init__(self, attn: nn.Module, key: torch.Tensor, value: torch.Tensor) -> None:
        super().__init__()
        self.num_heads = attn.num_attention_heads
        w = torch.cat([attn.query.weight.T, attn.key.weight.T, attn.value.weight.T], dim=1)  # (H, 3H)
        self.register_buffer("weight", w.detach().contiguous())
        self.register_buffer("bias", torch.cat([attn.query.bias, attn.key.bias, attn.value.bias]).detach())
        self.register_buffer("past", torch.stack([key, value]).detach().contiguous())  # (2, 1, N, P, D)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor, **_):
        # attention_mask: bool (B, 1, 1, P+S) from PrefixModel
        b = hidden_states.shape[0]
        past = self.past.expand(-1, b, -1, -1, -1)  # (2, B, N, P, D): the op wants a batch of pasts
        mask = attention_mask[:, 0, 0, :].to(torch.int32)  # (B, P+S)
        return prefix_attention(hidden_states, self.weight, self.bias, mask, past, self.num_heads), None


def register_prefix_attention() -> None:
    """Have the TorchScript exporter write ``prefix_attention`` as ``com.microsoft.Attention`` (idempotent)."""
    torch.onnx.register_custom_op_symbolic("edgetune::prefix_attention", _prefix_attention_symbolic, OPSET)


def fuse_prefix_attention(model: nn.Module) -> nn.Module:
    """Swap every layer's self-attention of a PrefixModel (with a frozen prefix) for PrefixSelfAttention, in place."""
    register_prefix_attention()
    kv = model.prefix.kv()
    for i, layer in enumerate(model.base.base_model.encoder.layer):
        layer.attention.self = PrefixSelfAttention(layer.attention.self, *kv[i])
    return model
