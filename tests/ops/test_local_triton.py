"""Triton local attention against the reference op: outputs and gradients (q, k, v, rel tables).

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on small awkward shapes; the
tests marked gpu repeat the check at real sizes on CUDA. Low-precision tolerance follows STYLE.md:
the kernel's error against a float64 reference may be at most about twice the error of a plain
PyTorch implementation (dense, masked, computed in the same dtype).
"""
from __future__ import annotations

import pytest
import torch

from routeformer.ops import local_attention
from routeformer.ops.local.reference import local_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
gpu = pytest.mark.gpu


def dense_mask(T: int, block: int, flange: int, causal: bool, device) -> torch.Tensor:
    """(T, T) bool, written from the docstring's rule rather than the reference's helpers."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    first = (i // block) * block - flange
    last = (i // block + 1) * block + (0 if causal else flange)
    mask = (j >= first) & (j < last)
    return mask & (j <= i) if causal else mask


def dense_plain(q, k, v, rel_k, rel_v, *, block, flange, causal, scale):
    """Dense masked attention in the inputs' own dtype: the 'plain PyTorch' error baseline."""
    T = q.shape[2]
    mask = dense_mask(T, block, flange, causal, q.device)
    logits = q @ k.transpose(-1, -2)
    if rel_k is not None:
        M = (rel_k.shape[0] - 1) // 2
        pos = torch.arange(T, device=q.device)
        rel = (pos[None, :] - pos[:, None]).clamp(-M, M) + M
        logits = logits + torch.einsum("bhid,ijd->bhij", q, rel_k[rel])
    probs = torch.softmax((logits * scale).masked_fill(~mask, float("-inf")), dim=-1)
    out = probs @ v
    if rel_v is not None:
        out = out + torch.einsum("bhij,ijd->bhid", probs, rel_v[rel])
    return out


