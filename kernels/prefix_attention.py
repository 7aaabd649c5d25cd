"""Triton attention over a learned prefix and the sequence, in one online-softmax pass.

Prefix keys/values (P positions, always visible) and sequence keys/values (masked by a per-row length, right
padding, optionally causal) are read from separate tensors: nothing is concatenated and a batch-shared prefix is
read with batch stride 0. The kernels walk key columns 0 .. P-1 (prefix) then P .. P+S-1 (sequence) in blocks that
may hold both, choosing each row's source by a pointer select (`_kv_rows`). Grouped-query attention: query head h
reads key/value head h // kv_group.
Inputs fp32, fp16 or bf16, accumulation in fp32; head dims 32, 64, 128; any sequence and prefix length.
A query row with no visible key (length 0 and no prefix) gives zeros and log-sum-exp -inf. For training, optional
dropout on the attention weights, drawn from a Philox stream that the backward replays.

Order: forward kernels (`prefix_attn_fwd`, the stable one compiled ahead of time for serving, and
`prefix_attn_fwd_dropout`), the AOT description, backward kernels, launchers. The autograd function and the torch op
are in kernels/op.py, the plain PyTorch reference in kernels/reference.py.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)  # kernels use exp2: exp(x) = exp2(x * LOG2E)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def _dropout_keep_t(seed, bh, row0, cols, seq_len, num_cols, dropout_p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Which attention weights survive dropout, keys-major: (BLOCK_C, BLOCK_R) for key columns `cols` (0 .. P-1 the
    prefix, P + j sequence key j; num_cols = P + S) and query rows row0 .. row0 + BLOCK_R - 1 (row0 a multiple of 8)
    of head bh = b * N + h.

    One Philox call (`tl.randint4x`) gives four 32-bit words, eight 16-bit draws: those of query rows 8g .. 8g+7 of
    one column, counter (bh * cdiv(S, 8) + g) * num_cols + column (computed in int64 and passed to Philox as int32:
    past 2**32 counters the draws repeat). Row 8g + j takes half j % 2 of word j // 2; a weight is kept when its draw
    >= round(dropout_p * 65536), so the drop probability is dropout_p to within 2**-17. Eight times fewer Philox
    rounds than a draw per weight.
    """
    groups = row0 // 8 + tl.arange(0, BLOCK_R // 8)
    counter = (bh.to(tl.int64) * tl.cdiv(seq_len, 8) + groups)[None, :] * num_cols + cols[:, None]  # (BLOCK_C, BLOCK_R // 8)
    w0, w1, w2, w3 = tl.randint4x(seed, counter.to(tl.int32))
    words = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # (BLOCK_C, BLOCK_R // 8, a, b): word 2a + b
    shifts = tl.arange(0, 2).to(tl.uint32) * 16  # the halves by a broadcast shift: fewer layout conversions than joins
    draws = (words[:, :, :, :, None] >> shifts[None, None, None, None, :]) & 0xFFFF  # half c: row 8g + 4a + 2b + c
    threshold = tl.cast(dropout_p * 65536.0 + 0.5, tl.uint32)
    return tl.reshape(draws, [BLOCK_C, BLOCK_R]) >= threshold


