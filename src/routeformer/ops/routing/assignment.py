"""Which queries and keys each routing cluster holds: the index structures every backend consumes.

Legend: B batch, H heads, T tokens, D head dim, C clusters, W window.

Both backends (the PyTorch reference and the Triton kernels) take their scores from scores.py, which
picks the same path for the same input, so they attend exactly the same (query, key) pairs; only the
attention arithmetic differs.

- "topk" (the paper): per (b, h, cluster) the W highest-scoring query positions and, separately, the
  W highest-scoring key positions, each sorted by position. Ties go to the lower position.
- "nearest" (ours, causal only): every token goes to its argmax centroid; query i attends the W most
  recent keys j <= i of its own cluster. Keys are sorted by (cluster, position); query i's keys are the
  contiguous run key_order[key_start[i]:key_end[i]] of that order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .scores import assignment_scores, nearest_clusters


@dataclass(frozen=True)
class TopkAssignment:
    query_index: torch.Tensor  # (B, H, C, W) int64 positions, ascending within a cluster
    key_index: torch.Tensor  # (B, H, C, W) int64 positions, ascending within a cluster


@dataclass(frozen=True)
class NearestAssignment:
    query_cluster: torch.Tensor  # (B, H, T) int64 argmax centroid of each query
    key_cluster: torch.Tensor  # (B, H, T) int64 argmax centroid of each key
    key_order: torch.Tensor  # (B, H, T) int64 key positions sorted by (cluster, position)
    key_start: torch.Tensor  # (B, H, T) int64 first slot of key_order that query i attends
    key_end: torch.Tensor  # (B, H, T) int64 one past the last slot (start == end: no key)


def topk_positions(scores: torch.Tensor, window: int) -> torch.Tensor:
    """scores (B, H, T, C) float32 -> (B, H, C, W) top-W positions per cluster, sorted by position.

    A stable descending sort keeps equal scores in position order, so ties go to the lower position
    (torch.topk makes no such promise).
    """
    w = min(window, scores.shape[2])
    order = torch.sort(scores.transpose(2, 3), dim=-1, descending=True, stable=True).indices
    return order[..., :w].sort(dim=-1).values


def assign_topk(
    q: torch.Tensor, k: torch.Tensor, centroids: torch.Tensor, window: int
) -> TopkAssignment:
    query_index = topk_positions(assignment_scores(q, centroids).transpose(2, 3), window)
    key_index = query_index if k is q else topk_positions(assignment_scores(k, centroids).transpose(2, 3), window)
    return TopkAssignment(query_index, key_index)


def assign_nearest(
    q: torch.Tensor, k: torch.Tensor, centroids: torch.Tensor, window: int
) -> NearestAssignment:
    T = q.shape[2]
    query_cluster = nearest_clusters(q, centroids)
    key_cluster = query_cluster if k is q else nearest_clusters(k, centroids)
    pos = torch.arange(T, device=q.device)
    # (cluster, position) packed into one integer: unique, so a plain sort orders it.
    key_code = key_cluster * T + pos
    sorted_code, key_order = key_code.sort(dim=-1)
    query_code = query_cluster * T + pos
    key_end = torch.searchsorted(sorted_code, query_code, right=True)
    cluster_start = torch.searchsorted(sorted_code, query_cluster * T)
    key_start = torch.maximum(cluster_start, key_end - window)
    return NearestAssignment(query_cluster, key_cluster, key_order, key_start, key_end)