def make_inputs(B, H, T, D, Dv, M, dtype, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q, k = (torch.randn(B, H, T, D, device=DEVICE, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, Dv, device=DEVICE, generator=g)
    tensors = [q, k, v]
    if M is not None:
        tensors += [0.5 * torch.randn(2 * M + 1, D, device=DEVICE, generator=g),
                    0.5 * torch.randn(2 * M + 1, Dv, device=DEVICE, generator=g)]
    return [t.to(dtype).requires_grad_() for t in tensors]


@pytest.fixture
def poisoned(monkeypatch):
    """New buffers start as NaN, so an element the kernels never write fails the comparison."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan_fill(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **kw: nan_fill(empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: nan_fill(empty_like(*a, **kw)))


def run_and_grad(fn, tensors, grad_out=None):
    q, k, v, *rel = tensors
    out = fn(q, k, v, *(rel or [None, None]))
    if grad_out is None:
        grad_out = torch.randn_like(out, dtype=torch.float32).to(out.dtype)
    grads = torch.autograd.grad(out, tensors, grad_out)
    return out, grads, grad_out


def check_case(B, H, T, D, Dv, M, block, flange, causal, dtype, seed=0):
    torch.manual_seed(seed)
    tensors = make_inputs(B, H, T, D, Dv, M, dtype, seed)
    scale = D ** -0.5
    kw = dict(block=block, flange=flange, causal=causal, scale=scale)

    def triton_fn(q, k, v, rk, rv):
        return local_attention(q, k, v, rel_k=rk, rel_v=rv, backend="triton", **kw)

    def reference_fn(q, k, v, rk, rv):
        return local_attention_reference(q, k, v, rel_k=rk, rel_v=rv, **kw)

    out, grads, g = run_and_grad(triton_fn, tensors)
    exact = [t.detach().double().requires_grad_() for t in tensors]
    ref_out, ref_grads, _ = run_and_grad(reference_fn, exact, g.double())
    names = ["out", "dq", "dk", "dv", "d_rel_k", "d_rel_v"]
    got = [out] + list(grads)
    want = [ref_out] + list(ref_grads)
    assert all(torch.isfinite(x).all() for x in got), "non-finite values: an output element was not written"
    assert out.dtype == dtype and all(gr.dtype == t.dtype for gr, t in zip(grads, tensors))
    if dtype == torch.float32:
        for name, a, b in zip(names, got, want):
            torch.testing.assert_close(a.double(), b, atol=2e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")
        return
    low = [t.detach().requires_grad_() for t in tensors]
    plain_out, plain_grads, _ = run_and_grad(lambda *a: dense_plain(*a, **kw), low, g)
    for name, a, b, p in zip(names, got, want, [plain_out] + list(plain_grads)):
        err = (a.double() - b).abs().max().item()
        plain_err = (p.double() - b).abs().max().item()
        assert err <= 2 * plain_err + 1e-4, f"{name}: kernel error {err:.3e} vs plain {dtype} error {plain_err:.3e}"


# (T, D, Dv, M, block, flange, causal): T not a multiple of block, flange 0 and > block, M clipping
# (M < block + flange) and not, Dv != D, a block longer than T (dense causal).
CPU_CASES = [
    (37, 16, 16, None, 8, 3, True),
    (37, 24, 24, None, 8, 20, False),
    (100, 24, 24, 40, 16, 0, True),
    (100, 16, 16, 5, 7, 9, False),
    (37, 24, 16, 40, 5, 11, True),
    (37, 16, 16, 3, 64, 0, True),
]


@pytest.mark.parametrize("T,D,Dv,M,block,flange,causal", CPU_CASES)
def test_matches_reference_fp32(poisoned, T, D, Dv, M, block, flange, causal):
    check_case(2, 2, T, D, Dv, M, block, flange, causal, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("M", [None, 6])
def test_low_precision_within_twice_plain_error(poisoned, dtype, M):
    check_case(1, 2, 37, 24, 24, M, 8, 10, True, dtype, seed=1)


def test_table_grads_in_row_chunks(poisoned, monkeypatch):
    """A buffer budget below one (batch, head) row's by-distance buffers: the backward then runs the dq
    kernel and the table-grad matmuls one row at a time (4 chunks here), and must agree all the same."""
    from routeformer.ops.local import triton_ops

    monkeypatch.setattr(triton_ops, "DIST_BUFFER_BYTES", 1)
    check_case(2, 2, 37, 16, 16, 6, 8, 10, True, torch.float32, seed=4)
    check_case(1, 3, 37, 24, 16, 40, 5, 11, False, torch.float32, seed=5)


@pytest.fixture
def shaw_bands(monkeypatch):
    """The Shaw forward and backward reading their rel logits from precomputed bands
    (triton_ops.SHAW_BANDS), whatever the defaults are."""
    from routeformer.ops.local import triton_ops

    monkeypatch.setattr(triton_ops, "SHAW_BANDS", {"fwd": True, "bwd": True})


@pytest.mark.parametrize("T,D,Dv,M,block,flange,causal", [c for c in CPU_CASES if c[3] is not None])
def test_shaw_bands_match_reference_fp32(poisoned, shaw_bands, T, D, Dv, M, block, flange, causal):
    check_case(2, 2, T, D, Dv, M, block, flange, causal, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_shaw_bands_low_precision_within_twice_plain_error(poisoned, shaw_bands, dtype):
    check_case(1, 2, 37, 24, 24, 6, 8, 10, True, dtype, seed=1)


def test_shaw_bands_in_row_chunks_and_frozen_tables(poisoned, shaw_bands, monkeypatch):
    """One (batch, head) row per chunk (the dk/dv kernel then runs per chunk, on that chunk's bands), and
    tables without grads (the bands still need dS by distance for dq's rel term)."""
    from routeformer.ops.local import triton_ops

    monkeypatch.setattr(triton_ops, "DIST_BUFFER_BYTES", 1)
    check_case(1, 3, 37, 24, 16, 40, 5, 11, False, torch.float32, seed=5)
    check_frozen_tables()


def check_frozen_tables():
    """Tables that need no grad: q, k, v grads must still match the reference, and the tables get none."""
    q, k, v, rk, rv = make_inputs(1, 2, 37, 16, 16, 6, torch.float32, 3)
    rk, rv = rk.detach(), rv.detach()
    kw = dict(block=8, flange=10, causal=True, scale=0.25, rel_k=rk, rel_v=rv)
    out = local_attention(q, k, v, backend="triton", **kw)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v], g)
    want = torch.autograd.grad(local_attention_reference(q, k, v, **kw), [q, k, v], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)
    assert rk.grad is None and rv.grad is None


def test_frozen_tables_skip_their_grads(poisoned):
    """Frozen tables: the backward skips the by-distance buffers their grads are reduced from."""
    check_frozen_tables()


def test_rejects_float64():
    q, k, v = make_inputs(1, 1, 8, 16, 16, None, torch.float64, 0)
    with pytest.raises(TypeError, match="backend='reference'"):
        local_attention(q, k, v, block=4, flange=4, backend="triton")


def test_compiles_without_graph_break():
    """fullgraph=True fails on any graph break; aot_eager traces the ops and their autograd on CPU."""
    q, k, v, rk, rv = make_inputs(1, 2, 37, 16, 16, 4, torch.float32, 2)

    def f(q, k, v, rk, rv):
        return local_attention(q, k, v, block=8, flange=8, rel_k=rk, rel_v=rv, backend="triton").sum()

    backend = "inductor" if DEVICE == "cuda" else "aot_eager"
    compiled = torch.compile(f, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(q, k, v, rk, rv), [q, k, v, rk, rv])
    want = torch.autograd.grad(f(q, k, v, rk, rv), [q, k, v, rk, rv])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU_CASES = [
    (4096, 64, 64, None, 256, 256, True, torch.bfloat16),
    (4096, 64, 64, 513, 256, 256, True, torch.bfloat16),
    (4096, 64, 64, 513, 256, 256, False, torch.bfloat16),
    (1025, 128, 128, 100, 256, 128, True, torch.float16),
    (2048, 128, 128, None, 256, 256, True, torch.bfloat16),
    (1025, 32, 32, None, 128, 300, False, torch.bfloat16),
    (1025, 60, 60, 64, 100, 50, True, torch.float32),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("T,D,Dv,M,block,flange,causal,dtype", GPU_CASES)
def test_gpu_matches_reference(T, D, Dv, M, block, flange, causal, dtype):
    check_case(1, 4, T, D, Dv, M, block, flange, causal, dtype)


@gpu
@needs_cuda
@pytest.mark.parametrize("T,D,Dv,M,block,flange,causal,dtype", [c for c in GPU_CASES if c[3] is not None])
def test_gpu_shaw_bands_match_reference(shaw_bands, T, D, Dv, M, block, flange, causal, dtype):
    check_case(1, 4, T, D, Dv, M, block, flange, causal, dtype)


@gpu
@needs_cuda
def test_gpu_table_grads_in_row_chunks(monkeypatch):
    """The chunked Shaw backward (one (batch, head) row per chunk) at a real size."""
    from routeformer.ops.local import triton_ops

    monkeypatch.setattr(triton_ops, "DIST_BUFFER_BYTES", 1)
    check_case(1, 4, 4096, 64, 64, 513, 256, 256, True, torch.bfloat16, seed=6)
