"""Attention modules against brute-force dense attention (tests/ops/brute_force.py), float64."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from routeformer.config import ModelConfig
from routeformer.modules import attention as attention_mod
from routeformer.modules import LocalAttention, MixedAttention, RoutingAttention, RoutingCentroids
from tests.ops.brute_force import (layer_norm_plain, local_dense, masked_dense, routing_nearest_mask,
                                   routing_topk_dense)


@pytest.fixture(autouse=True)
def _float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def rotary_plain(x):
    """Rotary written out pairwise: dims (i, i + D/2) rotate by angle pos * 10000^(-2i/D)."""
    B, H, T, D = x.shape
    half = D // 2
    out = x.clone()
    for t in range(T):
        for i in range(half):
            a = t * 10000.0 ** (-2 * i / D)
            c, s = torch.cos(torch.tensor(a)), torch.sin(torch.tensor(a))
            x1, x2 = x[:, :, t, i], x[:, :, t, i + half]
            out[:, :, t, i] = x1 * c - x2 * s
            out[:, :, t, i + half] = x2 * c + x1 * s
    return out


@pytest.mark.parametrize("causal", [True, False])
def test_local_shaw_matches_dense(causal):
    torch.manual_seed(0)
    mod = LocalAttention(8, block=4, flange=4, causal=causal, position="shaw", max_relative_distance=3,
                         backend="reference").double()
    q, k, v = rand(2, 3, 13, 8), rand(2, 3, 13, 8), rand(2, 3, 13, 8)
    out = mod(q, k, v)
    ref = local_dense(q, k, v, 4, 4, causal, 8 ** -0.5, rel_k=mod.rel_k.detach(), rel_v=mod.rel_v.detach())
    torch.testing.assert_close(out, ref)


def test_local_rotary_matches_dense():
    torch.manual_seed(1)
    mod = LocalAttention(6, block=5, flange=5, causal=True, position="rotary", backend="reference")
    q, k, v = rand(1, 2, 11, 6), rand(1, 2, 11, 6), rand(1, 2, 11, 6)
    ref = local_dense(rotary_plain(q), rotary_plain(k), v, 5, 5, True, 6 ** -0.5)
    torch.testing.assert_close(mod(q, k, v), ref)
    with pytest.raises(ValueError, match="even head_dim"):
        LocalAttention(5, block=4, flange=4, causal=True, position="rotary")


def _centroids(H, C, D):
    return RoutingCentroids(H, C, D, decay=0.9, variant="ratio").double()


@pytest.mark.parametrize("qk_layernorm", [False, True])
def test_routing_shared_qk_matches_dense(qk_layernorm):
    torch.manual_seed(2)
    cents = _centroids(2, 3, 8)
    mod = RoutingAttention(cents, window=5, causal=True, share_qk=True, qk_layernorm=qk_layernorm,
                           backend="reference").eval()
    q, v = rand(2, 2, 17, 8), rand(2, 2, 17, 8)
    out, aux = mod(q, rand(2, 2, 17, 8), v)  # k must be ignored with shared QK
    assert aux is None
    qq = layer_norm_plain(q) if qk_layernorm else q
    ref = routing_topk_dense(qq, qq, v, cents.centroids, 5, True, 8 ** -0.5)
    torch.testing.assert_close(out, ref)


def test_routing_separate_keys_nearest_matches_dense():
    torch.manual_seed(3)
    cents = _centroids(2, 3, 8)
    mod = RoutingAttention(cents, window=4, causal=True, assign="nearest", backend="reference").eval()
    q, k, v = rand(1, 2, 15, 8), rand(1, 2, 15, 8), rand(1, 2, 15, 8)
    out, _ = mod(q, k, v)
    mask = routing_nearest_mask(q, k, cents.centroids, 4)
    ref, _ = masked_dense(q, k, v, mask, 8 ** -0.5)
    torch.testing.assert_close(out, ref)


def test_routing_passes_the_same_tensor_as_q_and_k(monkeypatch):
    seen = []
    real = attention_mod.routing_attention

    def spy(q, k, v, centroids, **kw):
        seen.append(k is q)
        return real(q, k, v, centroids, **kw)

    monkeypatch.setattr(attention_mod, "routing_attention", spy)
    cents = _centroids(1, 2, 4)
    for share in (True, False):
        mod = RoutingAttention(cents, window=3, causal=True, share_qk=share, qk_layernorm=True)
        mod(rand(1, 1, 6, 4), rand(1, 1, 6, 4), rand(1, 1, 6, 4))
    assert seen == [True, False]


def test_commitment_loss_value_and_gradient():
    torch.manual_seed(4)
    cents = _centroids(2, 3, 8)
    mod = RoutingAttention(cents, window=4, causal=True, share_qk=False).eval()
    q = rand(2, 2, 9, 8).requires_grad_()
    k = rand(2, 2, 9, 8).requires_grad_()
    _, loss = mod(q, k, rand(2, 2, 9, 8), compute_aux=True)
    expected = 0.0
    for x in (q, k):
        xn = layer_norm_plain(x)
        s = torch.einsum("bhtd,hcd->bhtc", xn, cents.centroids)
        chosen = cents.centroids[torch.arange(2)[None, :, None], s.argmax(-1)]
        expected = expected + (xn - chosen).pow(2).sum(-1).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert q.grad.abs().sum() > 0 and k.grad.abs().sum() > 0
    assert not cents.centroids.requires_grad and cents.centroids.grad is None


def _config(**kw):
    base = dict(vocab_size=32, dim=24, depth=1, heads=4, query_shape=4, memory_flange=4, sparsity_cluster_size=3,
                sparsity_cluster_attention_window=5, max_relative_distance=6, attention_backend="reference")
    base.update(kw)
    return ModelConfig(**base)


def _mixed_dense(layer: MixedAttention, x: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The layer recomputed head by head from its weights with brute-force attention."""
    B, T, _ = x.shape
    H, D, L = cfg.heads, cfg.head_dim, layer.num_local
    W = layer.qkv.weight
    rows = iter(torch.split(W, layer.widths, dim=0))
    wq, wkl, wkr, wv = next(rows), next(rows), next(rows), next(rows)
    proj = lambda w: torch.einsum("btc,oc->bto", x, w).view(B, T, -1, D).transpose(1, 2)  # noqa: E731
    q, v = proj(wq), proj(wv)
    heads = []
    for h in range(H):
        qh, vh = q[:, h : h + 1], v[:, h : h + 1]
        if h < L:
            kh = proj(wkl)[:, h : h + 1]
            loc = layer.local
            heads.append(local_dense(qh, kh, vh, cfg.query_shape, cfg.memory_flange, cfg.causal, D ** -0.5,
                                     loc.rel_k.detach(), loc.rel_v.detach()))
        else:
            r = h - L
            c = layer.routing.centroids.centroids[r : r + 1]
            kh = qh if cfg.share_qk else proj(wkr)[:, r : r + 1]
            if cfg.qk_layernorm:
                qh, kh = layer_norm_plain(qh), layer_norm_plain(kh)
            heads.append(routing_topk_dense(qh, kh, vh, c, cfg.sparsity_cluster_attention_window, cfg.causal,
                                            D ** -0.5))
    out = torch.cat(heads, dim=1).transpose(1, 2).reshape(B, T, H * D)
    return out @ layer.out.weight.T


