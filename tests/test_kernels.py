"""The Triton prefix-attention kernels against a float64 reference.

On CPU the test_interpreted_* tests run the kernels under the Triton interpreter, in a subprocess started with
TRITON_INTERPRET=1 (test_kernels_under_the_interpreter), so the variable never leaks into other test modules and the
GPU tests (marker ``gpu``) compile the real kernels. The gate: the kernel's error against float64 is at most twice the
error of the same computation in the input dtype in PyTorch, plus a small absolute floor.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from kernels import prefix_attention
from kernels.op import prefix_attn
from kernels.prefix_attention import _dropout_keep, forward_signature, prefix_attn_fwd
from kernels.reference import prefix_attn_reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOOR = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}  # slack over 2x the PyTorch error, per unit of |value|
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


interpreted = pytest.mark.interpreted  # collected only under the interpreter (tests/conftest.py), i.e. in the subprocess below


def test_kernels_under_the_interpreter():
    """Run this file's test_interpreted_* tests in a subprocess with TRITON_INTERPRET=1 (it must be set before triton is
    imported, so it cannot be switched on inside this process without affecting every other test module)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-m", "interpreted"]
    done = subprocess.run(cmd, env=env, cwd=Path(__file__).parents[1], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout, done.stdout[-2000:]


@dataclass(frozen=True)
class Case:
    b: int = 2
    n: int = 2
    nkv: int = 2
    s: int = 17
    p: int = 20
    d: int = 32
    causal: bool = False
    shared: bool = True  # prefix (1, Nkv, P, D) for the batch, else (B, Nkv, P, D)
    lengths: tuple[int, ...] | None = None  # None: no padding
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:
        flags = ("causal " if self.causal else "") + ("shared" if self.shared else "per-row")
        return f"b{self.b} n{self.n}/{self.nkv} s{self.s} p{self.p} d{self.d} {flags} len{self.lengths} {str(self.dtype)[6:]}"


SPECIAL = [
    Case(b=1, s=1, p=0),
    Case(b=3, s=17, p=0, lengths=(17, 0, 3), causal=True),  # row 1 fully masked: zeros, no NaN
    Case(b=2, s=17, p=20, lengths=(0, 4)),  # row 0 sees only the prefix
    Case(n=4, nkv=1, s=17, p=20, lengths=(17, 8)),  # grouped-query attention, 4 query heads per kv head
    Case(s=40, p=37, causal=True, lengths=(40, 9)),  # a prefix over two 32-key blocks, the second shared with the sequence
    Case(b=8, n=12, nkv=12, s=128, p=16, d=32, lengths=tuple(range(128, 0, -16)), dtype=torch.float16),  # MiniLM-shaped
]
# every sequence length x prefix length x head dim, rotating causal / per-row prefix / GQA / padding / dtype through them
GRID = [
    Case(n=4 if i % 3 == 0 else 2, nkv=2, s=s, p=p, d=d, causal=i % 2 == 1, shared=i % 4 < 2,
         lengths=(s, s // 2 if i % 5 else 0), dtype=torch.float16 if i % 3 == 2 else torch.float32)
    for i, (s, p, d) in enumerate(itertools.product((1, 17, 97), (0, 1, 20), (32, 64, 128)))
]  # fmt: skip
CASES = SPECIAL + GRID


def _inputs(c: Case, device: str, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    pb = 1 if c.shared else c.b
    shapes = [(c.b, c.n, c.s, c.d), (c.b, c.nkv, c.s, c.d), (c.b, c.nkv, c.s, c.d), (pb, c.nkv, c.p, c.d), (pb, c.nkv, c.p, c.d)]
    tensors = [torch.randn(sh, generator=g).to(device, c.dtype) for sh in shapes]
    lengths = torch.tensor(c.lengths if c.lengths is not None else [c.s] * c.b, dtype=torch.int32, device=device)
    grad_out = torch.randn(c.b, c.n, c.s, c.d, generator=g).to(device, c.dtype)
    return tensors, lengths, grad_out


def _run(fn, tensors, lengths, grad_out, causal):
    """Output and gradients (q, k, v, prefix k, prefix v) of fn, each as float64."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    out = fn(*leaves, lengths, causal)
    out.backward(grad_out.to(out.dtype))
    return [out.double()] + [t.grad.double() if t.grad is not None else torch.zeros_like(t, dtype=torch.float64) for t in leaves]


def _reference(dtype, dropout_p=0.0, dropout_mask=None):
    def fn(q, k, v, pk, pv, lengths, causal):
        cast = (t.to(dtype) for t in (q, k, v, pk, pv))
        return prefix_attn_reference(*cast, lengths, causal, dropout_p=dropout_p, dropout_mask=dropout_mask)[0]

    return fn


def _kernel(dropout_p=0.0, seed: int | torch.Tensor = 0):
    """The op with a known dropout seed (prefix_attn would draw one)."""

    def fn(q, k, v, pk, pv, lengths, causal):
        s = torch.tensor([seed], dtype=torch.int32, device=q.device) if isinstance(seed, int) else seed
        return torch.ops.edgetune.prefix_attn(q, k, v, pk, pv, lengths, causal, q.shape[-1] ** -0.5, dropout_p, s if dropout_p else None)[0]  # fmt: skip

    return fn


@triton.jit
def _dropout_keep_kernel(Keep, seed, dropout_p, seq_len, num_cols, BLOCK: tl.constexpr):
    """Keep (B * N, S, P + S) int8: the kernels' dropout draws, materialised. Grid (B * N, cdiv(S, BLOCK), cdiv(P + S,
    BLOCK))."""
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    cols = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    kept = _dropout_keep(seed, bh, tl.program_id(1) * BLOCK, cols, seq_len, num_cols, dropout_p, BLOCK, BLOCK)
    tl.store(
        Keep + (bh * seq_len + rows[:, None]) * num_cols + cols[None, :],
        kept.to(tl.int8),
        mask=(rows[:, None] < seq_len) & (cols[None, :] < num_cols),
    )


def dropout_mask(c: Case, dropout_p: float, seed: int, device: str) -> torch.Tensor:
    """The kernels' dropout mask for case c, bool (B, N, S, P+S), True = kept."""
    keep = torch.empty(c.b, c.n, c.s, c.p + c.s, dtype=torch.int8, device=device)
    grid = (c.b * c.n, triton.cdiv(c.s, 32), triton.cdiv(c.p + c.s, 32))
    _dropout_keep_kernel[grid](keep, seed, dropout_p, c.s, c.p + c.s, BLOCK=32)
    return keep.bool()


def _max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def check_against_float64(c: Case, device: str, dropout_p: float = 0.0, seed: int = 0) -> list[tuple[str, float, float]]:
    """Assert the gate on output and every gradient; return (name, kernel error, PyTorch error) triples. With dropout
    the references apply the kernels' own mask."""
    tensors, lengths, grad_out = _inputs(c, device)
    mask = dropout_mask(c, dropout_p, seed, device) if dropout_p else None
    exact = _run(_reference(torch.float64, dropout_p, mask), tensors, lengths, grad_out, c.causal)
    same = _run(_reference(c.dtype, dropout_p, mask), tensors, lengths, grad_out, c.causal)
    ours = _run(_kernel(dropout_p, seed), tensors, lengths, grad_out, c.causal)
    report = []
    for name, e, s, o in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), exact, same, ours, strict=True):
        assert o.shape == e.shape and torch.isfinite(o).all(), name
        err, torch_err = _max_err(o, e), _max_err(s, e)
        floor = FLOOR[c.dtype] * max(1.0, e.abs().max().item() if e.numel() else 0.0)
        assert err <= 2 * torch_err + floor, f"{c} {name}: kernel error {err:.2e}, PyTorch {c.dtype} error {torch_err:.2e}"
        report.append((name, err, torch_err))
    if c.lengths is not None:  # padded keys get exactly zero gradient; rows with nothing visible give exactly zero
        for b, n in enumerate(c.lengths):
            assert (ours[2][b, :, n:] == 0).all() and (ours[3][b, :, n:] == 0).all()
            if n == 0 and c.p == 0:
                assert (ours[0][b] == 0).all() and (ours[1][b] == 0).all()
    return report


