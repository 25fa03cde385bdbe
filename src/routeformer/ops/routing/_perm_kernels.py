"""Triton kernels of topk's per-token index: the entries sorted by position, without a sort.

Legend: BH batch-heads, T tokens, E entries per batch-head (C clusters of RUN = W entries: entry
e = c * RUN + r is rank r of cluster c), NW = ceil(C / 32) membership words per token.

Entries at the same position come from distinct clusters (a cluster's positions are distinct), so
ordering them by entry index is ordering them by cluster. A token's clusters, as a bit set M (BH, T, NW)
int32 set with atomic ORs (the result does not depend on their order), give both its entry count
(rowptr is their prefix sum) and each entry's rank among the token's entries: the bits below its
cluster. torch.sort (stable) computed the same permutation in 4 radix passes plus a search for rowptr.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _popcount(x):
    """Set bits of each int32 (SWAR on the unsigned bits: Triton's >> on int32 is arithmetic)."""
    u = x.to(tl.uint32, bitcast=True)
    u = u - ((u >> 1) & 0x55555555)
    u = (u & 0x33333333) + ((u >> 2) & 0x33333333)
    u = (u + (u >> 4)) & 0x0F0F0F0F
    return ((u * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _membership_kernel(POS, M, E, RUN, T, NW, BLOCK: tl.constexpr):
    """M[bh, POS[bh, e], c // 32] |= 1 << (c % 32) for the entries e of cluster c = e // RUN."""
    bh = tl.program_id(1).to(tl.int64)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < E
    p = tl.load(POS + bh * E + e, mask=m, other=0)
    c = e // RUN
    tl.atomic_or(M + (bh * T + p) * NW + c // 32, (1 << (c % 32)).to(tl.int32), mask=m, sem="relaxed")


@triton.jit
def _entry_counts_kernel(M, ROWPTR, E, T, NW, BLOCK_T: tl.constexpr, BLOCK_W: tl.constexpr):
    """ROWPTR[bh, t + 1] = the entries at position t (its set bits), and ROWPTR[bh, 0] = -E (0 for the
    first row): one prefix sum over the whole flattened (BH, T + 1) array then gives every row its CSR
    row pointers, since each row holds exactly E entries and the -E cancels the rows before it. (A
    prefix sum along the last dim of (8, 65537) took torch 87 us on an H200; the flat one is cub's.)"""
    bh = tl.program_id(1).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    w = tl.arange(0, BLOCK_W)
    words = tl.load(M + (bh * T + t[:, None]) * NW + w[None, :], mask=(t < T)[:, None] & (w < NW)[None, :],
                    other=0)
    tl.store(ROWPTR + bh * (T + 1) + 1 + t, tl.sum(_popcount(words), axis=1), mask=t < T)
    if tl.program_id(0) == 0:
        tl.store(ROWPTR + bh * (T + 1), tl.where(bh == 0, 0, -E).to(tl.int32))


@triton.jit
def _entry_perm_kernel(POS, M, ROWPTR, PERM, E, RUN, T, NW, BLOCK: tl.constexpr, BLOCK_W: tl.constexpr):
    """PERM[bh, ROWPTR[bh, p] + rank] = e, rank = the entries at p = POS[bh, e] of lower clusters."""
    bh = tl.program_id(1).to(tl.int64)
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < E
    p = tl.load(POS + bh * E + e, mask=m, other=0)
    c = e // RUN
    w = tl.arange(0, BLOCK_W)[None, :]
    words = tl.load(M + (bh * T + p[:, None]) * NW + w, mask=m[:, None] & (w < NW), other=0)
    cw = (c // 32)[:, None]
    below = tl.where(w < cw, -1, tl.where(w == cw, (1 << (c % 32))[:, None] - 1, 0))
    rank = tl.sum(_popcount(words & below), axis=1)
    start = tl.load(ROWPTR + bh * (T + 1) + p, mask=m, other=0)
    tl.store(PERM + bh * E + start + rank, e, mask=m)
