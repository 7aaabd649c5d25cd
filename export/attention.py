"""The prefix attention as onnxruntime's fused ``com.microsoft.MultiHeadAttention`` in the exported graph.

The plain-op export of the prefix path (Expand + Concat of the prefix, MatMul, Where, Softmax, MatMul per layer) is
not recognised by onnxruntime's attention fusion. MultiHeadAttention takes the prefix as ``past_key``/``past_value``
(B, N, P, D) and the padding as ``key_padding_mask`` (B, P+S), so each layer becomes one fused node on CPU and CUDA.
While tracing, the node's output is computed by the same SDPA reference as training.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.onnx.symbolic_helper import _optional_input_placeholder_tensor, parse_args
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_MHA = "edgetune_mha"


@torch.library.custom_op("edgetune::prefix_mha", mutates_args=())
def prefix_mha(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    past_k: torch.Tensor,
    past_v: torch.Tensor,
    key_padding_mask: torch.Tensor,
    num_heads: int,
    scale: float,
) -> torch.Tensor:
    """(B, S, N*D) query/key/value + prefix (B, N, P, D) + mask (B, P+S) -> (B, S, N*D); SDPA reference."""
    b, s, hidden = q.shape

    def heads(t):
        return t.view(b, -1, num_heads, hidden // num_heads).transpose(1, 2)  # (B, N, L, D)

    key = torch.cat([past_k, heads(k)], dim=2)  # (B, N, P+S, D)
    value = torch.cat([past_v, heads(v)], dim=2)
    keep = key_padding_mask.bool()[:, None, None, :]  # (B, 1, 1, P+S)
    out = F.scaled_dot_product_attention(heads(q), key, value, attn_mask=keep, scale=scale)  # (B, N, S, D)
    return out.transpose(1, 2).reshape(b, s, hidden)


@prefix_mha.register_fake
def _(q, k, v, past_k, past_v, key_padding_mask, num_heads, scale):
    return torch.empty_like(q)


@parse_args("v", "v", "v", "v", "v", "v", "i", "f")
def _prefix_mha_symbolic(g, q, k, v, past_k, past_v, key_padding_mask, num_heads, scale):
    none = _optional_input_placeholder_tensor
    # onnxruntime prepends past_key/past_value only when the present outputs are asked for (seen on 1.31 CPU:
    # with one output the past is ignored), so ask for all three and use the first.
    out, _present_key, _present_value = g.op(
        "com.microsoft::MultiHeadAttention",
        q,
        k,
        v,
        none(g),
        key_padding_mask,
        none(g),
        past_k,
        past_v,
        num_heads_i=num_heads,
        scale_f=scale,
        unidirectional_i=0,
        outputs=3,
    )
    out.setType(q.type())  # same shape and type as the query: (B, S, N*D)
    return out


def mha_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, prefix_kv=None, **_):
    """Attention function for tracing: query/key/value (B, N, S, D), attention_mask bool (B, 1, 1, P+S)."""
    b, n, s, d = query.shape
    flat = lambda t: t.transpose(1, 2).reshape(b, -1, n * d)  # noqa: E731  (B, S, N*D)
    pk, pv = prefix_kv[module.layer_idx]  # (1, N, P, D)
    pk, pv = pk.expand(b, -1, -1, -1), pv.expand(b, -1, -1, -1)  # (B, N, P, D): the op wants a batch of pasts
    mask = attention_mask[:, 0, 0, :].to(torch.int32)  # (B, P+S)
    out = prefix_mha(flat(query), flat(key), flat(value), pk, pv, mask, n, float(scaling or d**-0.5))
    return out.view(b, s, n, d), None


def register_mha() -> None:
    """Register the attention function (transformers) and the op's ONNX translation (TorchScript exporter)."""
    from export.graph import OPSET

    torch.onnx.register_custom_op_symbolic("edgetune::prefix_mha", _prefix_mha_symbolic, OPSET)
    AttentionInterface.register(ATTN_MHA, mha_attention)
    AttentionMaskInterface.register(ATTN_MHA, sdpa_mask)
