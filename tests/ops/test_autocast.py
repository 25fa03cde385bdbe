"""Under torch.autocast the reference ops and the routing scores keep their float32 math.

Autocast would run their einsums in bf16: scores would select other tokens than the specification
says, and topk's scatter_add met a bf16 result and a float32 buffer (a RuntimeError in training
with train.precision=bf16).
"""
from __future__ import annotations

import pytest
import torch

from routeformer.ops import local_attention, routing_attention
from routeformer.ops.kmeans import routing_scores, spherical_kmeans


def _inputs(seed=0, T=45, D=16):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, T, D, generator=g).to(torch.bfloat16) for _ in range(3))
    return q, k, v, torch.randn(2, 3, D, generator=g)


@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_routing_reference_ignores_autocast(assign):
    q, k, v, c = _inputs()
    plain = routing_attention(q, k, v, c, window=8, assign=assign, backend="reference")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = routing_attention(q, k, v, c, window=8, assign=assign, backend="reference")
    assert under.dtype == torch.bfloat16
    assert torch.equal(under, plain)


def test_local_reference_and_scores_ignore_autocast():
    q, k, v, c = _inputs(1)
    rel = torch.randn(2 * 4 + 1, 16)
    plain = local_attention(q, k, v, block=8, flange=4, rel_k=rel, rel_v=rel, backend="reference")
    scores = routing_scores(q, c)
    cents = spherical_kmeans(q[0].float(), 3, generator=torch.Generator().manual_seed(0))[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(local_attention(q, k, v, block=8, flange=4, rel_k=rel, rel_v=rel, backend="reference"),
                           plain)
        got = routing_scores(q, c)
        assert got.dtype == torch.float32 and torch.equal(got, scores)
        assert torch.equal(spherical_kmeans(q[0].float(), 3, generator=torch.Generator().manual_seed(0))[0], cents)
