"""Bad input to the ops raises a ValueError/TypeError that names the argument."""
import pytest
import torch

from routeformer.ops import local_attention, routing_attention


def _qkvc(T=10, D=8, H=2, C=3):
    q, k, v = (torch.randn(1, H, T, D) for _ in range(3))
    return q, k, v, torch.randn(H, C, D)


@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: {**a, "q": a["q"][0]}, "q must have 4 dims"),
        (lambda a: {**a, "k": a["k"][:, :, :5]}, "k must have the same shape"),
        (lambda a: {**a, "v": a["v"][:, :1]}, "v must match q"),
        (lambda a: {**a, "k": a["k"].double()}, "k has dtype"),
        (lambda a: {**a, "v": a["v"].to(torch.int64)}, "v must be a floating-point"),
        (lambda a: {**a, "centroids": torch.randn(3, 3, 8)}, "centroids must have shape"),
        (lambda a: {**a, "centroids": torch.randn(2, 3, 4)}, "centroids must have shape"),
        (lambda a: {**a, "window": 0}, "window must be >= 1"),
        (lambda a: {**a, "assign": "kmeans"}, "assign must be one of"),
        (lambda a: {**a, "assign": "nearest", "causal": False}, "nearest.*causal"),
        (lambda a: {**a, "backend": "cuda"}, "backend must be one of"),
        (lambda a: {**a, "scale": -1.0}, "scale must be"),
    ],
)
def test_routing_rejects_bad_input(mutate, match):
    q, k, v, c = _qkvc()
    args = mutate(dict(q=q, k=k, v=v, centroids=c, window=4))
    with pytest.raises(ValueError, match=match):
        routing_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("centroids"), **args)


def test_routing_rejects_non_tensor_and_non_int_window():
    q, k, v, c = _qkvc()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        routing_attention(q.numpy(), k, v, c, window=4)
    with pytest.raises(TypeError, match="window must be an int"):
        routing_attention(q, k, v, c, window=4.0)
    with pytest.raises(TypeError, match="centroids must be a torch.Tensor"):
        routing_attention(q, k, v, None, window=4)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block=0, flange=2), "block must be >= 1"),
        (dict(block=4, flange=-1), "flange must be >= 0"),
        (dict(block=4, flange=2, rel_k=torch.randn(5, 8)), "rel_k and rel_v go together"),
        (dict(block=4, flange=2, rel_k=torch.randn(4, 8), rel_v=torch.randn(4, 8)), "odd number of rows"),
        (dict(block=4, flange=2, rel_k=torch.randn(5, 7), rel_v=torch.randn(5, 8)), "rel_k must have shape"),
        (dict(block=4, flange=2, backend="fast"), "backend must be one of"),
    ],
)
def test_local_rejects_bad_input(kwargs, match):
    q, k, v, _ = _qkvc()
    with pytest.raises(ValueError, match=match):
        local_attention(q, k, v, **kwargs)


def test_auto_backend_sends_unsupported_inputs_to_the_reference(monkeypatch):
    """On CUDA, "auto" picks Triton only for what the kernels take (fp16/bf16/fp32, routing D <= 128)."""
    import types

    import routeformer.ops as ops
    from routeformer.ops.routing import _use_triton

    monkeypatch.setattr(ops, "triton_available", lambda: True)

    def fake(dtype, d):
        return types.SimpleNamespace(is_cuda=True, dtype=dtype, shape=(1, 2, 8, d))

    assert _use_triton("auto", fake(torch.bfloat16, 64), fake(torch.bfloat16, 64))
    assert not _use_triton("auto", fake(torch.float64, 64), fake(torch.float64, 64))
    assert not _use_triton("auto", fake(torch.float32, 160), fake(torch.float32, 160))
    assert not _use_triton("auto", fake(torch.float32, 64), fake(torch.float32, 256))
    assert not _use_triton("reference", fake(torch.float32, 64), fake(torch.float32, 64))
    cpu = types.SimpleNamespace(is_cuda=False, dtype=torch.float32, shape=(1, 2, 8, 64))
    assert not _use_triton("auto", cpu, cpu)


@pytest.mark.parametrize(
    "mutate,match",
    [
        # "meta" stands in for a second device on a CPU-only machine: the check runs before any math.
        (lambda a: {**a, "k": a["k"].to("meta")}, "k is on meta but q is on cpu"),
        (lambda a: {**a, "v": a["v"].to("meta")}, "v is on meta but q is on cpu"),
        (lambda a: {**a, "centroids": a["centroids"].to("meta")}, "centroids are on meta but q is on cpu"),
        (lambda a: {**a, "centroids": a["centroids"].long()}, "centroids must be floating point"),
        (lambda a: {**a, "centroids": a["centroids"][0]}, "centroids must have shape"),
        (lambda a: {**a, "centroids": a["centroids"][:, :0]}, "at least one cluster"),
        (lambda a: {**a, "q": a["q"][:, :, :0], "k": a["k"][:, :, :0], "v": a["v"][:, :, :0]}, "T = 0"),
        (lambda a: {**a, "v": a["v"].double()}, "v has dtype"),
    ],
)
def test_routing_rejects_mismatched_devices_and_centroids(mutate, match):
    q, k, v, c = _qkvc()
    args = mutate(dict(q=q, k=k, v=v, centroids=c, window=4))
    with pytest.raises(ValueError, match=match):
        routing_attention(args.pop("q"), args.pop("k"), args.pop("v"), args.pop("centroids"), **args)


def test_local_rejects_mismatched_devices_and_non_int_sizes():
    q, k, v, _ = _qkvc()
    with pytest.raises(ValueError, match="k is on meta but q is on cpu"):
        local_attention(q, k.to("meta"), v, block=4, flange=2)
    with pytest.raises(ValueError, match="k has dtype"):
        local_attention(q, k.double(), v, block=4, flange=2)
    with pytest.raises(ValueError, match="rel_v is on meta"):
        local_attention(q, k, v, block=4, flange=2, rel_k=torch.randn(5, 8), rel_v=torch.randn(5, 8, device="meta"))
    with pytest.raises(TypeError, match="flange must be an int"):
        local_attention(q, k, v, block=4, flange=2.0)
    with pytest.raises(TypeError, match="causal must be a bool"):
        local_attention(q, k, v, block=4, flange=2, causal=1)
    with pytest.raises(TypeError, match="causal must be a bool"):
        routing_attention(q, k, v, torch.randn(2, 3, 8), window=4, causal=1)
