"""The local attention reference against brute-force masked dense attention (float64)."""
import math

import pytest
import torch

from routeformer.ops import local_attention

from .brute_force import local_dense

CASES = [  # T, D, block, flange
    (37, 8, 8, 5),
    (100, 24, 16, 16),
    (250, 8, 64, 0),
    (97, 24, 10, 25),  # flange longer than the block
]


def _inputs(T, D, seed, B=2, H=2):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3)]


def _check(out, expected, inputs, seed):
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    got = torch.autograd.grad(out, inputs, grad_out, retain_graph=True)
    want = torch.autograd.grad(expected, inputs, grad_out)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("T,D,block,flange", CASES)
@pytest.mark.parametrize("causal", [True, False])
def test_local_matches_brute_force(T, D, block, flange, causal):
    q, k, v = _inputs(T, D, seed=T + block)
    out = local_attention(q, k, v, block=block, flange=flange, causal=causal)
    expected = local_dense(q, k, v, block, flange, causal, 1 / math.sqrt(D))
    _check(out, expected, (q, k, v), T)


@pytest.mark.parametrize("T,D,block,flange", CASES[:3])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("max_distance", [3, 64])
def test_shaw_relative_positions_match_brute_force(T, D, block, flange, causal, max_distance):
    q, k, v = _inputs(T, D, seed=3 * T)
    g = torch.Generator().manual_seed(max_distance)
    rel_k = torch.randn(2 * max_distance + 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    rel_v = torch.randn(2 * max_distance + 1, D, generator=g, dtype=torch.float64, requires_grad=True)
    out = local_attention(q, k, v, block=block, flange=flange, causal=causal, rel_k=rel_k, rel_v=rel_v)
    expected = local_dense(q, k, v, block, flange, causal, 1 / math.sqrt(D), rel_k, rel_v)
    _check(out, expected, (q, k, v, rel_k, rel_v), T)


@pytest.mark.parametrize("causal", [True, False])
def test_block_at_least_T_is_dense(causal):
    q, k, v = _inputs(45, 8, seed=1)
    out = local_attention(q, k, v, block=64, flange=0, causal=causal)
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    torch.testing.assert_close(out, dense, rtol=1e-10, atol=1e-10)


def test_single_token():
    q, k, v = _inputs(1, 8, seed=2)
    out = local_attention(q, k, v, block=4, flange=4)
    torch.testing.assert_close(out, v)


def test_long_sequence_on_cpu_is_linear_memory():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 16384, 16, generator=g)
    out = local_attention(q, q, q, block=256, flange=256)
    assert torch.isfinite(out).all()