@interpreted
@pytest.mark.parametrize("case", CASES, ids=str)
def test_interpreted_kernel_matches_float64(case):
    check_against_float64(case, "cpu")


DROPOUT_CASES = [
    Case(n=4, nkv=2, s=17, p=20, causal=True, lengths=(17, 6)),
    Case(s=97, p=1, d=64, shared=False, lengths=(50, 97), dtype=torch.float16),
]


@interpreted
@pytest.mark.parametrize("case", DROPOUT_CASES, ids=str)
def test_interpreted_dropout_matches_float64_with_the_same_mask(case):
    mask = dropout_mask(case, 0.25, 1234, "cpu")
    assert abs(mask.float().mean().item() - 0.75) < 0.02 and not torch.equal(mask, dropout_mask(case, 0.25, 1235, "cpu"))
    check_against_float64(case, "cpu", dropout_p=0.25, seed=1234)


@interpreted
@pytest.mark.parametrize("dropout_p", [0.1, 0.25])
def test_interpreted_dropout_draws_look_independent(dropout_p):
    """Eight query rows share a Philox call (two 16-bit halves of each of its four words): every row of a group keeps
    with probability 1 - p, and rows 1..7 apart agree as independent draws do, p**2 + (1-p)**2 of the time."""
    c = Case(b=2, n=4, s=97, p=20)
    mask = dropout_mask(c, dropout_p, 99, "cpu").float()  # (B, N, S, P+S): 776 rows x 117 columns
    for j in range(8):
        assert abs(mask[:, :, j::8].mean().item() - (1 - dropout_p)) < 0.02, j
    for offset in range(1, 8):
        agree = (mask[:, :, offset:] == mask[:, :, :-offset]).float().mean().item()
        assert abs(agree - (dropout_p**2 + (1 - dropout_p) ** 2)) < 0.02, (offset, agree)
    assert abs((mask[:, :, :, 1:] == mask[:, :, :, :-1]).float().mean().item() - (dropout_p**2 + (1 - dropout_p) ** 2)) < 0.02


