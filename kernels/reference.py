"""Plain PyTorch prefix attention: concatenate the prefix, mask, softmax. The CPU path and the tests' yardstick."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prefix_attn_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, lengths: torch.Tensor,
                          causal: bool = False, scale: float | None = None, dtype: torch.dtype | None = None,
                          dropout_p: float = 0.0, dropout_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Attention of q over [prefix; sequence] keys, computed in `dtype` (default: q's dtype), differentiable.

    q (B, N, S, D); k, v (B, Nkv, S, D) with Nkv dividing N; pk, pv (1 or B, Nkv, P, D); lengths (B,) integer: row b's
    sequence keys j >= lengths[b] are masked, prefix keys never; causal: query i also sees only sequence keys j <= i.
    dropout_p: attention-weight dropout, drawn by torch or given as dropout_mask, bool (B, N, S, P+S), True = kept.
    Returns out (B, N, S, D) in q's dtype (rows with no visible key are zero) and the row log-sum-exp (B, N, S) in
    `dtype` (-inf for those rows).
    """
    dtype = dtype or q.dtype
    b, n, s, _ = q.shape
    group = n // k.shape[1]
    keys = torch.cat([pk.to(dtype).expand(b, -1, -1, -1), k.to(dtype)], dim=2).repeat_interleave(group, dim=1)  # (B, N, P+S, D)
    values = torch.cat([pv.to(dtype).expand(b, -1, -1, -1), v.to(dtype)], dim=2).repeat_interleave(group, dim=1)
    pos = torch.arange(s, device=q.device)
    keep = (pos[None, None, :] < lengths.to(q.device)[:, None, None]).expand(b, s, s)  # (B, S query, S key)
    if causal:
        keep = keep & (pos[None, None, :] <= pos[None, :, None])
    keep = torch.cat([keep.new_ones(b, s, pk.shape[2]), keep], dim=-1)[:, None]  # (B, 1, S, P+S)
    scores = q.to(dtype) @ keys.transpose(-1, -2) * (scale if scale is not None else q.shape[-1] ** -0.5)  # (B, N, S, P+S)
    scores = scores.masked_fill(~keep, torch.finfo(dtype).min)  # finite: a fully masked row stays NaN-free, also in backward
    weights = torch.softmax(scores, dim=-1) * keep  # fully masked rows -> 0
    if dropout_mask is not None:
        weights = weights * dropout_mask / (1.0 - dropout_p)
    elif dropout_p > 0.0:
        weights = F.dropout(weights, dropout_p)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(~keep.any(-1), float("-inf"))
    return (weights @ values).to(q.dtype), lse
