"""The torch op ``edgetune::prefix_attn``: Triton kernels on CUDA (or on CPU under TRITON_INTERPRET=1), the PyTorch
reference elsewhere, with autograd either way. `prefix_attn` is the entry point (its eager gradients go through
`_PrefixAttnFunction`, the same forward and backward with less per-call CPU)."""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction

from kernels import prefix_attention as tk
from kernels.reference import prefix_attn_reference

HEAD_DIMS = (32, 64, 128)  # what the Triton kernels are built for
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _use_triton(q: torch.Tensor) -> bool:
    """Triton on CUDA, or on CPU when the kernels were defined under the interpreter (TRITON_INTERPRET=1)."""
    ok = q.shape[-1] in HEAD_DIMS and q.dtype in DTYPES
    return ok and (q.is_cuda or isinstance(tk.prefix_attn_fwd, InterpretedFunction))


@torch.library.custom_op("edgetune::prefix_attn", mutates_args=())
def _prefix_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, lengths: torch.Tensor,
                 causal: bool, scale: float, dropout_p: float, seed: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """out (B, N, S, D), lse float32 (B, N, S); arguments as `prefix_attn` after its checks; seed: int32 (1,) on q's
    device, the dropout stream's seed (None without dropout; dropout: Triton only)."""
    if _use_triton(q):
        return tk.forward(q, k, v, pk, pv, lengths, causal, scale, dropout_p, seed)
    out, lse = prefix_attn_reference(q, k, v, pk, pv, lengths, causal, scale)
    return out.transpose(1, 2).contiguous().transpose(1, 2), lse.float()  # the Triton path's (B, S, N, D) memory


@_prefix_attn.register_fake
def _(q, k, v, pk, pv, lengths, causal, scale, dropout_p, seed):
    b, n, s, d = q.shape
    return q.new_empty(b, s, n, d).transpose(1, 2), q.new_empty(b, n, s, dtype=torch.float32)


@torch.library.custom_op("edgetune::prefix_attn_backward", mutates_args=())
def _prefix_attn_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
                          lengths: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float, dropout_p: float,
                          seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """Triton gradients (dq, dk, dv, dpk, dpv), each shaped like its input."""
    do = do if do.stride(-1) == 1 else do.contiguous()  # any other layout: the kernels take strides
    return tk.backward(do, q, k, v, pk, pv, lengths, out, lse, causal, scale, dropout_p, seed)


@_prefix_attn_backward.register_fake
def _(do, q, k, v, pk, pv, lengths, out, lse, causal, scale, dropout_p, seed):
    return tuple(torch.empty_like(t) for t in (q, k, v, pk, pv))


def _save(ctx, q, k, v, pk, pv, lengths, causal, scale, dropout_p, seed, out, lse) -> None:
    """What `_backward` reads, for both autograd paths (the registered one and `_PrefixAttnFunction`)."""
    ctx.save_for_backward(q, k, v, pk, pv, lengths, seed, out, lse)
    ctx.causal, ctx.scale, ctx.dropout_p = causal, scale, dropout_p


def _setup_context(ctx, inputs, output) -> None:
    _save(ctx, *inputs, *output)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, pk, pv, lengths, seed, out, lse = ctx.saved_tensors
    if _use_triton(q):
        grads = _prefix_attn_backward(grad_out, q, k, v, pk, pv, lengths, out, lse, ctx.causal, ctx.scale, ctx.dropout_p, seed)
    else:  # differentiate the reference
        inputs = [t.detach().requires_grad_() for t in (q, k, v, pk, pv)]
        with torch.enable_grad():
            ref, _ = prefix_attn_reference(*inputs, lengths, ctx.causal, ctx.scale)
            grads = torch.autograd.grad(ref, inputs, grad_out)
    return *grads, None, None, None, None, None


_prefix_attn.register_autograd(_backward, setup_context=_setup_context)