@interpreted
def test_interpreted_dropout_through_prefix_attn_is_seeded_by_torch():
    (q, k, v, pk, pv), lengths, _ = _inputs(Case(s=17, p=4), "cpu")
    runs = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        runs.append(prefix_attn(q, k, v, pk, pv, lengths, dropout_p=0.5))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert _max_err(runs[0], prefix_attn(q, k, v, pk, pv, lengths)) > 0.1


@interpreted
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("d", [32, 64, 128])
@pytest.mark.parametrize("p", [16, 37])
def test_interpreted_forward_with_the_ahead_of_time_blocks(p, d, dtype):
    """Every cubin's compile-time blocks (forward_signature: prefix steps of 16 for any P), launched through the JIT."""
    c = Case(n=4, nkv=2, s=40, p=p, d=d, shared=False, lengths=(40, 19), dtype=dtype)
    (q, k, v, pk, pv), lengths, _ = _inputs(c, "cpu")
    spec = forward_signature(dtype, d)
    x = spec.constexprs
    out, _ = prefix_attention.forward(q, k, v, pk, pv, lengths, False, c.d**-0.5,
                                      config=(x["BLOCK_M"], x["BLOCK_N"], spec.num_warps, spec.num_stages), block_p=x["BLOCK_P"])  # fmt: skip
    exact = prefix_attn_reference(q, k, v, pk, pv, lengths, dtype=torch.float64)[0]
    same = prefix_attn_reference(q, k, v, pk, pv, lengths)[0]
    assert _max_err(out.double(), exact) <= 2 * _max_err(same.double(), exact) + FLOOR[dtype]


def _same_as_the_op(c: Case, dropout_p: float) -> None:
    """prefix_attn's eager autograd (kernels.op._PrefixAttnFunction) gives exactly the output and gradients of the
    op's registered autograd, dropout included (prefix_attn draws its seed from torch's generator)."""
    tensors, lengths, grad_out = _inputs(c, "cpu")
    torch.manual_seed(7)
    seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int32)  # prefix_attn's draw

    def through_prefix_attn(q, k, v, pk, pv, lengths, causal):
        torch.manual_seed(7)
        out = prefix_attn(q, k, v, pk, pv, lengths, causal, dropout_p=dropout_p)
        assert type(out.grad_fn).__name__ == "_PrefixAttnFunctionBackward"
        return out

    ours = _run(through_prefix_attn, tensors, lengths, grad_out, c.causal)
    ops = _run(_kernel(dropout_p, seed), tensors, lengths, grad_out, c.causal)
    for name, a, b in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), ours, ops, strict=True):
        assert torch.equal(a, b), name


@interpreted
def test_interpreted_prefix_attn_autograd_is_the_ops():
    _same_as_the_op(Case(n=4, nkv=2, s=17, p=20, causal=True, lengths=(17, 6)), dropout_p=0.25)


