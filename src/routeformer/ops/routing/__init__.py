"""Routing attention: content-based sparse attention through online k-means clusters.

Legend: B batch, H heads, T tokens, D head dim, C clusters, W window.
"""
from __future__ import annotations

import torch

from .._checks import (TRITON_DTYPES, TRITON_MAX_ROUTING_HEAD_DIM, autocast_inputs, check_backend,
                       check_positive_int, check_qkv, resolve_scale)
from .assignment import NearestAssignment, TopkAssignment, assign_nearest, assign_topk
from .reference import nearest_attention, topk_attention

ASSIGN_MODES = ("topk", "nearest")

__all__ = [
    "routing_attention",
    "assign_topk",
    "assign_nearest",
    "TopkAssignment",
    "NearestAssignment",
    "ASSIGN_MODES",
]


def _check_centroids(centroids, q: torch.Tensor) -> None:
    if not isinstance(centroids, torch.Tensor):
        raise TypeError(f"centroids must be a torch.Tensor of shape (H, C, D), got {type(centroids).__name__}")
    H, D = q.shape[1], q.shape[3]
    if centroids.dim() != 3 or centroids.shape[0] != H or centroids.shape[2] != D:
        raise ValueError(
            f"centroids must have shape (H, C, D) = ({H}, C, {D}) to match q, got {tuple(centroids.shape)}"
        )
    if centroids.shape[1] < 1:
        raise ValueError("centroids must hold at least one cluster (C >= 1)")
    if not centroids.is_floating_point():
        raise ValueError(f"centroids must be floating point, got {centroids.dtype}")
    if centroids.device != q.device:
        raise ValueError(f"centroids are on {centroids.device} but q is on {q.device}: move them to one device")


def _use_triton(backend: str, q: torch.Tensor, v: torch.Tensor) -> bool:
    """"auto": Triton on CUDA for the dtypes and head dims the kernels take, else the reference."""
    if backend == "reference":
        return False
    if backend == "triton":
        return True
    from .. import triton_available

    supported = q.dtype in TRITON_DTYPES and max(q.shape[-1], v.shape[-1]) <= TRITON_MAX_ROUTING_HEAD_DIM
    return q.is_cuda and supported and triton_available()


def routing_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    centroids: torch.Tensor,
    *,
    window: int,
    causal: bool = True,
    assign: str = "topk",
    scale: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Attention restricted to routing clusters. q, k, v: (B, H, T, D) -> (B, H, T, Dv).

    centroids (H, C, D): routing scores are centroids . LayerNorm(x) in float32 for x = q (queries) and
    x = k (keys); pass the same tensor as q and k for shared QK. Logits are scale * q.k (scale defaults
    to 1/sqrt(D)).

    assign="topk" (the paper): each cluster takes the `window` best-scoring queries and, separately,
    keys (sorted by position; ties to the lower position). Query i attends its clusters' keys (j <= i if
    causal); its output is the mean over the clusters that selected it and gave it at least one key,
    0 if none did. NOT causal as a whole: whether an earlier token is selected depends on the scores of
    later tokens, so later tokens can change earlier outputs.

    assign="nearest" (causal only): each token goes to its argmax centroid; query i attends the `window`
    most recent keys j <= i of its own cluster (0 if none). Strictly causal, so cached decoding is exact.

    backend: "auto" (Triton on CUDA when available, else the reference), "reference" or "triton".
    Under autocast, q, k and v run in the autocast dtype (as F.scaled_dot_product_attention); the
    centroids keep theirs (the scores are float32 either way).
    """
    q, k, v = autocast_inputs(q, k, v)
    check_qkv(q, k, v)
    check_positive_int("window", window)
    _check_centroids(centroids, q)
    if assign not in ASSIGN_MODES:
        raise ValueError(f"assign must be one of {ASSIGN_MODES}, got {assign!r}")
    if assign == "nearest" and not causal:
        raise ValueError('assign="nearest" is defined for causal attention only: pass causal=True or assign="topk"')
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    check_backend(backend)
    scale = resolve_scale(scale, q.shape[-1])

    if _use_triton(backend, q, v):
        from .triton_ops import routing_attention_triton

        return routing_attention_triton(q, k, v, centroids, window=window, causal=causal, assign=assign, scale=scale)

    with torch.no_grad():
        if assign == "topk":
            assignment = assign_topk(q, k, centroids, window)
        else:
            assignment = assign_nearest(q, k, centroids, window)
    if assign == "topk":
        out = topk_attention(q, k, v, assignment, causal=causal, scale=scale)
    else:
        out = nearest_attention(q, k, v, assignment, window=window, scale=scale)
    return out.to(q.dtype)
