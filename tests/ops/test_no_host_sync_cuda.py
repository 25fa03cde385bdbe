"""The Triton paths never synchronise the host with the GPU (no .item(), .nonzero(), data-dependent
shapes) in forward or backward: a sync would stall every eager step and break CUDA-graph capture.

torch.cuda.set_sync_debug_mode("error") makes every synchronising PyTorch call raise, and the same
fwd+bwd is then captured in a CUDA graph (capture fails on any sync) and replayed. Each case runs once
first so that Triton's compilation is not part of what is checked.
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from routeformer import ModelConfig
from routeformer.modules.attention import MixedAttention
from routeformer.ops import local_attention, routing_attention

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@contextlib.contextmanager
def syncs_raise():
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _fwd_bwd(fn, *tensors):
    out = fn(*tensors)
    (out[0] if isinstance(out, tuple) else out).float().square().mean().backward()


def _grads(fn, tensors):
    out = fn(*tensors)
    loss = (out[0] if isinstance(out, tuple) else out).float().square().mean()
    return torch.autograd.grad(loss, tensors)


def _check(fn, *tensors):
    _fwd_bwd(fn, *tensors)  # compile and warm up outside the check
    with syncs_raise():
        _fwd_bwd(fn, *tensors)
    # The debug mode is a prototype that misses some syncs; capturing fwd+bwd in a CUDA graph fails on
    # any of them, and the replayed graph must give what eager gives.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as capture requires
        _grads(fn, tensors)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = _grads(fn, tensors)
    graph.replay()
    torch.cuda.synchronize()
    for got, expected in zip(captured, _grads(fn, tensors)):
        torch.testing.assert_close(got, expected)


def _qkv(T, D=64, H=4, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(1, H, T, D, device="cuda", dtype=dtype, generator=g).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("assign,shared", [("topk", True), ("topk", False), ("nearest", True)])
def test_routing_attention_never_syncs(assign, shared):
    q, k, v = _qkv(5000)
    centroids = torch.nn.functional.normalize(torch.randn(4, 10, 64, device="cuda"), dim=-1)
    k = q if shared else k
    _check(lambda q, k, v: routing_attention(q, k, v, centroids, window=500, assign=assign, backend="triton"),
           q, k, v)


@pytest.mark.parametrize("rel", [False, True])
def test_local_attention_never_syncs(rel):
    q, k, v = _qkv(3000)
    rel_k, rel_v = ([torch.randn(257, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                     for _ in range(2)] if rel else (None, None))
    _check(lambda q, k, v: local_attention(q, k, v, block=256, flange=256, rel_k=rel_k, rel_v=rel_v,
                                           backend="triton"), q, k, v)


@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_mixed_attention_layer_never_syncs_in_training(assign):
    """The whole layer as the model trains it: local and routing heads, aux loss, centroid statistics."""
    cfg = ModelConfig(vocab_size=256, dim=256, depth=1, heads=4, query_shape=128, memory_flange=128,
                      sparsity_cluster_size=8, sparsity_cluster_attention_window=256, routing_assign=assign,
                      max_relative_distance=100, attention_backend="triton")
    layer = MixedAttention(cfg, num_local=2).cuda().to(torch.bfloat16).train()
    x = torch.randn(2, 2048, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step(x):
        out, aux = layer(x, compute_aux=True)
        return out.float().square().mean() + aux.float()

    _check(step, x)
