"""Balanced top-k routing is not causal (future tokens change earlier outputs); nearest routing is.

Measured, not assumed: perturb the tokens after position t and compare outputs at positions <= t.
"""
import torch

from routeformer.ops import routing_attention


def _max_leak(assign: str, trials: int = 20) -> float:
    T, D, C, W, t = 96, 16, 4, 16, 48
    worst = 0.0
    for seed in range(trials):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 2, T, D, generator=g, dtype=torch.float64)
        v = torch.randn(1, 2, T, D, generator=g, dtype=torch.float64)
        centroids = torch.randn(2, C, D, generator=g, dtype=torch.float64)
        out = routing_attention(x, x, v, centroids, window=W, assign=assign)
        x2, v2 = x.clone(), v.clone()
        x2[:, :, t + 1 :] = torch.randn(1, 2, T - t - 1, D, generator=g, dtype=torch.float64)
        v2[:, :, t + 1 :] = torch.randn(1, 2, T - t - 1, D, generator=g, dtype=torch.float64)
        out2 = routing_attention(x2, x2, v2, centroids, window=W, assign=assign)
        worst = max(worst, (out[:, :, : t + 1] - out2[:, :, : t + 1]).abs().max().item())
    return worst


def test_topk_routing_leaks_future_information():
    # Later tokens compete for the W slots of a cluster, so they change which earlier tokens are
    # selected and hence earlier outputs. This is the paper's algorithm; it is documented, not fixed.
    assert _max_leak("topk") > 1e-3


def test_nearest_routing_is_strictly_causal():
    assert _max_leak("nearest") == 0.0
