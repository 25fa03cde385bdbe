"""ops/_dispatch.py: eager calls run the implementation, tracing sees the custom op; autograd agrees."""
from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from routeformer.ops._dispatch import custom_op, tracing, with_autograd

CALLS = {"impl": 0, "fake": 0}


@custom_op("routeformer_test::scale_pair")
def _scale_pair(x: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    CALLS["impl"] += 1
    return x * factor, x.new_ones(3)


@_scale_pair.op.register_fake
def _(x, factor):
    CALLS["fake"] += 1
    return x.new_empty(x.shape), x.new_empty(3)


def _setup(ctx, inputs, output):
    ctx.factor = inputs[1]
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad, grad_unused):
    assert grad_unused is None  # not materialised as zeros
    return grad * ctx.factor, None


_scale_pair_ad = with_autograd(_scale_pair, _backward, _setup)


def test_eager_calls_run_the_implementation_without_the_dispatcher():
    assert not tracing()
    before = dict(CALLS)
    x = torch.randn(4, requires_grad=True)
    y, ones = _scale_pair_ad(x, 3.0)
    assert type(y.grad_fn).__name__ == "_scale_pair_functionBackward"  # our autograd.Function, not the op
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.full((4,), 3.0))
    assert not ones.requires_grad
    assert CALLS["impl"] == before["impl"] + 1 and CALLS["fake"] == before["fake"]


def test_fake_tensors_and_compile_go_through_the_op():
    with FakeTensorMode():
        assert tracing()
        before = CALLS["fake"]
        y, _ = _scale_pair_ad(torch.empty(5), 2.0)
        assert y.shape == (5,) and CALLS["fake"] == before + 1

    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda x: _scale_pair_ad(x, 2.0)[0] + 1, backend=backend, fullgraph=True)
    x = torch.randn(6, requires_grad=True)
    f(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.full((6,), 2.0))
    assert any("scale_pair" in str(n.target) for g in graphs for n in g.graph.nodes)


def test_jit_trace_records_the_op():
    traced = torch.jit.trace(lambda x: _scale_pair(x, 2.0)[0], torch.randn(3))
    assert "routeformer_test::scale_pair" in str(traced.graph)
    torch.testing.assert_close(traced(torch.ones(3)), torch.full((3,), 2.0))