class _PrefixAttnFunction(torch.autograd.Function):
    """What `prefix_attn` runs when gradients are wanted in eager mode: the op's own forward and `_backward`, without
    torch.library's per-call autograd wrapper around the op (it rebuilds the schema's defaults on every call: ~60 us of
    CPU on the 2-core CPU, per layer and step, where the GPU time of the kernel is ~10 us). The op itself still runs,
    below autograd; torch.compile and torch.ops.edgetune.prefix_attn use the registered autograd."""

    @staticmethod
    def forward(ctx, q, k, v, pk, pv, lengths, causal, scale, dropout_p, seed):
        out, lse = _prefix_attn(q, k, v, pk, pv, lengths, causal, scale, dropout_p, seed)
        _save(ctx, q, k, v, pk, pv, lengths, causal, scale, dropout_p, seed, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _backward(ctx, grad_out, None)


def prefix_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, prefix_k: torch.Tensor | None, prefix_v: torch.Tensor | None,
                lengths: torch.Tensor | None, causal: bool = False, scale: float | None = None, dropout_p: float = 0.0
                ) -> torch.Tensor:  # fmt: skip
    """Attention over P prefix positions (always visible) then S sequence positions (right-padded, optionally causal).

    q (B, N, S, D); k, v (B, Nkv, S, D) with Nkv dividing N (grouped-query attention); prefix_k, prefix_v
    (1 or B, Nkv, P, D) (batch-shared or per row; None = no prefix), cast to q's dtype; lengths (B,) integer count of
    valid sequence keys per row (None = all S); causal: query i sees sequence keys j <= i; scale defaults to D ** -0.5.
    Returns (B, N, S, D) in q's dtype (a transposed view of (B, S, N, D) memory on the Triton path); rows with no
    visible key are zero. dropout_p: dropout on the attention weights (pass it only while training); each call draws
    the Triton kernels' Philox seed from torch's generator of q's device into a device tensor, so torch.manual_seed
    makes runs repeatable, and a CUDA graph replay or a compiled graph draws a fresh mask instead of the captured one.
    Triton kernels (fp32/fp16/bf16, D in 32/64/128) on CUDA, PyTorch reference otherwise.
    Raises ValueError on inconsistent shapes or dtypes, or dropout_p outside [0, 1).
    """
    b, n, s, d = q.shape
    if prefix_k is None or prefix_v is None:
        prefix_k = prefix_v = q.new_empty(1, k.shape[1], 0, d)
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (s, d) or n % k.shape[1]:
        raise ValueError(
            f"k/v must be (B, Nkv, S, D) with Nkv dividing N for q {tuple(q.shape)}, got {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if (
        prefix_k.shape != prefix_v.shape
        or prefix_k.shape[0] not in (1, b)
        or prefix_k.shape[1] != k.shape[1]
        or prefix_k.shape[3] != d
    ):
        raise ValueError(f"prefix_k/prefix_v must be (1 or B, Nkv, P, D), got {tuple(prefix_k.shape)}, {tuple(prefix_v.shape)}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    lengths = torch.full((b,), s, dtype=torch.int32, device=q.device) if lengths is None else lengths.to(q.device, torch.int32)
    if lengths.shape != (b,):
        raise ValueError(f"lengths must be (B,) = ({b},), got {tuple(lengths.shape)}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = d**-0.5 if scale is None else float(scale)
    prefix_k, prefix_v = prefix_k.to(q.dtype), prefix_v.to(q.dtype)
    if dropout_p > 0.0 and not _use_triton(q):  # torch draws the mask; plain autograd keeps it for the backward
        return prefix_attn_reference(q, k, v, prefix_k, prefix_v, lengths, causal, scale, dropout_p=dropout_p)[0]
    q, k, v, prefix_k, prefix_v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, prefix_k, prefix_v))
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int32, device=q.device) if dropout_p > 0.0 else None
    args = (q, k, v, prefix_k, prefix_v, lengths.contiguous(), causal, scale, float(dropout_p), seed)
    if torch.is_grad_enabled() and any(t.requires_grad for t in args[:5]) and not torch.compiler.is_compiling():
        return _PrefixAttnFunction.apply(*args)
    return _prefix_attn(*args)[0]
