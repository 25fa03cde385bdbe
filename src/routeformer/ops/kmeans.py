"""Online k-means for routing: scores, assignments, per-cluster statistics and EMA updates.

Legend: B batch, H heads, T tokens, D head dim, C clusters.

Routing compares centroids with LayerNorm(x) (LayerNorm over D without weight or bias), in float32
whatever the input dtype. The centroid update is split in two pure functions so that data-parallel
training can all-reduce the statistics between them:

    sums, counts = cluster_statistics(normalize(x), assignment, C)   # per rank
    (all-reduce sums and counts with SUM)
    state = ema_update(state, sums, counts, decay=0.999, variant=...)

Two variants of the update (`variant`):

- "ratio" (default; the authors' TensorFlow code, VQ-VAE style): keep EMAs of the per-cluster sums
  and counts and set each centroid to their ratio; no renormalisation.
      ema_counts <- decay * ema_counts + (1 - decay) * counts
      ema_sums   <- decay * ema_sums   + (1 - decay) * sums
      centroids  <- ema_sums / ema_counts            (clusters with ema_counts ~ 0 keep their centroid)
- "normalized_mean" (the paper's text, section 4): move each centroid towards the mean of the vectors
  assigned to it this step, then renormalise it to unit L2 norm.
      centroids <- normalize_l2(decay * centroids + (1 - decay) * sums / counts)   (counts > 0 only)

The paper mixes the means of Q and K: callers do that by passing the statistics of both (added), which
is what `RoutingAttention` does for separate keys; with shared QK there is one set.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._checks import autocast_off

UPDATE_VARIANTS = ("ratio", "normalized_mean")


def normalize(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim without weight or bias, in float32 (float64 stays float64)."""
    x = x if x.dtype == torch.float64 else x.float()
    return F.layer_norm(x, (x.shape[-1],), eps=eps)


@autocast_off
def routing_scores(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), centroids (H, C, D) -> scores (B, H, T, C) = centroids . LayerNorm(x)."""
    xn = normalize(x)
    return torch.einsum("bhtd,hcd->bhtc", xn, centroids.to(xn.dtype))


def nearest_centroid(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, H, T) index of the highest-scoring centroid; ties go to the lower cluster index."""
    return routing_scores(x, centroids).argmax(dim=-1)


def cluster_statistics(
    x_normed: torch.Tensor, assignment: torch.Tensor, num_clusters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-cluster sums (H, C, D) and counts (H, C), float32, summed over batch and tokens.

    x_normed: (B, H, T, D) already normalised vectors; assignment: (B, H, T) cluster ids.
    """
    if x_normed.dim() != 4 or assignment.shape != x_normed.shape[:3]:
        raise ValueError(
            f"x_normed must be (B, H, T, D) and assignment (B, H, T); got {tuple(x_normed.shape)} "
            f"and {tuple(assignment.shape)}"
        )
    B, H, T, D = x_normed.shape
    x = x_normed.detach().float().permute(1, 0, 2, 3).reshape(H, B * T, D)
    idx = assignment.permute(1, 0, 2).reshape(H, B * T)
    sums = x.new_zeros(H, num_clusters, D).scatter_add_(1, idx[..., None].expand(H, B * T, D), x)
    counts = x.new_zeros(H, num_clusters).scatter_add_(1, idx, x.new_ones(H, B * T))
    return sums, counts


class KMeansState(NamedTuple):
    centroids: torch.Tensor  # (H, C, D)
    ema_sums: torch.Tensor  # (H, C, D), used by "ratio"
    ema_counts: torch.Tensor  # (H, C), used by "ratio"


def ema_update(
    state: KMeansState,
    sums: torch.Tensor,
    counts: torch.Tensor,
    *,
    decay: float = 0.999,
    variant: str = "ratio",
    eps: float = 1e-6,
) -> KMeansState:
    """One EMA step of the centroids from (already all-reduced) statistics. Pure: returns new tensors."""
    if variant not in UPDATE_VARIANTS:
        raise ValueError(f"variant must be one of {UPDATE_VARIANTS}, got {variant!r}")
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"decay must be in [0, 1), got {decay}")
    centroids, ema_sums, ema_counts = state
    sums = sums.to(centroids.dtype)
    counts = counts.to(centroids.dtype)
    if variant == "ratio":
        ema_counts = decay * ema_counts + (1 - decay) * counts
        ema_sums = decay * ema_sums + (1 - decay) * sums
        ratio = ema_sums / ema_counts.clamp_min(eps)[..., None]
        centroids = torch.where((ema_counts > eps)[..., None], ratio, centroids)
        return KMeansState(centroids, ema_sums, ema_counts)
    seen = (counts > 0)[..., None]
    batch_mean = sums / counts.clamp_min(1.0)[..., None]
    moved = F.normalize(decay * centroids + (1 - decay) * batch_mean, dim=-1)
    return KMeansState(torch.where(seen, moved, centroids), ema_sums, ema_counts)


def commitment_loss(
    x_normed: torch.Tensor, centroids: torch.Tensor, assignment: torch.Tensor
) -> torch.Tensor:
    """Mean squared distance between each normalised vector and its (detached) centroid.

    Gradients flow into x only: centroids move by EMA, never by gradient.
    """
    H, C, D = centroids.shape
    chosen = centroids.detach().to(x_normed.dtype)[
        torch.arange(H, device=assignment.device)[None, :, None], assignment
    ]  # (B, H, T, D)
    return (x_normed - chosen).pow(2).sum(-1).mean()


@autocast_off
def spherical_kmeans(
    x: torch.Tensor, num_clusters: int, *, iters: int = 10, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster vectors per head by cosine similarity: (H, N, D) -> (unit centroids (H, C, D), counts (H, C)).

    Used to initialise routing centroids from data. Routing scores are centroids . LayerNorm(x), and
    every LayerNorm(x) has the same norm sqrt(D), so with unit-norm centroids the argmax-score cluster is
    also the nearest one; random unit centroids against the narrow cone that a layer's queries occupy
    leave one cluster winning every token. Seeds are C distinct random vectors; `iters` Lloyd steps follow,
    and a cluster that loses all its vectors keeps its previous centroid.
    """
    H, N, D = x.shape
    x = F.normalize(x.float() if x.dtype != torch.float64 else x, dim=-1)
    picks = torch.stack([torch.randperm(N, generator=generator)[:num_clusters] for _ in range(H)])
    if N < num_clusters:  # fewer vectors than clusters: reuse vectors, Lloyd steps keep them apart when possible
        extra = torch.randint(0, N, (H, num_clusters - N), generator=generator)
        picks = torch.cat([picks, extra], dim=1)
    picks = picks.to(x.device)
    centroids = x.gather(1, picks[..., None].expand(H, num_clusters, D))
    counts = x.new_zeros(H, num_clusters)
    for _ in range(iters):
        assignment = torch.einsum("hnd,hcd->hnc", x, centroids).argmax(-1)
        sums = x.new_zeros(H, num_clusters, D).scatter_add_(1, assignment[..., None].expand(H, N, D), x)
        counts = x.new_zeros(H, num_clusters).scatter_add_(1, assignment, x.new_ones(H, N))
        centroids = torch.where((counts > 0)[..., None], F.normalize(sums, dim=-1), centroids)
    return centroids, counts
