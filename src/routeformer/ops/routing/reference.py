"""Routing attention in plain PyTorch: the specification the Triton kernels are tested against.

Legend: B batch, H heads, T tokens, D head dim (Dv for values), C clusters, W window.

Memory is O(T * W) per (batch, head) when C * W ~ T: no T x T matrix is built. The attention math
runs in float32 (float64 stays float64), autocast or not, and the result is cast back to the input
dtype.
"""
from __future__ import annotations

import torch

from .._checks import autocast_off, compute_dtype
from .assignment import NearestAssignment, TopkAssignment

# Chunks bound the temporaries of one step; autograd still keeps what backward needs.
_MAX_CHUNK_ELEMENTS = 1 << 24


def _masked_softmax(logits: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to mask; rows with no allowed entry give all zeros.

    A finite fill (not -inf) keeps fully masked rows NaN-free in forward and backward.
    """
    logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    has_key = mask.any(dim=-1, keepdim=True)
    probs = torch.softmax(logits, dim=-1) * has_key
    return probs, has_key


def _gather_rows(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), index (B, H, *S) -> (B, H, *S, D)."""
    B, H, _, D = x.shape
    flat = index.reshape(B, H, -1, 1).expand(-1, -1, -1, D)
    return x.gather(2, flat).view(*index.shape, D)


@autocast_off
def topk_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    assignment: TopkAssignment,
    *,
    causal: bool,
    scale: float,
) -> torch.Tensor:
    """Attention inside each top-k cluster, scatter-mean over the clusters that gave a query a key."""
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, H, T, _ = q.shape
    qi, ki = assignment.query_index, assignment.key_index
    C, W = qi.shape[2], qi.shape[3]
    out = q.new_zeros(B, H, T, v.shape[-1])
    count = q.new_zeros(B, H, T)
    step = max(1, _MAX_CHUNK_ELEMENTS // max(1, B * H * W * W))
    for c0 in range(0, C, step):
        qi_c, ki_c = qi[:, :, c0 : c0 + step], ki[:, :, c0 : c0 + step]
        qc, kc, vc = _gather_rows(q, qi_c), _gather_rows(k, ki_c), _gather_rows(v, ki_c)
        logits = torch.einsum("bhcid,bhcjd->bhcij", qc, kc) * scale
        if causal:
            mask = ki_c[..., None, :] <= qi_c[..., :, None]
        else:
            mask = torch.ones_like(logits, dtype=torch.bool)
        probs, has_key = _masked_softmax(logits, mask)
        out_c = torch.einsum("bhcij,bhcjd->bhcid", probs, vc)
        flat_idx = qi_c.reshape(B, H, -1)
        out = out.scatter_add(2, flat_idx[..., None].expand(-1, -1, -1, out.shape[-1]),
                              out_c.reshape(B, H, -1, out.shape[-1]))
        count = count.scatter_add(2, flat_idx, has_key.reshape(B, H, -1).to(dtype))
    return out / count.clamp_min(1.0)[..., None]


@autocast_off
def nearest_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    assignment: NearestAssignment,
    *,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Query i attends key_order[key_start[i]:key_end[i]] (at most W keys of its cluster, j <= i)."""
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, H, T, D = q.shape
    W = min(window, T)
    offsets = torch.arange(W, device=q.device)
    outs = []
    step = max(1, _MAX_CHUNK_ELEMENTS // max(1, B * H * W * max(D, v.shape[-1])))
    for t0 in range(0, T, step):
        start = assignment.key_start[:, :, t0 : t0 + step]
        end = assignment.key_end[:, :, t0 : t0 + step]
        slot = end[..., None] - W + offsets  # (B, H, t, W), the last W slots before end
        valid = slot >= start[..., None]
        key_pos = assignment.key_order.gather(2, slot.clamp_min(0).reshape(B, H, -1)).view(slot.shape)
        kc, vc = _gather_rows(k, key_pos), _gather_rows(v, key_pos)
        logits = torch.einsum("bhtd,bhtwd->bhtw", q[:, :, t0 : t0 + step], kc) * scale
        probs, _ = _masked_softmax(logits, valid)
        outs.append(torch.einsum("bhtw,bhtwd->bhtd", probs, vc))
    return torch.cat(outs, dim=2)