def test_prefix_attn_autograd_is_the_ops_on_the_reference_path():
    _same_as_the_op(Case(n=4, nkv=2, s=17, p=20, d=8, causal=True, lengths=(17, 6)), dropout_p=0.0)  # d=8: reference


def _compiles_in_one_graph(c: Case, dropout_p: float) -> None:
    """torch.compile(fullgraph=True) traces prefix_attn without a graph break (the dropout seed is a tensor drawn in
    the graph, not a Python int), and gives exactly eager's output and gradients from the same torch seed."""
    tensors, lengths, grad_out = _inputs(c, "cpu")

    def attend(q, k, v, pk, pv, lengths, causal):
        return prefix_attn(q, k, v, pk, pv, lengths, causal, dropout_p=dropout_p)

    torch._dynamo.reset()
    runs = []
    for fn in (attend, torch.compile(attend, fullgraph=True, backend="aot_eager")):
        torch.manual_seed(11)
        runs.append(_run(fn, tensors, lengths, grad_out, c.causal))
    for name, a, b in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), *runs, strict=True):
        assert torch.equal(a, b), name


@interpreted
def test_interpreted_dropout_compiles_in_one_graph():
    _compiles_in_one_graph(Case(n=4, nkv=2, s=17, p=20, causal=True, lengths=(17, 6)), dropout_p=0.25)


def test_prefix_attn_compiles_in_one_graph_on_the_reference_path():
    _compiles_in_one_graph(Case(n=4, nkv=2, s=17, p=20, d=8, lengths=(17, 6)), dropout_p=0.0)  # d=8: reference


@interpreted
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("p", [1, 16, 37])
def test_interpreted_forward_with_narrow_shared_key_blocks(p, causal):
    """The forward's key blocks over [prefix; sequence] at their narrowest (16 keys): the prefix ends inside a block,
    at its edge, or after two blocks and a part."""
    c = Case(n=4, nkv=2, s=40, p=p, causal=causal, shared=False, lengths=(40, 19))
    (q, k, v, pk, pv), lengths, _ = _inputs(c, "cpu")
    out, _ = prefix_attention.forward(q, k, v, pk, pv, lengths, causal, c.d**-0.5, config=(32, 16, 4, 2), block_p=0)
    exact = prefix_attn_reference(q, k, v, pk, pv, lengths, causal, dtype=torch.float64)[0]
    same = prefix_attn_reference(q, k, v, pk, pv, lengths, causal)[0]
    assert _max_err(out.double(), exact) <= 2 * _max_err(same.double(), exact) + FLOOR[c.dtype]


@interpreted
def test_interpreted_log_sum_exp_for_the_backward():
    c = Case(b=3, s=17, p=1, lengths=(17, 0, 5), causal=True)
    (q, k, v, pk, pv), lengths, _ = _inputs(c, "cpu")
    _, lse = prefix_attention.forward(q, k, v, pk, pv, lengths, True, c.d**-0.5)
    _, exact = prefix_attn_reference(q, k, v, pk, pv, lengths, True, dtype=torch.float64)
    _, same = prefix_attn_reference(q, k, v, pk, pv, lengths, True)
    fin = exact.isfinite()  # the empty row's -inf: the same in all three
    assert torch.equal(lse.isfinite(), fin) and torch.equal(same.isfinite(), fin)
    assert _max_err(lse.double()[fin], exact[fin]) <= 2 * _max_err(same.double()[fin], exact[fin]) + FLOOR[c.dtype]
    c = Case(b=1, s=5, p=0, lengths=(0,))
    (q, k, v, pk, pv), lengths, _ = _inputs(c, "cpu")
    out, lse = prefix_attention.forward(q, k, v, pk, pv, lengths, False, c.d**-0.5)
    assert (lse == float("-inf")).all() and (out == 0).all()


@interpreted
def test_interpreted_prefix_and_padding_change_the_output():
    """A kernel that dropped the prefix or ignored the lengths would fail the gate above: show it would be caught."""
    c = Case(s=17, p=20, lengths=(17, 5))
    (q, k, v, pk, pv), lengths, _ = _inputs(c, "cpu")
    ours = prefix_attn(q, k, v, pk, pv, lengths)
    exact = prefix_attn_reference(q, k, v, pk, pv, lengths, dtype=torch.float64)[0]
    assert _max_err(ours.double(), exact) < FLOOR[c.dtype]
    assert _max_err(prefix_attn_reference(q, k, v, pk[:, :, :0], pv[:, :, :0], lengths)[0].double(), exact) > 0.1
    assert _max_err(prefix_attn_reference(q, k, v, pk, pv, torch.full_like(lengths, c.s))[0].double(), exact) > 0.1
    assert _max_err(prefix_attn_reference(q, k, v, pk, pv, lengths, causal=True)[0].double(), exact) > 0.1