@pytest.mark.parametrize("local,share_qk,qk_ln,causal", [
    (2, True, False, True), (2, False, True, True), (0, True, True, True), (4, True, False, True),
    (1, False, False, False),
])
def test_mixed_layer_matches_head_by_head_dense(local, share_qk, qk_ln, causal):
    torch.manual_seed(5)
    cfg = _config(local_num_heads=local, share_qk=share_qk, qk_layernorm=qk_ln, causal=causal)
    layer = MixedAttention(cfg, local).double().eval()
    assert (layer.local is None) == (local == 0) and (layer.routing is None) == (local == 4)
    x = rand(2, 11, 24)
    out, aux = layer(x)
    torch.testing.assert_close(out, _mixed_dense(layer, x, cfg))
    assert aux is None


def test_mixed_layer_shared_qk_has_no_routing_key_projection():
    shared = MixedAttention(_config(local_num_heads=1, share_qk=True), 1)
    separate = MixedAttention(_config(local_num_heads=1, share_qk=False), 1)
    assert shared.qkv.weight.shape[0] == 24 + 6 + 0 + 24
    assert separate.qkv.weight.shape[0] == 24 + 6 + 18 + 24


def test_mixed_layer_rejects_mismatched_shared_centroids():
    with pytest.raises(ValueError, match="shared centroids"):
        MixedAttention(_config(local_num_heads=2), 2, RoutingCentroids(3, 3, 6, decay=0.9, variant="ratio"))


def test_commitment_gradient_reaches_routing_query_rows_only():
    torch.manual_seed(6)
    cfg = _config(local_num_heads=2, share_qk=True)
    layer = MixedAttention(cfg, 2).double().eval()
    _, aux = layer(rand(2, 9, 24), compute_aux=True)
    aux.backward()
    g = layer.qkv.weight.grad
    D = cfg.head_dim
    assert g[2 * D : 4 * D].abs().sum() > 0  # routing heads' q rows
    assert g[: 2 * D].abs().sum() == 0  # local heads' q rows: not in the loss
    assert g[4 * D :].abs().sum() == 0  # k, v rows
    assert F.mse_loss(aux, aux.detach()) == 0  # a plain scalar
