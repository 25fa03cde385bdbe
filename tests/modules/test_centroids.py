"""Centroid buffers: explicit EMA updates only, once per call, statistics summed across micro-batches."""
from __future__ import annotations

import pytest
import torch

from routeformer import ModelConfig, RoutingTransformerLM
from routeformer.modules import RoutingCentroids, update_centroids
from tests.ops.brute_force import layer_norm_plain


def _tiny(**kw):
    base = dict(vocab_size=32, dim=16, depth=3, heads=2, local_num_heads=1, query_shape=4, memory_flange=4,
                sparsity_cluster_size=3, sparsity_cluster_attention_window=4, max_relative_distance=4,
                max_seq_len=64, centroid_decay=0.5)
    base.update(kw)
    torch.manual_seed(0)
    return RoutingTransformerLM(ModelConfig(**base))


def _tokens(B=2, T=12, seed=1):
    return torch.randint(0, 32, (B, T), generator=torch.Generator().manual_seed(seed))


def _expected_stats(x: torch.Tensor, centroids: torch.Tensor):
    """Brute-force per-cluster sums/counts of LayerNorm(x) assigned to the argmax centroid."""
    xn = layer_norm_plain(x)
    a = torch.einsum("bhtd,hcd->bhtc", xn, centroids.double()).argmax(-1)
    H, C, D = centroids.shape
    sums, counts = torch.zeros(H, C, D, dtype=torch.float64), torch.zeros(H, C, dtype=torch.float64)
    for b, h, t in torch.cartesian_prod(*(torch.arange(n) for n in a.shape)).tolist():
        sums[h, a[b, h, t]] += xn[b, h, t]
        counts[h, a[b, h, t]] += 1
    return sums, counts


def test_centroids_are_buffers_never_parameters():
    model = _tiny()
    names = {n for n, _ in model.named_parameters()}
    assert not any("centroid" in n or "ema_" in n or "pending" in n for n in names)
    for m in model.centroid_modules():
        for buf in (m.centroids, m.ema_sums, m.ema_counts):
            assert not buf.requires_grad
        assert torch.allclose(m.centroids.norm(dim=-1), torch.ones(m.centroids.shape[:2]))  # unit init
    state = model.state_dict()
    assert any(k.endswith("routing.centroids.centroids") for k in state)
    assert not any("pending" in k for k in state)  # transient, not checkpointed


def test_optimizer_step_and_gradients_leave_centroids_alone():
    model = _tiny().train()
    before = [m.centroids.clone() for m in model.centroid_modules()]
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    logits, aux = model(_tokens(), return_aux_loss=True)
    (logits.square().mean() + aux).backward()
    opt.step()
    for m, b in zip(model.centroid_modules(), before):
        assert m.centroids.grad is None
        assert torch.equal(m.centroids, b)


def test_eval_mode_accumulates_nothing_and_update_is_a_noop():
    model = _tiny().eval()
    before = [m.centroids.clone() for m in model.centroid_modules()]
    model(_tokens(), return_aux_loss=True)
    assert all(m.pending_counts.sum() == 0 for m in model.centroid_modules())
    assert model.update_centroids() == 0
    assert all(torch.equal(m.centroids, b) for m, b in zip(model.centroid_modules(), before))


def test_train_mode_moves_centroids_only_at_update():
    model = _tiny().train()
    before = [m.centroids.clone() for m in model.centroid_modules()]
    model(_tokens())
    assert all(torch.equal(m.centroids, b) for m, b in zip(model.centroid_modules(), before))
    assert model.update_centroids() == len(before) == 3
    assert all(not torch.equal(m.centroids, b) for m, b in zip(model.centroid_modules(), before))
    assert all(m.pending_counts.sum() == 0 for m in model.centroid_modules())
    assert model.update_centroids() == 0  # nothing pending any more