@interpreted
def test_interpreted_strided_views_need_no_copies():
    """q/k/v as (B, S, N, D) views of a fused (B, S, 3*N*D) projection, as BERT produces them."""
    b, s, n, d = 2, 17, 2, 32
    qkv = torch.randn(b, s, 3 * n * d)
    q, k, v = (t.view(b, s, n, d).transpose(1, 2) for t in qkv.split(n * d, dim=-1))  # (B, N, S, D), strided
    pk, pv = torch.randn(2, 1, n, 3, d).unbind(0)
    lengths = torch.tensor([17, 9])
    exact = prefix_attn_reference(q, k, v, pk, pv, lengths, dtype=torch.float64)[0]
    assert _max_err(prefix_attn(q, k, v, pk, pv, lengths).double(), exact) < FLOOR[torch.float32]


def test_no_prefix_and_shape_errors():
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2, 5, 8)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    exact = sdpa(q.double(), *(k.double().repeat_interleave(2, 1),) * 2)
    same = sdpa(q, *(k.repeat_interleave(2, 1),) * 2)
    assert _max_err(prefix_attn(q, k, k, None, None, None).double(), exact) <= 2 * _max_err(same.double(), exact) + FLOOR[q.dtype]
    with pytest.raises(ValueError, match="Nkv dividing N"):
        prefix_attn(q, torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8), None, None, None)
    with pytest.raises(ValueError, match="share a dtype"):
        prefix_attn(q, k.half(), k, None, None, None)
    with pytest.raises(ValueError, match="prefix_k/prefix_v"):
        prefix_attn(q, k, k, torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8), None)


@interpreted
def test_interpreted_op_registration():
    """torch.library's own checks of the fake (shapes/strides) and autograd registrations, on the interpreted kernels."""
    (q, k, v, pk, pv), lengths, _ = _inputs(Case(b=2, s=5, p=3, lengths=(5, 2)), "cpu")
    inputs = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    torch.library.opcheck(torch.ops.edgetune.prefix_attn.default, (*inputs, lengths, False, 0.125, 0.0, None))


def test_op_registration_on_the_reference_path():
    (q, k, v, pk, pv), lengths, _ = _inputs(Case(b=2, n=4, nkv=2, s=5, p=3, d=8, lengths=(5, 0)), "cpu")  # d=8: reference
    inputs = [t.requires_grad_() for t in (q, k, v, pk, pv)]
    torch.library.opcheck(torch.ops.edgetune.prefix_attn.default, (*inputs, lengths, True, 0.3, 0.0, None))


def _by_hand(dtype):
    """Attention written out one query at a time, in ``dtype``: softmax(q . keys * scale) @ values over the prefix
    keys, then the sequence keys j < lengths[b] (and j <= i when causal); zeros where no key is visible. It selects
    the visible keys by slicing, where prefix_attn_reference builds a mask and fills it, so the two share no code
    beyond torch's softmax and matmul: the reference's independent float64 yardstick."""

    def fn(q, k, v, pk, pv, lengths, causal):
        q, k, v, pk, pv = (t.to(dtype) for t in (q, k, v, pk, pv))
        b, n, s, d = q.shape
        group, scale = n // k.shape[1], d**-0.5
        rows = []
        for row in range(b):
            pr = row if pk.shape[0] > 1 else 0  # a batch-shared prefix has one row
            heads = []
            for h in range(n):
                kv = h // group
                outs = []
                for i in range(s):
                    last = min(int(lengths[row]), i + 1 if causal else s)
                    keys = torch.cat([pk[pr, kv], k[row, kv, :last]])  # (P + last, D)
                    values = torch.cat([pv[pr, kv], v[row, kv, :last]])
                    outs.append(torch.softmax(keys @ q[row, h, i] * scale, 0) @ values if len(keys) else q.new_zeros(d))
                heads.append(torch.stack(outs))
            rows.append(torch.stack(heads))
        return torch.stack(rows)

    return fn


