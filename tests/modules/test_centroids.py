"""Centroid buffers: explicit EMA updates only, once per call, statistics summed across micro-batches."""
from __future__ import annotations

import pytest
import torch

from routeformer import ModelConfig, RoutingTransformerLM
from routeformer.modules import RoutingCentroids, update_centroids
from routeformer.ops import kmeans
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
    model = _tiny(share_centroids=True, sparsity_skip_first=1, centroid_update="ratio").train()
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


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_cast_keeps_kmeans_values_exact(dtype):
    """Not a round trip through fp16: centroids keep every bit, EMA counts above 65504 stay finite."""
    model = _tiny().train()
    (m, *_) = model.centroid_modules()
    m.centroids.add_(torch.randn_like(m.centroids) * 1e-4)  # values fp16/bf16 cannot hold
    m.ema_counts.fill_(1e6)
    before = {name: b.clone() for name, b in m.named_buffers()}
    model.to(dtype)
    for name, b in m.named_buffers():
        assert b.dtype == torch.float32 and torch.equal(b, before[name]), name


@pytest.mark.parametrize("variant", ["ratio", "normalized_mean"])
def test_init_centroids_from_data_spreads_tokens_over_clusters(variant):
    """Data init (spherical k-means, layer by layer) uses every cluster where random init used one.

    Queries sharing a strong common direction (as trained layers' queries do) make one random unit
    centroid win every token; k-means on the data splits them.
    """
    torch.manual_seed(0)
    model = _tiny(centroid_update=variant, sparsity_cluster_size=4)
    (first, *_) = model.centroid_modules()
    direction = torch.randn(model.config.dim) * 3
    with torch.no_grad():
        model.embed.weight.add_(direction)  # every token embedding shares one direction
    tokens = _tokens(B=4, T=32)

    def usage():
        captured = {}
        layer = next(b for b in model.layers if b.attn.routing is not None)
        handle = layer.attn.routing.register_forward_hook(lambda m, inp, out: captured.update(q=inp[0]))
        model.eval()
        model(tokens)
        handle.remove()
        assign = kmeans.nearest_centroid(captured["q"], first.centroids)
        return [len(assign[:, h].unique()) for h in range(assign.shape[1])]

    before = first.centroids.clone()
    rng_before = torch.get_rng_state()
    model.train()
    model.init_centroids(tokens, seed=3)
    assert torch.equal(torch.get_rng_state(), rng_before)  # the global RNG is untouched
    assert model.training  # mode restored
    assert not torch.equal(first.centroids, before)
    assert all(n >= 3 for n in usage())
    assert float(first.pending_counts.sum()) == 0.0  # init adds no statistics
    if variant == "normalized_mean":
        torch.testing.assert_close(first.centroids.norm(dim=-1), torch.ones(first.centroids.shape[:2]))


def test_spherical_kmeans_recovers_separated_directions():
    g = torch.Generator().manual_seed(0)
    axes = torch.eye(4)[:3] * 5
    x = torch.cat([axes[i] + 0.3 * torch.randn(40, 4, generator=g) for i in range(3)])[None]  # (1, 120, 4)
    centroids, counts = kmeans.spherical_kmeans(x, 3, iters=10, generator=g)
    assert sorted(counts[0].tolist()) == [40.0, 40.0, 40.0]
    best = (centroids[0] @ torch.eye(4)[:3].T).argmax(0)
    assert sorted(best.tolist()) == [0, 1, 2]
