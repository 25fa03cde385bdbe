"""Blocked local attention in plain PyTorch: the specification for the Triton kernel.

Legend: B batch, H heads, T tokens, D head dim, N blocks, L block length, F flange, S key span.

Query i in block b = i // L attends keys j in [b*L - F, (b+1)*L) (non-causal: up to (b+1)*L + F),
clipped to [0, T), and only j <= i if causal. T needs no padding: the last block is simply short.
Memory O(T * (L + 2F)): keys are gathered per block, no T x T matrix.

The optional relative-position term follows Shaw et al. (2018): with tables rel_k, rel_v of shape
(2M + 1, D) and r(i, j) = clip(j - i, -M, M) + M,
    logit_ij = scale * q_i . (k_j + rel_k[r(i, j)]),   out_i = sum_j p_ij (v_j + rel_v[r(i, j)]).
"""
from __future__ import annotations

import torch

from .._checks import autocast_off, compute_dtype
from ..routing.reference import _gather_rows, _masked_softmax


def block_key_positions(T: int, block: int, flange: int, causal: bool, device) -> torch.Tensor:
    """(N, S) key positions each block may see, before clipping to [0, T)."""
    n_blocks = -(-T // block)
    span = flange + block + (0 if causal else flange)
    first = torch.arange(n_blocks, device=device)[:, None] * block - flange
    return first + torch.arange(span, device=device)


@autocast_off
def local_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block: int,
    flange: int,
    causal: bool,
    scale: float,
    rel_k: torch.Tensor | None = None,
    rel_v: torch.Tensor | None = None,
) -> torch.Tensor:
    dtype = compute_dtype(q.dtype)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    B, H, T, D = q.shape
    n_blocks = -(-T // block)
    padded = n_blocks * block
    key_pos = block_key_positions(T, block, flange, causal, q.device)  # (N, S)
    query_pos = torch.arange(padded, device=q.device).view(n_blocks, block)  # (N, L)
    mask = (key_pos >= 0) & (key_pos < T)
    mask = mask[:, None, :] & (query_pos < T)[:, :, None]  # (N, L, S)
    if causal:
        mask = mask & (key_pos[:, None, :] <= query_pos[:, :, None])

    qb = torch.nn.functional.pad(q, (0, 0, 0, padded - T)).view(B, H, n_blocks, block, D)
    index = key_pos.clamp(0, T - 1).expand(B, H, -1, -1)
    kb, vb = _gather_rows(k, index), _gather_rows(v, index)  # (B, H, N, S, D)
    logits = torch.einsum("bhnid,bhnjd->bhnij", qb, kb)
    if rel_k is not None:
        max_dist = (rel_k.shape[0] - 1) // 2
        rel = (key_pos[:, None, :] - query_pos[:, :, None]).clamp(-max_dist, max_dist) + max_dist
        logits = logits + torch.einsum("bhnid,nijd->bhnij", qb, rel_k.to(dtype)[rel])
    probs, _ = _masked_softmax(logits * scale, mask)
    out = torch.einsum("bhnij,bhnjd->bhnid", probs, vb)
    if rel_v is not None:
        out = out + torch.einsum("bhnij,nijd->bhnid", probs, rel_v.to(dtype)[rel])
    return out.reshape(B, H, padded, -1)[:, :, :T]