@pytest.mark.parametrize(
    "case",
    [
        Case(n=4, nkv=2, s=17, p=20, d=8, lengths=(17, 0), causal=True),  # GQA; row 1 sees only the prefix
        Case(b=3, s=9, p=5, d=8, shared=False, lengths=(9, 4, 1)),  # a prefix per row, padding
        Case(b=2, s=9, p=0, d=8, causal=True, lengths=(9, 0)),  # no prefix; row 1 sees nothing: zeros
    ],
    ids=str,
)
def test_reference_path_on_cpu_without_interpreter(case):
    """At head dim 8 the op runs prefix_attn_reference, the float64 yardstick of every kernel test above, so
    check_against_float64 would compare the reference with itself. Here the op and the reference (in fp32 and in
    float64) are held to attention by hand in float64, output and every gradient, by the file's gate: at most twice
    the error of the same computation by hand in fp32, plus the floor. A dropped prefix, a wrong scale or an ignored
    mask moves the output by orders of magnitude more."""
    tensors, lengths, grad_out = _inputs(case, "cpu")
    exact = _run(_by_hand(torch.float64), tensors, lengths, grad_out, case.causal)
    same = _run(_by_hand(case.dtype), tensors, lengths, grad_out, case.causal)
    under_test = {"op": _kernel(), "fp32 reference": _reference(case.dtype), "float64 reference": _reference(torch.float64)}
    for what, fn in under_test.items():
        ours = _run(fn, tensors, lengths, grad_out, case.causal)
        for name, e, s, o in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), exact, same, ours, strict=True):
            assert o.shape == e.shape and torch.isfinite(o).all(), (what, name)
            err, hand_err = _max_err(o, e), _max_err(s, e)
            floor = FLOOR[case.dtype] * max(1.0, e.abs().max().item() if e.numel() else 0.0)
            assert err <= 2 * hand_err + floor, f"{case} {what} {name}: error {err:.2e}, by hand in {case.dtype} {hand_err:.2e}"


def test_forward_compiles_ahead_of_time_for_sm90():
    """The contract with the AOT build: forward_signature's dicts compile, and the cubin takes the documented
    parameters (8 pointers, 22 int32, 1 float, then triton's 2 scratch pointers)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    spec = forward_signature(torch.float16, 64, causal=True)
    kernel = triton.compile(ASTSource(prefix_attn_fwd, spec.signature, spec.constexprs, spec.attrs), target=GPUTarget("cuda", 90, 32),
                            options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})  # fmt: skip
    params = re.findall(r"\.param \.(\w+)", kernel.asm["ptx"].split(")")[0])
    assert params == ["u64"] * 8 + ["u32"] * 22 + ["f32"] + ["u64"] * 2
    assert kernel.asm["cubin"] and kernel.name == "prefix_attn_fwd"


def test_training_kernels_compile_for_sm90():
    """The interpreter does not type-check like the compiler: compile the training kernels (dropout forward, the
    two backward kernels) for sm_90 with the JIT's block sizes, as a GPU would (no GPU needed): bf16 at head dim 64,
    and the backward's largest tiles (fp32 and fp16 at 128) within the 99 KB of shared memory an sm_86/89 has."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from kernels.prefix_attention import (
        block_sizes,
        forward_config,
        prefix_attn_bwd_dkv,
        prefix_attn_bwd_dq,
        prefix_attn_fwd_dropout,
    )

    names = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
    fp32_pointers = {"Lse", "Delta", "DPK", "DPV"}
    bm, bn, warps, stages, bp = forward_config(torch.bfloat16, 64)
    jobs = [
        (
            prefix_attn_fwd_dropout,
            torch.bfloat16,
            dict(HEAD_DIM=64, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, BLOCK_P=bp),
            (warps, stages),
        )
    ]
    for dtype, d in ((torch.bfloat16, 64), (torch.float32, 128), (torch.float16, 128)):
        bm, bn, warps, stages = block_sizes(dtype, d, backward=True)
        jobs += [(fn, dtype, dict(HEAD_DIM=d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=True, DROPOUT=True), (warps, stages))
                 for fn in (prefix_attn_bwd_dkv, prefix_attn_bwd_dq)]  # fmt: skip
    for fn, dtype, constexprs, (warps, stages) in jobs:
        signature = {
            a: "constexpr" if a in constexprs
            else "*i32" if a in ("Lens", "Seed") else "*fp32" if a in fp32_pointers else f"*{names[dtype]}" if a[0].isupper()
            else "fp32" if a in ("scale", "dropout_p") else "i32"
            for a in fn.arg_names
        }  # fmt: skip
        kernel = triton.compile(ASTSource(fn, signature, constexprs, {}), target=GPUTarget("cuda", 90, 32),
                                options={"num_warps": warps, "num_stages": stages})  # fmt: skip
        assert kernel.asm["cubin"] and kernel.metadata.shared <= 99 * 1024, (fn.__name__, dtype, constexprs)