@pytest.mark.parametrize("variant", ["ratio", "normalized_mean"])
def test_update_equals_ema_of_brute_force_statistics(variant):
    torch.manual_seed(3)
    H, C, D, decay = 2, 3, 6, 0.8
    mod = RoutingCentroids(H, C, D, decay=decay, variant=variant).double()
    c0 = mod.centroids.clone()
    x1, x2 = torch.randn(2, H, 9, D, dtype=torch.float64), torch.randn(1, H, 5, D, dtype=torch.float64)
    sums, counts = torch.zeros(H, C, D, dtype=torch.float64), torch.zeros(H, C, dtype=torch.float64)
    for x in (x1, x2):  # two micro-batches, one update
        xn = layer_norm_plain(x)
        mod.accumulate(xn, torch.einsum("bhtd,hcd->bhtc", xn, c0).argmax(-1))
        s, n = _expected_stats(x, c0)
        sums, counts = sums + s, counts + n
    assert update_centroids([mod]) == 1
    seen = counts > 0
    if variant == "ratio":  # EMAs start at zero, so the first update is the batch mean
        expected = torch.where(seen[..., None], sums / counts.clamp_min(1)[..., None], c0)
        torch.testing.assert_close(mod.ema_counts, (1 - decay) * counts)
    else:
        moved = decay * c0 + (1 - decay) * sums / counts.clamp_min(1)[..., None]
        expected = torch.where(seen[..., None], moved / moved.norm(dim=-1, keepdim=True), c0)
    torch.testing.assert_close(mod.centroids, expected)


def test_micro_batches_accumulate_into_one_update():
    """Two half batches then one update equal one full batch then one update (same assignments)."""
    tokens = _tokens(B=4)
    full, split = _tiny().train(), _tiny().train()
    full(tokens)
    split(tokens[:2])
    split(tokens[2:])
    for a, b in zip(full.centroid_modules(), split.centroid_modules()):
        torch.testing.assert_close(a.pending_counts, b.pending_counts)
        torch.testing.assert_close(a.pending_sums, b.pending_sums, atol=1e-5, rtol=1e-5)
    full.update_centroids()
    split.update_centroids()
    for a, b in zip(full.centroid_modules(), split.centroid_modules()):
        torch.testing.assert_close(a.centroids, b.centroids, atol=1e-5, rtol=1e-5)


def test_shared_centroids_update_once_with_every_layers_statistics():
    model = _tiny(share_centroids=True, sparsity_skip_first=1).train()
    (shared,) = model.centroid_modules()
    routing_layers = [blk for blk in model.layers if blk.attn.routing is not None]
    assert len(routing_layers) == 2 and all(b.attn.routing.centroids is shared for b in routing_layers)
    model(_tokens(B=2, T=12))
    # Two routing layers, shared QK (causal default): 2 layers * B * T vectors per routing head.
    assert torch.equal(shared.pending_counts.sum(-1), torch.full((1,), 2.0 * 2 * 12))
    calls = []
    model.update_centroids(all_reduce=lambda t: calls.append(t.numel()))
    assert len(calls) == 1  # one collective for everything
    assert shared.ema_counts.sum() == pytest.approx((1 - 0.5) * 48)  # one EMA step, not one per layer


def test_all_reduce_sums_statistics_before_the_update():
    """A fake 2-rank all-reduce (doubling) must double ema_counts but leave the mean (ratio) unchanged."""
    tokens = _tokens()
    plain, reduced = _tiny().train(), _tiny().train()
    plain(tokens)
    reduced(tokens)
    plain.update_centroids()
    reduced.update_centroids(all_reduce=lambda t: t.mul_(2))  # in place, like torch.distributed
    for a, b in zip(plain.centroid_modules(), reduced.centroid_modules()):
        torch.testing.assert_close(b.ema_counts, 2 * a.ema_counts)
        torch.testing.assert_close(b.centroids, a.centroids)
    # A returning all-reduce (functional style) is accepted too.
    reduced(tokens)
    assert reduced.update_centroids(all_reduce=lambda t: t * 2) == 3


def test_separate_keys_add_key_statistics():
    model = _tiny(causal=False, depth=1).train()  # non-causal: share_qk defaults to False
    model(_tokens(B=1, T=10))
    (m,) = model.centroid_modules()
    assert m.pending_counts.sum() == 2 * 10  # queries and keys of the single routing head


def test_low_precision_model_keeps_float32_kmeans_state():
    model = _tiny().to(torch.bfloat16).train()
    assert model.embed.weight.dtype == torch.bfloat16
    for m in model.centroid_modules():
        assert all(b.dtype == torch.float32 for b in m.buffers())
    logits, aux = model(_tokens(), return_aux_loss=True)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()
    assert model.update_centroids() == 3
    assert model.double().centroid_modules()[0].centroids.dtype == torch.float64
