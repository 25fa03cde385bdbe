"""Routing centroids: buffers moved by an explicit k-means EMA step, never by gradient.

Legend: H routing heads, C clusters, D head dim.

Life cycle (one optimizer step, any number of micro-batches):

    model.train(); loss = ...; loss.backward()    # each forward adds k-means statistics to `pending_*`
    optimizer.step()
    model.update_centroids()                       # one ops.kmeans.ema_update, pending statistics cleared

Forward passes in eval mode add nothing. Statistics are per-cluster sums and counts, so several
micro-batches (or a recomputing activation checkpoint, which adds the same statistics twice) leave the
per-cluster means unchanged; data-parallel ranks sum them with one all-reduce before the update.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import kmeans

AllReduce = Callable[[torch.Tensor], object]


class RoutingCentroids(nn.Module):
    """Centroids (H, C, D) of the routing heads of one layer (or of all layers when shared).

    Init: random unit vectors drawn from torch's RNG, like any parameter init.
    Update (`variant`, see ops.kmeans): "ratio" (authors' code) keeps EMAs of per-cluster sums and counts
    and sets centroid = ema_sums / ema_counts; the EMAs start at zero, so the first update sets each seen
    centroid to its batch mean. "normalized_mean" (paper, section 4) moves each centroid towards its batch
    mean by (1 - decay) and renormalises to unit length. Clusters that received no vector keep their value.
    """

    def __init__(self, num_heads: int, num_clusters: int, head_dim: int, *, decay: float, variant: str) -> None:
        super().__init__()
        if variant not in kmeans.UPDATE_VARIANTS:
            raise ValueError(f"variant must be one of {kmeans.UPDATE_VARIANTS}, got {variant!r}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay, self.variant = float(decay), variant
        shape = (num_heads, num_clusters, head_dim)
        self.register_buffer("centroids", F.normalize(torch.randn(shape), dim=-1))
        self.register_buffer("ema_sums", torch.zeros(shape))
        self.register_buffer("ema_counts", torch.zeros(shape[:2]))
        # Pending statistics are transient (cleared every optimizer step), so kept out of checkpoints.
        self.register_buffer("pending_sums", torch.zeros(shape), persistent=False)
        self.register_buffer("pending_counts", torch.zeros(shape[:2]), persistent=False)
        # Set by RoutingTransformerLM.init_centroids for one no-grad forward: the next routing layer that
        # uses this set initialises it from its normalised q (and k) with this seed, then clears it.
        self.pending_init_seed: int | None = None

    def _apply(self, fn, recurse=True):
        # model.half()/bfloat16() must not round the k-means state: EMA steps of (1 - decay) = 1e-3 vanish
        # in 8-bit mantissas. Float32 (or float64) is kept; the ops cast centroids to their compute dtype.
        # Casting to fp16 and back would already have rounded the values (and turned EMA counts above
        # 65504 into inf), so keep the original buffers and only follow fn's device move.
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            old = before.get(name)
            if buf is not None and old is not None and buf.dtype in (torch.float16, torch.bfloat16):
                self._buffers[name] = old.to(device=buf.device)
        return self

    def extra_repr(self) -> str:
        H, C, D = self.centroids.shape
        return f"heads={H}, clusters={C}, head_dim={D}, decay={self.decay}, variant={self.variant!r}"

    @torch.no_grad()
    def initialize_from(self, x_normed: torch.Tensor, *, iters: int = 10, seed: int = 0) -> None:
        """Set the centroids from data: spherical k-means on normalised vectors (B, H, T, D).

        The seeded generator keeps torch's global RNG untouched (resumed runs replay the same batches).
        "normalized_mean" keeps the unit centroids; "ratio" starts from the plain means of the clusters
        found (its EMAs restart at zero, so its first update is a batch mean as usual).
        """
        B, H, T, D = x_normed.shape
        x = x_normed.detach().permute(1, 0, 2, 3).reshape(H, B * T, D)
        generator = torch.Generator().manual_seed(seed)
        unit, counts = kmeans.spherical_kmeans(x, self.centroids.shape[1], iters=iters, generator=generator)
        if self.variant == "ratio":
            assignment = torch.einsum("hnd,hcd->hnc", x.float(), unit).argmax(-1)
            sums, counts = kmeans.cluster_statistics(x[None], assignment[None], unit.shape[1])
            unit = torch.where((counts > 0)[..., None], sums / counts.clamp_min(1)[..., None], unit)
        self.centroids.copy_(unit.to(self.centroids.dtype))
        self.ema_sums.zero_()
        self.ema_counts.zero_()
        self.clear_pending()

    @torch.no_grad()
    def accumulate(self, x_normed: torch.Tensor, assignment: torch.Tensor) -> None:
        """Add statistics of normalised vectors (B, H, T, D) assigned to clusters (B, H, T)."""
        sums, counts = kmeans.cluster_statistics(x_normed, assignment, self.centroids.shape[1])
        self.pending_sums.add_(sums.to(self.pending_sums.dtype))
        self.pending_counts.add_(counts.to(self.pending_counts.dtype))

    @torch.no_grad()
    def apply_statistics(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        """One EMA step from (already all-reduced) statistics; clears the pending ones."""
        state = kmeans.KMeansState(self.centroids, self.ema_sums, self.ema_counts)
        new = kmeans.ema_update(state, sums, counts, decay=self.decay, variant=self.variant)
        self.centroids.copy_(new.centroids)
        self.ema_sums.copy_(new.ema_sums)
        self.ema_counts.copy_(new.ema_counts)
        self.clear_pending()

    @torch.no_grad()
    def clear_pending(self) -> None:
        self.pending_sums.zero_()
        self.pending_counts.zero_()


@torch.no_grad()
def update_centroids(modules: Iterable[RoutingCentroids], all_reduce: AllReduce | None = None) -> int:
    """Apply the pending statistics of each distinct module once; returns how many were updated.

    all_reduce: optional callable that sums a tensor across ranks, in place (torch.distributed.all_reduce)
    or by returning the result. All statistics travel in one flat tensor, so one collective per step.
    Modules with no pending vectors (after the all-reduce) are left untouched. The check costs one host
    sync per optimizer step, outside forward.
    """
    unique = list({id(m): m for m in modules}.values())
    if not unique:
        return 0
    parts = [t for m in unique for t in (m.pending_sums.flatten(), m.pending_counts.flatten())]
    flat = torch.cat([p.float() for p in parts])
    if all_reduce is not None:
        result = all_reduce(flat)
        if isinstance(result, torch.Tensor):
            flat = result
    pieces = flat.split([p.numel() for p in parts])
    totals = torch.stack([pieces[2 * i + 1].sum() for i in range(len(unique))]).tolist()
    updated = 0
    for i, (module, total) in enumerate(zip(unique, totals)):
        if total > 0:
            sums = pieces[2 * i].view_as(module.pending_sums)
            counts = pieces[2 * i + 1].view_as(module.pending_counts)
            module.apply_statistics(sums, counts)
            updated += 1
        else:
            module.clear_pending()
    return updated