def test_bench_report_prints_every_row_and_the_prefix_cost():
    """bench.kernels runs only on a GPU; its table must not be what fails there (a failed capture is a string)."""
    from bench.kernels import format_report

    row = {"fwd_ms": 0.1, "fwd_bwd_ms": 0.4, "fwd_graph_ms": 0.012, "fwd_bwd_graph_ms": 0.08, "fwd_graph_speedup_vs_concat": 6.0}
    rows = {
        "triton_prefix": row,
        "triton_no_prefix": {**row, "fwd_graph_ms": 0.010},
        "sdpa_concat_dropout": {**row, "fwd_bwd_graph_ms": "RuntimeError: capture"},
    }
    step = {"step_ms": 18.0, "graph_step_ms": 2.0, "graph_step_speedup_vs_concat": 1.25}
    report = {"attention": {"d64": rows}, "train_step": [{"batch": 32, "seq": 128, **{f"{v}{s}": step for v in ("triton_prefix", "sdpa_concat_mask") for s in ("", "_no_dropout")}}],
              "sweep": {"d64": {"bm64_bn64_w4_s3_bp16": {"fwd_graph_ms": 0.0114}, "bm128_bn64_w8_s2_bp16": {"error": "OutOfResources"}}}}  # fmt: skip
    text = format_report(report)
    assert all(name in text for name in rows) and "1.20x the kernel without a prefix" in text
    assert "x concat - / 1.25" in text and "sweep d64: bm64_bn64_w4_s3_bp16 0.0114" in text
    assert [line for line in text.splitlines() if "sdpa_concat_dropout" in line][0].split()[5] == "-"


