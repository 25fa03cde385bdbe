"""No T x T matrix: every tensor the reference ops create, forward and backward, is O(T * window).

A dispatch mode records the element count of every op's output, so the bound is checked on what the
ops allocate, not on process RSS (whose peak an earlier test may already have set).
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from routeformer.ops import local_attention, routing_attention


class _LargestTensor(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def _largest_forward_backward(fn, *inputs) -> int:
    mode = _LargestTensor()
    with mode:
        out = fn(*inputs)
        out.sum().backward()
    assert torch.isfinite(out).all() and all(torch.isfinite(x.grad).all() for x in inputs)
    return mode.largest


T, D = 16384, 8


def _inputs(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, 1, T, D, generator=g, requires_grad=True) for _ in range(n)]


@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_routing_never_builds_a_t_by_t_tensor(assign):
    C, W = 32, 512  # C * W = T, the paper's regime
    centroids = torch.randn(1, C, D, generator=torch.Generator().manual_seed(1))

    def op(q, k, v):
        return routing_attention(q, k, v, centroids, window=W, assign=assign, backend="reference")

    largest = _largest_forward_backward(op, *_inputs(3))
    # Chunked: C * W * W = T * W logits, or a (rows, W, D) gather capped at 2**24 elements; a T x T
    # matrix would be T * T = 2**28.
    assert largest <= 2 * T * W, largest
    assert largest < T * T // 8


@pytest.mark.parametrize("causal", [True, False])
def test_local_never_builds_a_t_by_t_tensor(causal):
    block, flange = 256, 256

    def op(q, k, v):
        return local_attention(q, k, v, block=block, flange=flange, causal=causal, backend="reference")

    largest = _largest_forward_backward(op, *_inputs(3, seed=2))
    assert largest <= T * (block + 2 * flange), largest  # (blocks, block, span) logits
    assert largest < T * T // 8
