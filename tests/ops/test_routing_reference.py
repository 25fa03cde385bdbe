"""The routing reference op against brute-force masked dense attention (float64)."""
import math

import pytest
import torch

from routeformer.ops import routing_attention

from .brute_force import masked_dense, routing_nearest_mask, routing_topk_dense

SHAPES = [(1, 2, 37, 8, 3, 10), (2, 1, 100, 24, 4, 30), (1, 2, 250, 8, 5, 64)]  # B, H, T, D, C, W


def _inputs(B, H, T, D, C, seed, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=torch.float64) for _ in range(3))
    centroids = torch.randn(H, C, D, generator=g, dtype=torch.float64)
    for t in (q, k, v):
        t.requires_grad_(requires_grad)
    return q, k, v, centroids


def _grads(out, inputs, seed):
    g = torch.Generator().manual_seed(seed + 1)
    grad_out = torch.randn(out.shape, generator=g, dtype=out.dtype)
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


@pytest.mark.parametrize("B,H,T,D,C,W", SHAPES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("shared_qk", [True, False])
def test_topk_matches_brute_force(B, H, T, D, C, W, causal, shared_qk):
    q, k, v, centroids = _inputs(B, H, T, D, C, seed=T + D + C)
    k_in = q if shared_qk else k
    scale = 1 / math.sqrt(D)
    out = routing_attention(q, k_in, v, centroids, window=W, causal=causal, assign="topk")
    expected = routing_topk_dense(q, k_in, v, centroids, W, causal, scale)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    inputs = (q, v) if shared_qk else (q, k, v)
    got = _grads(out, inputs, T)
    want = _grads(expected, inputs, T)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("B,H,T,D,C,W", SHAPES)
@pytest.mark.parametrize("shared_qk", [True, False])
def test_nearest_matches_brute_force(B, H, T, D, C, W, shared_qk):
    q, k, v, centroids = _inputs(B, H, T, D, C, seed=7 * T + D)
    k_in = q if shared_qk else k
    out = routing_attention(q, k_in, v, centroids, window=W, assign="nearest")
    mask = routing_nearest_mask(q, k_in, centroids, W)
    expected, _ = masked_dense(q, k_in, v, mask, 1 / math.sqrt(D))
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    inputs = (q, v) if shared_qk else (q, k, v)
    for a, b in zip(_grads(out, inputs, T), _grads(expected, inputs, T)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("assign", ["topk", "nearest"])
@pytest.mark.parametrize("T", [37, 100])
def test_one_cluster_with_window_at_least_T_is_causal_dense(assign, T):
    q, k, v, centroids = _inputs(2, 3, T, 24, 1, seed=T)
    out = routing_attention(q, k, v, centroids, window=T + 5, assign=assign)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def test_one_cluster_noncausal_topk_is_dense():
    q, k, v, centroids = _inputs(1, 2, 50, 8, 1, seed=3)
    out = routing_attention(q, k, v, centroids, window=64, causal=False)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def test_custom_scale_is_used():
    q, k, v, centroids = _inputs(1, 1, 40, 8, 1, seed=5)
    out = routing_attention(q, k, v, centroids, window=40, scale=0.3)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.3)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def test_topk_ties_go_to_lower_positions():
    # Identical rows score identically: the cluster must take the earliest positions.
    T, D, W = 20, 8, 6
    row = torch.randn(D, dtype=torch.float64)
    q = row.expand(1, 1, T, D).clone()
    v = torch.randn(1, 1, T, D, dtype=torch.float64)
    centroids = torch.randn(1, 1, D, dtype=torch.float64)
    out = routing_attention(q, q, v, centroids, window=W)
    assert out[0, 0, :W].abs().sum() > 0
    assert torch.equal(out[0, 0, W:], torch.zeros(T - W, D, dtype=torch.float64))


def test_unselected_queries_and_keyless_queries_get_zero():
    q, k, v, centroids = _inputs(1, 1, 64, 8, 2, seed=11, requires_grad=False)
    out = routing_attention(q, k, v, centroids, window=4, causal=True)
    # 2 clusters x 4 slots cover at most 8 positions; everything else is exactly 0.
    nonzero_rows = (out[0, 0].abs().sum(-1) > 0).sum()
    assert 0 < nonzero_rows <= 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs_keep_dtype_and_accuracy(dtype):
    q, k, v, centroids = _inputs(1, 2, 100, 24, 3, seed=13, requires_grad=False)
    exact = routing_attention(q, q, v, centroids, window=40)
    low = routing_attention(q.to(dtype), q.to(dtype), v.to(dtype), centroids.float(), window=40)
    assert low.dtype == dtype
    # Scores are computed in float32 from the rounded inputs, so a near-tie may flip membership;
    # compare rows that the rounded inputs route identically (nearly all of them).
    err = (low.double() - exact).abs().amax(-1)
    tol = {torch.float32: 1e-5, torch.bfloat16: 5e-2, torch.float16: 5e-3}[dtype]
    assert (err < tol).float().mean() > 0.95


def test_memory_is_not_quadratic_at_16k():
    """T = 16k on a CPU: a T x T float32 matrix per head would be 1 GiB; the op stays far below."""
    import resource

    T, D = 16384, 16
    q, k, v, centroids = _inputs(1, 2, T, D, 32, seed=1, requires_grad=False)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for assign in ("topk", "nearest"):
        out = routing_attention(q.float(), q.float(), v.float(), centroids.float(), window=512, assign=assign)
        assert out.shape == (1, 2, T, D) and torch.isfinite(out).all()
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 1024