def test_bench_sequence_sweep_reprints_and_plots_without_a_gpu(tmp_path, capsys):
    """A saved report's sequence sweep: its table and its TFLOP/s plot come back on a CPU machine (`--report`), a
    failed capture left out of the plot; a report without a sweep is refused by name."""
    from bench.kernels import main

    def point(seq, ms):
        rows = {name: {"fwd_graph_ms": ms * f, "fwd_bwd_graph_ms": 6 * ms * f, "fwd_tflops": 10 / f, "fwd_bwd_tflops": 8 / f,
                       "fwd_graph_speedup_vs_concat": 6.0 / f} for name, f in (("triton_prefix", 1), ("sdpa_concat_mask", 6))}  # fmt: skip
        rows["sdpa_seq_nomask"] = {"fwd_graph_ms": "RuntimeError: capture", "fwd_bwd_graph_ms": 0.05}
        return {"seq": seq, "batch": 4096 // seq, "rows": rows}

    report = {"device": "NVIDIA H100", "config": {"dtype": "fp16", "heads": 12, "prefix": 16}, "attention": {},
              "seq_sweep": {f"d{d}": [point(s, 0.01 * s / 128) for s in (128, 256, 512)] for d in (32, 64)}}  # fmt: skip
    (tmp_path / "r.json").write_text(json.dumps(report))
    main(["--report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "p.png")])
    text = capsys.readouterr().out
    assert "sequence sweep d64" in text and "  16 x 256   triton_prefix 0.0200 / 0.1200 (6.00 / -)" in text
    assert "sdpa_seq_nomask - / 0.0500" in text
    png = (tmp_path / "p.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    del report["seq_sweep"]
    (tmp_path / "r.json").write_text(json.dumps(report))
    with pytest.raises(ValueError, match="no sequence sweep"):
        main(["--report", str(tmp_path / "r.json"), "--plot", str(tmp_path / "q.png")])


# ---------------------------------------------------------------------------------------------------------------
# GPU: the same cases compiled, plus fp16/bf16 everywhere and BERT-sized shapes
# ---------------------------------------------------------------------------------------------------------------

GPU_CASES = CASES + [
    Case(**{**c.__dict__, "dtype": dt}) for c in CASES if c.dtype == torch.float32 for dt in DTYPES[1:]
] + [
    Case(b=32, n=12, nkv=12, s=128, p=16, d=64, lengths=tuple(range(128, 0, -4)), dtype=torch.bfloat16),
    Case(b=4, n=12, nkv=4, s=257, p=20, d=64, causal=True, shared=False, lengths=(257, 1, 100, 0), dtype=torch.bfloat16),
    Case(b=2, n=8, nkv=8, s=200, p=16, d=128, lengths=(200, 130), dtype=torch.float32),
]  # fmt: skip


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", GPU_CASES, ids=str)
def test_gpu_kernel_matches_float64(case):
    check_against_float64(case, "cuda")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("case", [Case(**{**c.__dict__, "dtype": dt}) for c in DROPOUT_CASES for dt in DTYPES], ids=str)
def test_gpu_dropout_matches_float64_with_the_same_mask(case):
    check_against_float64(case, "cuda", dropout_p=0.25, seed=1234)


@pytest.mark.gpu
@cuda
def test_gpu_dropout_is_drawn_afresh_on_every_cuda_graph_replay():
    """A training step captured in a CUDA graph must not repeat the captured dropout mask: prefix_attn draws its seed
    on the device, so each replay drops other weights (the forward and its backward still agree: the float64 tests)."""
    (q, k, v, pk, pv), lengths, grad_out = _inputs(Case(n=4, s=64, p=16, d=64, lengths=(64, 40), dtype=torch.float16), "cuda")
    q.requires_grad_()

    def step():
        out = prefix_attn(q, k, v, pk, pv, lengths, dropout_p=0.5)
        return out, torch.autograd.grad(out, q, grad_out)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, dq = step()
    runs = []
    for _ in range(2):
        graph.replay()
        runs.append((out.clone(), dq.clone()))
    torch.cuda.synchronize()
    assert not torch.equal(runs[0][0], runs[1][0]) and not torch.equal(runs[0][1], runs[1][1])
    assert _max_err(runs[0][0].float(), runs[1][0].float()) > 0.1


@pytest.mark.gpu
@cuda
def test_gpu_prefix_kernel_false_keeps_cuda_on_the_sdpa_path():
    """prefix_kernel=false (the config key, PEFT's concatenation on a GPU too) reaches the attention function."""
    from types import SimpleNamespace

    from adapters.prefix import prefix_attention

    q, k, v = (torch.randn(2, 4, 9, 32, device="cuda", requires_grad=True) for _ in range(3))
    kv = [tuple(torch.randn(1, 4, 5, 32, device="cuda") for _ in range(2))]
    mask = torch.ones(2, 1, 1, 14, dtype=torch.bool, device="cuda")
    names = {}
    for flag in (True, False):
        out, _ = prefix_attention(SimpleNamespace(layer_idx=0), q, k, v, mask, prefix_kv=kv, prefix_kernel=flag)
        names[flag] = type(out.grad_fn.next_functions[0][0]).__name__
    assert names[True] == "_PrefixAttnFunctionBackward" and "PrefixAttn" not in names[False], names


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpu_training_attention_function_matches_sdpa_path(dtype):
    """adapters/prefix.py's attention function, output and gradients: the kernel branch (CUDA) against the SDPA branch
    (CPU), with padding."""
    from types import SimpleNamespace

    from adapters.prefix import prefix_attention

    b, n, s, p, d = 3, 4, 19, 5, 32
    q, k, v, pk, pv = (torch.randn(*shape) for shape in [(b, n, s, d)] * 3 + [(1, n, p, d)] * 2)
    mask = torch.ones(b, 1, 1, p + s, dtype=torch.bool)
    mask[1, ..., p + 7 :] = False
    mask[2, ..., p:] = False
    grad = torch.randn(b, s, n, d)
    results = []
    for device, dt in (("cpu", torch.float32), ("cuda", dtype)):
        leaves = [t.detach().to(device, dt if i < 3 else torch.float32).requires_grad_() for i, t in enumerate((q, k, v, pk, pv))]
        out, _ = prefix_attention(
            SimpleNamespace(layer_idx=0), *leaves[:3], mask.to(device), scaling=d**-0.5, prefix_kv=[leaves[3:]]
        )
        assert out.shape == (b, s, n, d)
        out.backward(grad.to(device, out.dtype))
        results.append([out.cpu().double()] + [t.grad.cpu().double() for t in leaves])
    for name, cpu, gpu in zip(("out", "dq", "dk", "dv", "dprefix_k", "dprefix_v"), *results, strict=True):
        assert _max_err(gpu, cpu) < (1e-5 if dtype == torch.float32 else 1e-2) * max(1.0, cpu.abs().max().item()), name
