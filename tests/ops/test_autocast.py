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


# Under CUDA autocast F.layer_norm returns float32 whatever its input, so a model that LayerNorms q but
# not v (qk_layernorm, the paper's presets) hands the ops float32 q and bfloat16 v. The ops then run
# in the autocast dtype, as F.scaled_dot_product_attention does, instead of refusing the mix.
@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_routing_runs_mixed_inputs_in_the_autocast_dtype(backend, assign):
    q, _, v, c = _inputs(2, T=40)
    q32 = q.float().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = routing_attention(q32, q32, v, c, window=16, assign=assign, backend=backend)
    want = routing_attention(q, q, v, c, window=16, assign=assign, backend=backend)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)
    got.float().sum().backward()
    assert q32.grad.dtype == torch.float32 and q32.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_local_runs_mixed_inputs_in_the_autocast_dtype(backend):
    q, k, v, _ = _inputs(3, T=40)
    rel = torch.randn(2 * 5 + 1, 16, generator=torch.Generator().manual_seed(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = local_attention(q.float(), k, v, block=8, flange=8, rel_k=rel, rel_v=rel, backend=backend)
    want = local_attention(q, k, v, block=8, flange=8, rel_k=rel, rel_v=rel, backend=backend)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want)


def test_mixed_dtypes_outside_autocast_still_raise():
    q, k, v, c = _inputs(5)
    with pytest.raises(ValueError, match="v has dtype torch.bfloat16 but q has torch.float32"):
        routing_attention(q.float(), q.float(), v, c, window=8)
    with pytest.raises(ValueError, match="k has dtype torch.bfloat16 but q has torch.float32"):
        local_attention(q.float(), k, v, block=8, flange=4)


def test_autocast_casts_compile_without_graph_breaks():
    q, _, v, c = _inputs(6, T=40)

    def f(q, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return (routing_attention(q, q, v, c, window=16, backend="triton").float().sum()
                    + local_attention(q, q, v, block=8, flange=8, backend="triton").float().sum())

    q32 = q.float()
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(q32, v), f(q32, v))


def test_meta_tensors_pass_through_the_autocast_cast():
    """benchmarks/sm90_resources.py records launches on meta tensors, a device autocast does not know."""
    from routeformer.ops._checks import autocast_inputs

    q, v = torch.empty(1, 2, 8, 4, device="meta"), torch.empty(1, 2, 8, 4, device="meta", dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = autocast_inputs(q, q, v)
    assert out[0] is q and out[1] is q and out[2] is v


def test_float64_inputs_are_not_cast_as_autocast_leaves_them():
    q, k, v, c = _inputs(7)
    q64, k64, v64 = q.double(), k.double(), v.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = routing_attention(q64, k64, v64, c, window=8, backend="reference")
    assert out.dtype == torch.float64
