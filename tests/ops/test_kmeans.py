"""k-means functions: statistics, both EMA variants, commitment loss."""
import pytest
import torch

from routeformer.ops import kmeans


def test_normalize_is_layer_norm_without_affine():
    x = torch.randn(2, 3, 5, 8, dtype=torch.float64) * 4 + 2
    y = kmeans.normalize(x)
    torch.testing.assert_close(y.mean(-1), torch.zeros(2, 3, 5, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.var(-1, unbiased=False), torch.ones(2, 3, 5, dtype=torch.float64), atol=1e-4, rtol=0)


def test_scores_are_float32_for_half_inputs():
    x = torch.randn(1, 2, 7, 8, dtype=torch.bfloat16)
    c = torch.randn(2, 3, 8)
    assert kmeans.routing_scores(x, c).dtype == torch.float32


def test_cluster_statistics_match_loops():
    g = torch.Generator().manual_seed(0)
    B, H, T, D, C = 2, 3, 11, 4, 5
    x = torch.randn(B, H, T, D, generator=g)
    assign = torch.randint(0, C, (B, H, T), generator=g)
    sums, counts = kmeans.cluster_statistics(x, assign, C)
    for h in range(H):
        for c in range(C):
            sel = assign[:, h] == c
            torch.testing.assert_close(sums[h, c], x[:, h][sel].sum(0))
            assert counts[h, c] == sel.sum()


def _state(H=2, C=3, D=4):
    c = torch.nn.functional.normalize(torch.randn(H, C, D), dim=-1)
    return kmeans.KMeansState(c, torch.zeros(H, C, D), torch.zeros(H, C))


def test_ratio_update_is_ratio_of_emas():
    state = _state()
    sums, counts = torch.randn(2, 3, 4), torch.tensor([[2.0, 0.0, 5.0], [1.0, 3.0, 0.0]])
    new = kmeans.ema_update(state, sums, counts, decay=0.9, variant="ratio")
    torch.testing.assert_close(new.ema_counts, 0.1 * counts)
    torch.testing.assert_close(new.ema_sums, 0.1 * sums)
    seen = counts > 0
    torch.testing.assert_close(new.centroids[seen], (sums / counts.clamp_min(1)[..., None])[seen])
    # A cluster that never received a vector keeps its centroid.
    torch.testing.assert_close(new.centroids[~seen], state.centroids[~seen])
    again = kmeans.ema_update(new, sums * 2, counts, decay=0.9, variant="ratio")
    expected = (0.9 * new.ema_sums + 0.1 * sums * 2) / (0.9 * new.ema_counts + 0.1 * counts).clamp_min(1e-6)[..., None]
    torch.testing.assert_close(again.centroids[seen], expected[seen])


def test_normalized_mean_update_moves_toward_mean_and_renormalizes():
    state = _state()
    sums, counts = torch.randn(2, 3, 4) * 3, torch.tensor([[2.0, 0.0, 5.0], [1.0, 3.0, 0.0]])
    new = kmeans.ema_update(state, sums, counts, decay=0.5, variant="normalized_mean")
    seen = counts > 0
    mean = sums / counts.clamp_min(1)[..., None]
    expected = torch.nn.functional.normalize(0.5 * state.centroids + 0.5 * mean, dim=-1)
    torch.testing.assert_close(new.centroids[seen], expected[seen])
    torch.testing.assert_close(new.centroids.norm(dim=-1), torch.ones(2, 3))
    torch.testing.assert_close(new.centroids[~seen], state.centroids[~seen])


def test_ema_update_rejects_bad_arguments():
    state = _state()
    with pytest.raises(ValueError, match="variant"):
        kmeans.ema_update(state, torch.zeros(2, 3, 4), torch.zeros(2, 3), variant="mystery")
    with pytest.raises(ValueError, match="decay"):
        kmeans.ema_update(state, torch.zeros(2, 3, 4), torch.zeros(2, 3), decay=1.0)


def test_repeated_updates_converge_to_cluster_means():
    # Two well-separated blobs: the ratio variant ends at their means.
    torch.manual_seed(0)
    centers = torch.tensor([[3.0, 0.0], [-3.0, 0.0]])
    x = torch.cat([centers[0] + 0.1 * torch.randn(50, 2), centers[1] + 0.1 * torch.randn(50, 2)])
    x = x[None, None]  # (1, 1, 100, 2)
    state = kmeans.KMeansState(torch.tensor([[[1.0, 0.1], [-1.0, 0.1]]]), torch.zeros(1, 2, 2), torch.zeros(1, 2))
    for _ in range(50):
        assign = torch.einsum("bhtd,hcd->bhtc", x, state.centroids).argmax(-1)
        sums, counts = kmeans.cluster_statistics(x, assign, 2)
        state = kmeans.ema_update(state, sums, counts, decay=0.8)
    torch.testing.assert_close(state.centroids[0], x[0, 0].view(2, 50, 2).mean(1), atol=1e-5, rtol=0)


def test_commitment_loss_gradient_reaches_x_only():
    x = torch.randn(1, 2, 6, 4, requires_grad=True)
    centroids = torch.randn(2, 3, 4, requires_grad=True)
    assign = kmeans.nearest_centroid(x, centroids)
    xn = kmeans.normalize(x)
    loss = kmeans.commitment_loss(xn, centroids, assign)
    # Independent of the library: plain-loop LayerNorm and squared distances.
    total, n = 0.0, 0
    for h in range(2):
        for t in range(6):
            row = x[0, h, t].detach().double()
            normed = (row - row.mean()) / (row.var(unbiased=False) + 1e-5).sqrt()
            c = centroids[h, int(assign[0, h, t])].detach().double()
            total += float(((normed - c) ** 2).sum())
            n += 1
    assert abs(loss.item() - total / n) < 1e-5 * max(1.0, total / n)
    loss.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert centroids.grad is None