@triton.jit
def _dropout_keep(seed, bh, row0, cols, seq_len, num_cols, dropout_p, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """`_dropout_keep_t` query-major: (BLOCK_R, BLOCK_C), the forward's and dQ's orientation."""
    return tl.trans(_dropout_keep_t(seed, bh, row0, cols, seq_len, num_cols, dropout_p, BLOCK_R, BLOCK_C))


@triton.jit
def _kv_rows(k_base, stride_ks, pk_base, stride_pks, cols, split, CONCAT: tl.constexpr):
    """Row pointers (BN,) of key columns `cols`: with CONCAT, columns below `split` are prefix rows and the rest are
    sequence rows cols - split (the concatenation, never built); otherwise all are rows of k_base."""
    if CONCAT:
        return tl.where(cols < split, pk_base + cols * stride_pks, k_base + (cols - split) * stride_ks)
    return k_base + cols * stride_ks


@triton.jit
def _attend_block(q, acc, m_i, l_i, k_base, v_base, stride_ks, stride_vs, pk_base, pv_base, stride_pks, stride_pvs, split,
                  start, end, offs_m, qk_scale, bh, row0, seq_len, col0, num_cols, dropout_p, seed, HEAD_DIM: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                  MASKED: tl.constexpr, CONCAT: tl.constexpr):  # fmt: skip
    """Fold key columns start .. start+BLOCK_N-1 (columns col0 + ... of P+S) into the running (max, sum, acc) of a
    query block, in log2 units; with DROPOUT the weights that multiply V are dropped and rescaled, the softmax sum is
    not. The keys are rows of k_base/v_base, or with CONCAT (see `_kv_rows`) the prefix's below column `split` and
    the sequence's after. MASKED: columns at or past `end` (and, CAUSAL, sequence keys after the query: column >
    query + split) are hidden; without it every key of the block is visible to every query, and the loads and the
    softmax skip the masks."""
    cols = start + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    k_ptrs = _kv_rows(k_base, stride_ks, pk_base, stride_pks, cols, split, CONCAT)[:, None] + offs_d[None, :]
    v_ptrs = _kv_rows(v_base, stride_vs, pv_base, stride_pvs, cols, split, CONCAT)[:, None] + offs_d[None, :]
    if MASKED:
        valid = cols < end
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0)  # (BN, D)
    else:
        k = tl.load(k_ptrs)
    qk = tl.dot(q, tl.trans(k), input_precision="ieee")  # (BM, BN), unscaled: the scale goes into exp2's FMA
    if MASKED:
        keep = valid[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + split)
        qk = tl.where(keep, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at zero
    else:
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_safe = m_new
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(qk * qk_scale - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        kept = _dropout_keep(seed, bh, row0, col0 + cols, seq_len, num_cols, dropout_p, BLOCK_M, BLOCK_N)
        p = tl.where(kept, p / (1.0 - dropout_p), 0.0)
    if MASKED:
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0)  # (BN, D)
    else:
        v = tl.load(v_ptrs)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
    return acc, m_new, l_i


@triton.jit
def _attend_block_range(q, acc, m_i, l_i, k_base, v_base, stride_ks, stride_vs, pk_base, pv_base, stride_pks, stride_pvs,
                        split, end, offs_m, qk_scale, bh, row0, seq_len, col0, num_cols, dropout_p, seed,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
                        DROPOUT: tl.constexpr, CONCAT: tl.constexpr):  # fmt: skip
    """Fold key columns 0 .. end-1 (one source, or with CONCAT the prefix then the sequence) into a query block (rows
    row0 ..): the blocks every row sees in full without masks, then the rest (the padding edge, the causal diagonal)
    with them."""
    full_end = (end // BLOCK_N) * BLOCK_N
    if CAUSAL:  # key blocks wholly at or before the first row's last visible column
        full_end = tl.minimum(full_end, ((row0 + split + 1) // BLOCK_N) * BLOCK_N)
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, k_base, v_base, stride_ks, stride_vs, pk_base, pv_base, stride_pks,
                                      stride_pvs, split, start, end, offs_m, qk_scale, bh, row0, seq_len, col0, num_cols,
                                      dropout_p, seed, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, DROPOUT, False, CONCAT)  # fmt: skip
    for start in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = _attend_block(q, acc, m_i, l_i, k_base, v_base, stride_ks, stride_vs, pk_base, pv_base, stride_pks,
                                      stride_pvs, split, start, end, offs_m, qk_scale, bh, row0, seq_len, col0, num_cols,
                                      dropout_p, seed, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, DROPOUT, True, CONCAT)  # fmt: skip
    return acc, m_i, l_i


@triton.jit
def _fwd_body(
    Q, K, V, PK, PV, Lens, Out, Lse,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_pkb, stride_pkh, stride_pks,
    stride_pvb, stride_pvh, stride_pvs,
    stride_ob, stride_oh, stride_os,
    num_heads, kv_group, seq_len, prefix_len, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
    dropout_p, seed, DROPOUT: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    hk = h // kv_group
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = offs_m < seq_len
    qk_scale = scale * LOG2E
    q = tl.load(
        Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    end = tl.minimum(tl.load(Lens + b), seq_len)
    if CAUSAL:
        end = tl.minimum(end, (pid_m + 1) * BLOCK_M)
    pk_base, pv_base = PK + b * stride_pkb + hk * stride_pkh, PV + b * stride_pvb + hk * stride_pvh
    k_base, v_base = K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh
    row0, num_cols = pid_m * BLOCK_M, prefix_len + seq_len
    if BLOCK_P == 0:  # the prefix shares key blocks with the sequence: columns 0 .. P-1, then P .. P+end-1
        acc, m_i, l_i = _attend_block_range(q, acc, m_i, l_i, k_base, v_base, stride_ks, stride_vs, pk_base, pv_base, stride_pks,
                                            stride_pvs, prefix_len, prefix_len + end, offs_m, qk_scale, pid_bh, row0, seq_len, 0,
                                            num_cols, dropout_p, seed, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, DROPOUT, True)  # fmt: skip
    else:  # the prefix BLOCK_P keys at a time, then the sequence
        acc, m_i, l_i = _attend_block_range(q, acc, m_i, l_i, pk_base, pv_base, stride_pks, stride_pvs, pk_base, pv_base, stride_pks,
                                            stride_pvs, 0, prefix_len, offs_m, qk_scale, pid_bh, row0, seq_len, 0, num_cols,
                                            dropout_p, seed, HEAD_DIM, BLOCK_M, BLOCK_P, False, DROPOUT, False)  # fmt: skip
        acc, m_i, l_i = _attend_block_range(q, acc, m_i, l_i, k_base, v_base, stride_ks, stride_vs, k_base, v_base, stride_ks,
                                            stride_vs, 0, end, offs_m, qk_scale, pid_bh, row0, seq_len, prefix_len, num_cols,
                                            dropout_p, seed, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, DROPOUT, False)  # fmt: skip
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(Out + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None])  # fmt: skip
    tl.store(Lse + pid_bh.to(tl.int64) * seq_len + offs_m, lse, mask=row_ok)


@triton.jit
def prefix_attn_fwd(
    Q, K, V, PK, PV, Lens, Out, Lse,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_pkb, stride_pkh, stride_pks,
    stride_pvb, stride_pvh, stride_pvs,
    stride_ob, stride_oh, stride_os,
    num_heads, kv_group, seq_len, prefix_len, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Forward: Out = softmax(scale * Q [PK; K]^T + mask) [PV; V], and Lse = the row log-sum-exp (natural log).

    Arguments, in this order (all strides in elements; the head dim of every tensor must have stride 1):
      Q, K, V, PK, PV, Out: pointers to the same dtype (fp32, fp16 or bf16).
        Q, Out (B, N, S, D), K, V (B, Nkv, S, D), PK, PV (1 or B, Nkv, P, D), addressed as
        ptr + b * stride_*b + h * stride_*h + s * stride_*s + d; a batch-shared prefix passes stride_pkb = stride_pvb = 0.
      Lens: int32 (B,), row b's sequence keys j >= Lens[b] are masked (prefix keys never are).
      Lse: fp32 (B, N, S), contiguous: written at ((b * N + h) * S + s).
      stride_qb, stride_qh, stride_qs, stride_kb, ..., stride_ob, stride_oh, stride_os: int32, 3 per tensor, in the
        order Q, K, V, PK, PV, Out.
      num_heads (N), kv_group (N // Nkv), seq_len (S), prefix_len (P): int32. scale: fp32 (usually D ** -0.5).
      HEAD_DIM (D: 32, 64 or 128), BLOCK_M, BLOCK_N, BLOCK_P (query rows per program, sequence and prefix keys per
        step: 16 or more, powers of 2; BLOCK_P 0: prefix and sequence keys in the same BLOCK_N-wide steps),
        CAUSAL (query i sees sequence keys j <= i): tl.constexpr.
    Grid: (cdiv(S, BLOCK_M), B * N, 1); program (i, b * N + h) computes query rows i*BLOCK_M .. of head h of row b.
    `forward_signature` gives the dicts `triton.compile(ASTSource(...))` needs; `forward_grid` the grid.
    Compiled by triton 3.7, the kernel also takes two trailing pointer parameters (global and profile scratch) that
    an AOT launcher passes as null.
    """
    _fwd_body(Q, K, V, PK, PV, Lens, Out, Lse, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
              stride_vs, stride_pkb, stride_pkh, stride_pks, stride_pvb, stride_pvh, stride_pvs, stride_ob, stride_oh, stride_os,
              num_heads, kv_group, seq_len, prefix_len, scale, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, 0.0, 0, False, BLOCK_P)  # fmt: skip


@triton.jit
def prefix_attn_fwd_dropout(
    Q, K, V, PK, PV, Lens, Out, Lse,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_pkb, stride_pkh, stride_pks,
    stride_pvb, stride_pvh, stride_pvs,
    stride_ob, stride_oh, stride_os,
    num_heads, kv_group, seq_len, prefix_len, scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_P: tl.constexpr,
    dropout_p, Seed,
):  # fmt: skip
    """The training forward: `prefix_attn_fwd` with dropout on the attention weights (each dropped with probability
    dropout_p, fp32, from the Philox stream seeded by the int32 at `Seed`, see `_dropout_keep_t`); the backward replays
    the same draws. The seed is read from device memory, not passed by value, so that a CUDA graph replay (or a
    compiled graph) draws a fresh one with torch's generator instead of repeating the captured mask."""
    seed = tl.load(Seed)
    _fwd_body(Q, K, V, PK, PV, Lens, Out, Lse, stride_qb, stride_qh, stride_qs, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh,
              stride_vs, stride_pkb, stride_pkh, stride_pks, stride_pvb, stride_pvh, stride_pvs, stride_ob, stride_oh, stride_os,
              num_heads, kv_group, seq_len, prefix_len, scale, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, dropout_p, seed, True,
              BLOCK_P)  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Ahead-of-time description of the forward kernel
# ---------------------------------------------------------------------------------------------------------------

_TRITON_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
_POINTERS = ("Q", "K", "V", "PK", "PV", "Lens", "Out", "Lse")
_STRIDES = tuple(f"stride_{t}{a}" for t in ("q", "k", "v", "pk", "pv", "o") for a in "bhs")
_SIZES = ("num_heads", "kv_group", "seq_len", "prefix_len")


class AotSpec(NamedTuple):
    """What `triton.compile(ASTSource(prefix_attn_fwd, signature, constexprs, attrs), target, options)` needs."""

    signature: dict[str, str]  # every argument by name: "*fp16", "i32", "fp32" or "constexpr"
    constexprs: dict[str, int | bool]
    attrs: dict[tuple[int, ...], list[list]]  # divisibility hints ({} when not aligned)
    num_warps: int
    num_stages: int
    block_m: int  # for the grid: (cdiv(S, block_m), B * N, 1)


def block_sizes(dtype: torch.dtype, head_dim: int, backward: bool = False) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of the forward (and, backward=True, the backward) kernels on an
    sm_80 / sm_90 GPU. 8 warps where 4 leave ptxas spilling registers: fp32 at head dims 64 and 128, whose dot
    products run on FMA units with the tiles in registers, and the 16-bit backward at 128 (docs/BENCHMARKS.md, "Kernel
    launch configurations")."""
    if dtype == torch.float32 and head_dim > 64:
        return 32, 32, 8, 2  # the fp32 backward at 64 x 32 needs 107 KB of shared memory: more than sm_86/89 have
    if dtype == torch.float32 and head_dim == 64:
        return 64, 32, 8, 2
    if dtype == torch.float32 or head_dim > 64:
        return 64, 32, 8 if backward and head_dim > 64 else 4, 2
    return 64, 64, 4, 2


def forward_config(dtype: torch.dtype, head_dim: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages, BLOCK_P) of the JIT forward: `block_sizes`, and for fp16/bf16 at head
    dims 32 and 64 the configurations the kernel benchmark's sweep found fastest (docs/BENCHMARKS.md, "Kernel launch
    configurations").

    BLOCK_P 0: the prefix keys share BLOCK_N-wide key blocks with the sequence's (one loop over the concatenated
    columns, never built), so a program runs cdiv(P + length, BLOCK_N) steps instead of cdiv(P, BLOCK_P) +
    cdiv(length, BLOCK_N). The AOT cubins keep `block_sizes`' query blocks (serving runs small batches, where more,
    smaller programs fill the GPU) and prefix steps of 16."""
    block_m, block_n, num_warps, num_stages = block_sizes(dtype, head_dim)
    if dtype != torch.float32 and head_dim == 32:
        block_m, block_n, num_warps, num_stages = 128, 32, 4, 2
    elif dtype != torch.float32 and head_dim == 64:
        num_stages = 3
    return block_m, block_n, num_warps, num_stages, 0


def forward_signature(dtype: torch.dtype, head_dim: int, causal: bool = False, aligned: bool = True) -> AotSpec:
    """The compile description of `prefix_attn_fwd` for one (dtype, head_dim, causal) variant.

    aligned: add divisibility-by-16 hints on every pointer and stride (valid when all tensors start 16-byte aligned and
    every stride is a multiple of 16 elements, as with contiguous (B, S, N*D) or (B, N, S, D) tensors and D in 32, 64,
    128; a prefix batch stride of 0 qualifies). Unhinted arguments still work, with slower loads.
    """
    if dtype not in _TRITON_DTYPE or head_dim not in (32, 64, 128):
        raise ValueError(f"prefix_attn_fwd supports fp32/fp16/bf16 and head dims 32/64/128, got {dtype}, {head_dim}")
    block_m, block_n, num_warps, num_stages = block_sizes(dtype, head_dim)
    ty = _TRITON_DTYPE[dtype]
    ptr_ty = {"Lens": "*i32", "Lse": "*fp32"}
    signature = {p: ptr_ty.get(p, f"*{ty}") for p in _POINTERS}
    signature |= {s: "i32" for s in (*_STRIDES, *_SIZES)}
    signature["scale"] = "fp32"
    # prefix keys in steps of 16 for any P (a model setting, 16 by default): 9-10% faster at P = 16 in the sweep
    constexprs = {"HEAD_DIM": head_dim, "BLOCK_M": block_m, "BLOCK_N": block_n, "CAUSAL": causal, "BLOCK_P": 16}
    signature |= {c: "constexpr" for c in constexprs}
    assert list(signature) == prefix_attn_fwd.arg_names
    hinted = (*_POINTERS, *_STRIDES) if aligned else ()
    attrs = {(prefix_attn_fwd.arg_names.index(a),): [["tt.divisibility", 16]] for a in hinted}
    return AotSpec(signature, constexprs, attrs, num_warps, num_stages, block_m)


def forward_grid(batch: int, num_heads: int, seq_len: int, block_m: int) -> tuple[int, int, int]:
    """Launch grid of `prefix_attn_fwd`."""
    return triton.cdiv(seq_len, block_m), batch * num_heads, 1


# ---------------------------------------------------------------------------------------------------------------
# Backward: dQ per query block (and delta = rowsum(dOut * Out) on the way), then dK/dV per key block
# ---------------------------------------------------------------------------------------------------------------


@triton.jit
def _dkv_block(K, V, PK, PV, DK, DV, DPK, DPV, b, hk, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
               stride_pkb, stride_pkh, stride_pks, stride_pvb, stride_pvh, stride_pvs, stride_dkb, stride_dkh, stride_dks,
               stride_dvb, stride_dvh, stride_dvs, num_kv_heads, prefix_len, start_n, end,
               Q, DOut, Lse, Delta, stride_qb, stride_qh, stride_qs, stride_db, stride_dh, stride_ds,
               num_heads, kv_group, seq_len, scale, num_cols, dropout_p, seed,
               HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr,
               DROPOUT: tl.constexpr):  # fmt: skip
    """dK, dV of key columns start_n .. start_n+BLOCK_N of the concatenation (prefix columns 0 .. P-1, then the
    sequence; visible below `end`), summed over the kv_group query heads that read them: sequence keys' into DK/DV
    (zero past the row's length), prefix keys' into this row's DPK/DPV (fp32)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    valid = cols < end
    is_prefix = cols < prefix_len
    k_base, v_base = K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh
    pk_base, pv_base = PK + b * stride_pkb + hk * stride_pkh, PV + b * stride_pvb + hk * stride_pvh
    k_rows = _kv_rows(k_base, stride_ks, pk_base, stride_pks, cols, prefix_len, True)
    v_rows = _kv_rows(v_base, stride_vs, pv_base, stride_pvs, cols, prefix_len, True)
    k = tl.load(k_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # (BN, D)
    v = tl.load(v_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    qk_scale = scale * LOG2E
    lo = 0
    if CAUSAL:  # queries before the block's first sequence key do not see it (prefix keys: every query does)
        lo = tl.where(start_n < prefix_len, 0, ((start_n - prefix_len) // BLOCK_M) * BLOCK_M)
    hi = tl.where(start_n < end, seq_len, lo)  # a fully masked key block gets zero gradients
    for g in range(kv_group):
        h = hk * kv_group + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DOut + b * stride_db + h * stride_dh
        row_base = (b * num_heads + h) * seq_len
        for start_m in range(lo, hi, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            row_ok = rows < seq_len
            q = tl.load(q_base + rows[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)  # (BM, D)
            do = tl.load(do_base + rows[:, None] * stride_ds + offs_d[None, :], mask=row_ok[:, None], other=0.0)
            lse = tl.load(Lse + row_base + rows, mask=row_ok, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
            delta = tl.load(Delta + row_base + rows, mask=row_ok, other=0.0)
            keep = valid[:, None] & row_ok[None, :]
            if CAUSAL:
                keep = keep & (cols[:, None] <= rows[None, :] + prefix_len)
            p_t = tl.exp2(tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale - lse[None, :])  # (BN, BM)
            p_t = tl.where(keep, p_t, 0.0)
            dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")  # (BN, BM)
            if DROPOUT:
                kept = _dropout_keep_t(seed, b * num_heads + h, start_m, cols, seq_len, num_cols, dropout_p, BLOCK_M, BLOCK_N)
                dv += tl.dot(tl.where(kept, p_t / (1.0 - dropout_p), 0.0).to(do.dtype), do, input_precision="ieee")
                dp_t = tl.where(kept, dp_t / (1.0 - dropout_p), 0.0)
            else:
                dv += tl.dot(p_t.to(do.dtype), do, input_precision="ieee")
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q, input_precision="ieee")
    dk = dk * scale
    seq_rows = (cols >= prefix_len) & (cols < prefix_len + seq_len)  # every sequence key, padding included (zeros)
    seq_off = (cols - prefix_len)[:, None]
    tl.store(DK + b * stride_dkb + hk * stride_dkh + seq_off * stride_dks + offs_d[None, :], dk.to(DK.dtype.element_ty),
             mask=seq_rows[:, None])  # fmt: skip
    tl.store(DV + b * stride_dvb + hk * stride_dvh + seq_off * stride_dvs + offs_d[None, :], dv.to(DV.dtype.element_ty),
             mask=seq_rows[:, None])  # fmt: skip
    prefix_base = (b * num_kv_heads + hk) * prefix_len * HEAD_DIM
    prefix_off = cols[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(DPK + prefix_base + prefix_off, dk, mask=is_prefix[:, None])
    tl.store(DPV + prefix_base + prefix_off, dv, mask=is_prefix[:, None])


@triton.jit
def prefix_attn_bwd_dkv(
    Q, K, V, PK, PV, DOut, Lse, Delta, Lens, DK, DV, DPK, DPV,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_pkb, stride_pkh, stride_pks,
    stride_pvb, stride_pvh, stride_pvs,
    stride_db, stride_dh, stride_ds,
    stride_dkb, stride_dkh, stride_dks,
    stride_dvb, stride_dvh, stride_dvs,
    num_heads, num_kv_heads, seq_len, prefix_len, scale, dropout_p, Seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    """dK, dV (B, Nkv, S, D) and per-row prefix grads DPK, DPV (B, Nkv, P, D) fp32 contiguous.

    Grid (cdiv(P + S, BLOCK_N), B * Nkv): program (j, b * Nkv + hk) takes key columns j * BLOCK_N .. of the
    concatenation [prefix; sequence] (never built: a block may hold prefix and sequence keys together). Lse and Delta
    as written by the forward and `prefix_attn_bwd_dq`; Seed as the forward's (read only with DROPOUT).
    """
    seed = tl.load(Seed) if DROPOUT else 0
    pid_n, pid_bh = tl.program_id(0), tl.program_id(1)
    b, hk = (pid_bh // num_kv_heads).to(tl.int64), (pid_bh % num_kv_heads).to(tl.int64)
    end = prefix_len + tl.minimum(tl.load(Lens + b), seq_len)
    _dkv_block(K, V, PK, PV, DK, DV, DPK, DPV, b, hk, stride_kb, stride_kh, stride_ks, stride_vb, stride_vh, stride_vs,
               stride_pkb, stride_pkh, stride_pks, stride_pvb, stride_pvh, stride_pvs, stride_dkb, stride_dkh, stride_dks,
               stride_dvb, stride_dvh, stride_dvs, num_kv_heads, prefix_len, pid_n * BLOCK_N, end,
               Q, DOut, Lse, Delta, stride_qb, stride_qh, stride_qs, stride_db, stride_dh, stride_ds,
               num_heads, num_heads // num_kv_heads, seq_len, scale, prefix_len + seq_len, dropout_p, seed,
               HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, DROPOUT)  # fmt: skip


@triton.jit
def _dq_block_range(q, do, lse, delta, dq, k_base, v_base, stride_ks, stride_vs, pk_base, pv_base, stride_pks, stride_pvs,
                    prefix_len, end, rows, qk_scale, bh, row0, seq_len, num_cols, dropout_p, seed, HEAD_DIM: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr):  # fmt: skip
    """Add the contribution of key columns 0 .. end-1 of the concatenation (the prefix's P, then the sequence's;
    `_kv_rows`) to dQ / scale of a query block: a block may hold prefix and sequence keys together."""
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    for start in range(0, end, BLOCK_N):
        cols = start + offs_n
        valid = cols < end
        k_rows = _kv_rows(k_base, stride_ks, pk_base, stride_pks, cols, prefix_len, True)
        v_rows = _kv_rows(v_base, stride_vs, pv_base, stride_pvs, cols, prefix_len, True)
        k = tl.load(k_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)  # (BN, D)
        v = tl.load(v_rows[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        keep = valid[None, :]
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + prefix_len)
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale - lse[:, None])  # (BM, BN)
        p = tl.where(keep, p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        if DROPOUT:
            kept = _dropout_keep(seed, bh, row0, cols, seq_len, num_cols, dropout_p, BLOCK_M, BLOCK_N)
            dp = tl.where(kept, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision="ieee")
    return dq


@triton.jit
def prefix_attn_bwd_dq(
    Q, K, V, PK, PV, Out, DOut, Lse, Delta, Lens, DQ,
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_ks,
    stride_vb, stride_vh, stride_vs,
    stride_pkb, stride_pkh, stride_pks,
    stride_pvb, stride_pvh, stride_pvs,
    stride_ob, stride_oh, stride_os,
    stride_db, stride_dh, stride_ds,
    stride_dqb, stride_dqh, stride_dqs,
    num_heads, kv_group, seq_len, prefix_len, scale, dropout_p, Seed,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
):  # fmt: skip
    """dQ (B, N, S, D), and Delta (B, N, S) fp32 contiguous = rowsum(DOut * Out), which `prefix_attn_bwd_dkv` reads
    (launched after this kernel). Grid (cdiv(S, BLOCK_M), B * N), as the forward. Seed as the forward's (read only
    with DROPOUT)."""
    seed = tl.load(Seed) if DROPOUT else 0
    pid_m, pid_bh = tl.program_id(0), tl.program_id(1)
    b, h = (pid_bh // num_heads).to(tl.int64), (pid_bh % num_heads).to(tl.int64)
    hk = h // kv_group
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    row_ok = rows < seq_len
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qs + offs_d[None, :], mask=row_ok[:, None], other=0.0)
    do = tl.load(
        DOut + b * stride_db + h * stride_dh + rows[:, None] * stride_ds + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )
    lse = tl.load(Lse + pid_bh.to(tl.int64) * seq_len + rows, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * LOG2E
    o = tl.load(
        Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_os + offs_d[None, :], mask=row_ok[:, None], other=0.0
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + pid_bh.to(tl.int64) * seq_len + rows, delta, mask=row_ok)
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    end = tl.minimum(tl.load(Lens + b), seq_len)
    if CAUSAL:
        end = tl.minimum(end, (pid_m + 1) * BLOCK_M)
    dq = _dq_block_range(q, do, lse, delta, dq, K + b * stride_kb + hk * stride_kh, V + b * stride_vb + hk * stride_vh, stride_ks,
                         stride_vs, PK + b * stride_pkb + hk * stride_pkh, PV + b * stride_pvb + hk * stride_pvh, stride_pks,
                         stride_pvs, prefix_len, prefix_len + end, rows, qk_scale, pid_bh, pid_m * BLOCK_M, seq_len,
                         prefix_len + seq_len, dropout_p, seed, HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, DROPOUT)  # fmt: skip
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqs + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
             mask=row_ok[:, None])  # fmt: skip


# ---------------------------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, head, position) strides of a (B, N, S, D) tensor; a batch of 1 reads as batch stride 0 (shared)."""
    if t.stride(-1) != 1:
        raise ValueError("prefix attention needs the head dim contiguous (stride 1)")
    return (0 if t.shape[0] == 1 else t.stride(0)), t.stride(1), t.stride(2)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, lengths: torch.Tensor,
            causal: bool, scale: float, dropout_p: float = 0.0, seed: torch.Tensor | None = None,
            config: tuple[int, int, int, int] | None = None, block_p: int | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Launch the forward. q (B, N, S, D), k/v (B, Nkv, S, D), pk/pv (1 or B, Nkv, P, D), lengths int32 (B,); with
    dropout_p > 0 the attention weights are dropped from the Philox stream seeded by `seed` (an int32 tensor of one
    element on q's device, read by the kernels). config: (BLOCK_M, BLOCK_N, num_warps, num_stages) and block_p
    (prefix keys per step) in place of `forward_config`'s (the kernel benchmark's sweep).

    Returns out (B, N, S, D) (a transposed view of (B, S, N, D) memory) and lse float32 (B, N, S).
    """
    b, n, s, d = q.shape
    out = torch.empty(b, s, n, d, dtype=q.dtype, device=q.device).transpose(1, 2)  # (B, N, S, D)
    lse = torch.empty(b, n, s, dtype=torch.float32, device=q.device)
    block_m, block_n, num_warps, num_stages, default_p = forward_config(q.dtype, d)
    if config is not None:
        block_m, block_n, num_warps, num_stages = config
    args = (q, k, v, pk, pv, lengths, out, lse, *_strides(q), *_strides(k), *_strides(v), *_strides(pk), *_strides(pv), *_strides(out),
            n, n // k.shape[1], s, pk.shape[2], scale)  # fmt: skip
    meta = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_P=default_p if block_p is None else block_p, CAUSAL=causal, num_warps=num_warps,
                num_stages=num_stages)  # fmt: skip
    grid = forward_grid(b, n, s, block_m)
    if dropout_p > 0.0:
        if seed is None:
            raise ValueError("dropout needs a seed: an int32 tensor of one element on q's device")
        prefix_attn_fwd_dropout[grid](*args, dropout_p=dropout_p, Seed=seed, **meta)
    else:
        prefix_attn_fwd[grid](*args, **meta)
    return out, lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor,
             lengths: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, causal: bool, scale: float, dropout_p: float = 0.0,
             seed: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:  # fmt: skip
    """Launch the backward. Shapes and dropout as `forward`; do like out. Returns dq, dk, dv, dpk, dpv shaped like
    their inputs (a batch-shared prefix gets the gradient summed over the batch)."""
    b, n, s, d = q.shape
    nkv, p = k.shape[1], pk.shape[2]
    block_m, block_n, num_warps, num_stages = block_sizes(q.dtype, d, backward=True)
    delta = torch.empty_like(lse)  # (B, N, S), written by the dQ kernel, read by the dK/dV kernel
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    dpk = torch.empty(b, nkv, p, d, dtype=torch.float32, device=q.device)  # per batch row, summed below if shared
    dpv = torch.empty_like(dpk)
    common = (*_strides(q), *_strides(k), *_strides(v), *_strides(pk), *_strides(pv))
    if dropout_p > 0.0 and seed is None:
        raise ValueError("dropout needs the forward's seed tensor")
    seed = lengths if seed is None else seed  # without dropout the kernels never read it: any int32 pointer
    meta = dict(HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, CAUSAL=causal, DROPOUT=dropout_p > 0.0, num_warps=num_warps,
                num_stages=num_stages)  # fmt: skip
    prefix_attn_bwd_dq[forward_grid(b, n, s, block_m)](q, k, v, pk, pv, out, do, lse, delta, lengths, dq, *common, *_strides(out),
                                                       *_strides(do), *_strides(dq), n, n // nkv, s, p, scale, dropout_p, seed,
                                                       **meta)  # fmt: skip
    grid = (triton.cdiv(p + s, block_n), b * nkv, 1)
    prefix_attn_bwd_dkv[grid](q, k, v, pk, pv, do, lse, delta, lengths, dk, dv, dpk, dpv, *common, *_strides(do), *_strides(dk),
                              *_strides(dv), n, nkv, s, p, scale, dropout_p, seed, **meta)  # fmt: skip
    if pk.shape[0] == 1:
        dpk, dpv = dpk.sum(0, keepdim=True), dpv.sum(0, keepdim=True)
    return dq, dk, dv, dpk.to(pk.dtype), dpv.to(pv.dtype)
