"""The Triton ops under torch.compile, fed non-contiguous views (B, T, H, D storage seen as B, H, T, D).

Each custom op's fake (meta) function must report the shapes, dtypes and strides its real function
returns, since the compiler plans the surrounding code on them: torch.library.opcheck compares the two
(and checks schema and autograd registration). Runs on CPU under the interpreter.
"""
from __future__ import annotations

import pytest
import torch

from routeformer.ops import local_attention, routing_attention
from routeformer.ops.local import triton_ops as L
from routeformer.ops.routing import _score_kernels as S
from routeformer.ops.routing import triton_ops as R


def _views(seed, T=24, H=2, D=16, grad=False):
    g = torch.Generator().manual_seed(seed)
    # The layout a (B, T, H*D) projection followed by a transpose gives.
    return [torch.randn(1, T, H, D, generator=g).requires_grad_(grad) for _ in range(3)]


def _t(xs):
    return [x.transpose(1, 2) for x in xs]


def test_local_ops_fake_matches_real():
    q, k, v = _t(_views(0))
    rel = torch.randn(2 * 5 + 1, 16)
    for rk, rv in ((None, None), (rel, rel.clone())):
        args = (q, k, v, rk, rv, 8, 8, True, 0.25)
        torch.library.opcheck(L.local_attn_fwd.op, args)
        out, lse = L.local_attn_fwd(*args)
        dout = torch.randn(1, 24, 2, 16).transpose(1, 2)
        for rel_grads in (False, True):
            torch.library.opcheck(L.local_attn_bwd.op, (dout, q, k, v, out, lse, rk, rv, 8, 8, True, 0.25, rel_grads))


@pytest.mark.parametrize("assign,shared", [("topk", False), ("topk", True), ("nearest", True), ("nearest", False)])
def test_routing_ops_fake_matches_real(assign, shared):
    q, k, v = _t(_views(1))
    k = q if shared else k
    centroids = torch.randn(2, 3, 16)
    idx = R.routing_indices(q, k, centroids, 8, True, assign)
    run = 0 if assign == "nearest" else idx[0].shape[1] // 3  # entries per cluster: the counting inverse
    args = (q, k, v, *idx, 0.25, assign == "nearest", shared, 0, run)
    torch.library.opcheck(R._routing_fwd.op, args)
    saved = R._routing_fwd(*args)
    dout = torch.randn(1, 24, 2, 16).transpose(1, 2)
    torch.library.opcheck(R._routing_bwd.op, (dout, q, k, v, saved[0], saved[1], saved[2], saved[3], *idx,
                                           saved[4], saved[5], 0.25, assign == "nearest", shared, 0, run))


def test_assignment_ops_fake_matches_real():
    (x, _, _) = _t(_views(2, T=40))
    centroids = torch.randn(2, 3, 16)
    torch.library.opcheck(S.fused_scores.op, (x, centroids))
    torch.library.opcheck(S.fused_scores.op, (x, centroids, 1, 2))
    torch.library.opcheck(S.fused_argmax.op, (x, centroids))
    s_t, gmax = S.fused_scores(x, centroids)
    groups = R.select_top(gmax, 2)
    torch.library.opcheck(R._gather_groups.op, (s_t, groups, 16))
    top = s_t.topk(5, dim=-1).values
    kth = top.amin(-1).contiguous()
    need = (top == kth[..., None]).sum(-1, dtype=torch.int32).contiguous()
    torch.library.opcheck(R._topk_compact.op, (s_t, kth, need, 5))
    torch.library.opcheck(R._select_rows.op, (s_t, 5))
    torch.library.opcheck(R._topk_index_fused.op, (x, centroids, 5))
    torch.library.opcheck(S.fused_argmax_counts.op, (x, centroids))
    torch.library.opcheck(R._nearest_slots_counting.op, (x, centroids, 8))
    rows = torch.randint(0, 9, (3, 20)).sort(-1).values.to(torch.int32)
    torch.library.opcheck(R.count_below.op, (rows, 7, 3, 1, 19, True))
    torch.library.opcheck(R.topk_slot_bounds.op, (x, 4, 30, 10, True))
    sorted_cluster, order = torch.randint(0, 3, (4, 40)).to(torch.uint8).sort(dim=-1, stable=True)
    first = R.count_below(sorted_cluster, 3, 1, 0, 3, False)
    torch.library.opcheck(R.nearest_slot_bounds.op, (order, sorted_cluster, first, 8))


@pytest.mark.parametrize("op", ["local", "routing"])
def test_inductor_with_transposed_inputs(op):
    torch._dynamo.reset()
    centroids = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(9))

    def f(q, k, v):
        if op == "local":
            return local_attention(q, k, v, block=8, flange=8, backend="triton")
        return routing_attention(q, k, v, centroids, window=8, backend="triton")

    def grads(fn, leaves):
        out = fn(*_t(leaves))
        return [out.detach()] + list(torch.autograd.grad((out * out).sum(), leaves))

    leaves = _views(3, grad=True)
    want = grads(f, leaves)
    got = grads(torch.compile(f, fullgraph=True, backend="inductor"), leaves)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
