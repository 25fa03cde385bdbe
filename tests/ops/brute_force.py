"""Brute-force dense attention with explicit T x T masks, written independently of the ops.

Only tests may build T x T matrices. Membership is computed with Python sorting and an explicit
LayerNorm formula, not with the helpers the ops use, so a shared bug cannot hide.
"""
from __future__ import annotations

import torch


def layer_norm_plain(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    x = x.double()
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps)


def scores(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """(B, H, T, C) float64 scores."""
    return torch.einsum("bhtd,hcd->bhtc", layer_norm_plain(x.detach()), centroids.double())


def masked_dense(q, k, v, mask, scale):
    """mask (B, H, T, T) bool; rows without keys -> 0. Returns (out (B,H,T,Dv), has_key (B,H,T))."""
    logits = torch.einsum("bhid,bhjd->bhij", q, k) * scale
    logits = logits.masked_fill(~mask, float("-inf"))
    has_key = mask.any(-1)
    probs = torch.softmax(logits.masked_fill(~has_key[..., None], 0.0), dim=-1)
    probs = torch.where(has_key[..., None], probs, torch.zeros_like(probs))
    return probs @ v, has_key


def topk_members(s: torch.Tensor, window: int) -> torch.Tensor:
    """s (T, C) float64 scores -> (C, T) bool: the window best positions per cluster, ties to lower position."""
    T, C = s.shape
    member = torch.zeros(C, T, dtype=torch.bool)
    for c in range(C):
        ranked = sorted(range(T), key=lambda t: (-float(s[t, c]), t))
        member[c, ranked[: min(window, T)]] = True
    return member


def routing_topk_dense(q, k, v, centroids, window, causal, scale):
    B, H, T, _ = q.shape
    C = centroids.shape[1]
    sq, sk = scores(q, centroids), scores(k, centroids)
    out = torch.zeros(B, H, T, v.shape[-1], dtype=q.dtype)
    causal_mask = torch.ones(T, T, dtype=torch.bool).tril() if causal else torch.ones(T, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            mq, mk = topk_members(sq[b, h], window), topk_members(sk[b, h], window)
            total = torch.zeros(T, v.shape[-1], dtype=q.dtype)
            count = torch.zeros(T, dtype=q.dtype)
            for c in range(C):
                mask = mq[c][:, None] & mk[c][None, :] & causal_mask
                o, has = masked_dense(q[b, h][None, None], k[b, h][None, None], v[b, h][None, None],
                                      mask[None, None], scale)
                total = total + o[0, 0] * has[0, 0, :, None]
                count = count + has[0, 0].to(q.dtype)
            out[b, h] = total / count.clamp_min(1)[:, None]
    return out


def routing_nearest_mask(q, k, centroids, window):
    """(B, H, T, T) mask: same argmax cluster, j <= i, and j among the window most recent such keys."""
    cq, ck = scores(q, centroids).argmax(-1), scores(k, centroids).argmax(-1)
    T = q.shape[2]
    same = cq[..., :, None] == ck[..., None, :]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    candidate = same & causal
    # Keys of the query's cluster at positions in (j, i]: fewer than `window` means j is recent enough.
    newer = candidate.flip(-1).cumsum(-1).flip(-1) - candidate.long()
    return candidate & (newer < window)


def local_mask(T, block, flange, causal):
    i = torch.arange(T)[:, None]
    j = torch.arange(T)[None, :]
    b = i // block
    lo = b * block - flange
    hi = (b + 1) * block + (0 if causal else flange)
    mask = (j >= lo) & (j < hi)
    if causal:
        mask &= j <= i
    return mask


def local_dense(q, k, v, block, flange, causal, scale, rel_k=None, rel_v=None):
    T = q.shape[2]
    mask = local_mask(T, block, flange, causal)
    logits = torch.einsum("bhid,bhjd->bhij", q, k)
    if rel_k is not None:
        M = (rel_k.shape[0] - 1) // 2
        rel = (torch.arange(T)[None, :] - torch.arange(T)[:, None]).clamp(-M, M) + M
        logits = logits + torch.einsum("bhid,ijd->bhij", q, rel_k[rel])
    logits = (logits * scale).masked_fill(~mask, float("-inf"))
    probs = torch.softmax(logits, -1)
    out = probs @ v
    if rel_v is not None:
        out = out + torch.einsum("bhij,ijd->bhid", probs, rel_v[rel])
    return out
