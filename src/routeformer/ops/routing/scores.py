"""Routing scores as the assignment consumes them: a fused Triton kernel on CUDA, the formula elsewhere.

Legend: B batch, H heads, T tokens, D head dim, C clusters, W window, G = ceil(T / GROUP) groups.

The specification is `kmeans.routing_scores`: centroids . LayerNorm(x) in float32. In PyTorch that is
several kernels and a (B, H, T, C) float32 tensor that the top-k then needs transposed: at T = 64k,
H = 8, C = 128 it took 1.2 ms of a 3.4 ms forward on an H100 (benchmarks/NOTES_routing.md). One Triton
kernel here reads x once, normalises it in registers and writes the scores already transposed to
(B, H, C, T), plus each run of GROUP consecutive positions' maximum (for the top-k's first stage), or
for "nearest" only the argmax cluster, with no scores written at all.

Both backends of `routing_attention` take their scores from `assignment_scores` /
`nearest_clusters`, which choose the same path for the same input (fused on CUDA), so the reference
and the kernels always attend exactly the same pairs; the fused scores equal the formula within fp32
rounding (tests/ops/test_routing_scores.py), which can only matter for scores tied to ~1e-7.
"""
from __future__ import annotations

import importlib.util

import torch

from .._checks import TRITON_DTYPES
from ..kmeans import routing_scores

# Positions per group in the top-k's first stage (see triton_ops.topk_index); a power of two <= 32.
GROUP = 16
MAX_FUSED_HEAD_DIM = 256  # the kernel holds one (BLOCK_T x D) fp32 tile in registers


# A constant, not ops.triton_available(): torch.compile traces this check, and a CUDA tensor already
# proves the device half of that function.
_HAS_TRITON = importlib.util.find_spec("triton") is not None


def use_fused(x: torch.Tensor) -> bool:
    """The one rule both backends follow: fused on CUDA for the dtypes and head dims the kernel takes."""
    return x.is_cuda and x.dtype in TRITON_DTYPES and x.shape[-1] <= MAX_FUSED_HEAD_DIM and _HAS_TRITON


def assignment_scores(x: torch.Tensor, centroids: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """(B, H, C, T) float32 scores, contiguous: the layout the per-cluster top-k reads."""
    if use_fused(x) if fused is None else fused:
        from ._score_kernels import fused_scores

        return fused_scores(x, centroids)[0]
    return routing_scores(x, centroids).transpose(2, 3).contiguous()


def nearest_clusters(x: torch.Tensor, centroids: torch.Tensor, fused: bool | None = None) -> torch.Tensor:
    """(B, H, T) int64 highest-scoring cluster of each position; ties to the lower cluster index."""
    if use_fused(x) if fused is None else fused:
        from ._score_kernels import fused_argmax

        return fused_argmax(x, centroids)
    return routing_scores(x, centroids).argmax(dim=-1)
