"""Triton kernels of topk's exact top-W selection per (batch-head, cluster) row of scores.

Legend: T positions per row, W window (positions kept per row), GROUP positions per group,
G = ceil(T / GROUP) groups, R rows (B * H * clusters of one scoring pass).

All of them order float32 scores through the same int32 keys (`_order_key`: -0.0 folded onto +0.0,
so the two tie as in the reference's stable sort) and break ties to the lower position.

- `_select_rows_kernel`: one row in registers, a bisection for the W-th largest key (33 steps over the
  whole row), one in-order scan for the result. The first stage of the two-stage group select
  (triton_ops.topk_index) and its second stage, gathering the W best groups' positions.
- `_threshold_select_kernel`: both stages in one program per row, on a few hundred keys instead of
  thousands (see its docstring). Rows it cannot hold (heavy ties) are flagged and finished by the two
  `_select_rows_kernel` launches, which skip every row that is not flagged.
"""
from __future__ import annotations

import triton
import triton.language as tl

_LOWEST = tl.constexpr(-2147483648)  # the padding key: below every real score's key (_order_key)


@triton.jit
def _order_key(s, valid):
    """int32 keys with the order of the float32 values s; lanes not valid get the lowest int32.

    -inf maps to -2**31 + 2**23 - 1, and the one NaN pattern that would tie with the padding is lifted
    by one (NaNs have no order)."""
    bits = (s + 0.0).to(tl.int32, bitcast=True)  # + 0.0: -0.0 becomes +0.0
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    lowest = tl.full(s.shape, _LOWEST, tl.int32)  # typed: a bare constant this size is int64
    return tl.where(valid, tl.maximum(key, lowest + 1), lowest)


@triton.jit
def _kth_key(key, W, lo, hi, SLACK: tl.constexpr = 0):
    """The W-th largest of the int32 keys, given int64 scalars lo <= it <= hi with at least W keys >= lo.

    A bisection that stops when the range is one key: about log2(hi - lo) steps (a row's keys from its
    minimum to its maximum span far less than 2**32 unless their signs differ). SLACK > 0: it stops once
    the range is at most SLACK + 1 keys and returns its lower end, a key at most SLACK below the W-th
    largest that still has at least W keys at or above it (log2(SLACK + 1) steps fewer)."""
    while lo + SLACK < hi:
        mid = lo + (hi - lo + 1) // 2
        ok = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0) >= W
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    return lo


@triton.jit
def _write_selected(key, idx, kth, W, out_ptr, valid):
    """Store the indices idx of the W selected keys (every key > kth, then the first keys == kth in
    lane order until W) compacted at out_ptr, in lane order."""
    need = W - tl.sum((key > kth).to(tl.int32), axis=0)
    eq = (key == kth).to(tl.int32)
    eq_rank = tl.cumsum(eq, axis=0) - eq
    sel = (key > kth) | ((eq > 0) & (eq_rank < need))
    seli = sel.to(tl.int32)
    slot = tl.cumsum(seli, axis=0) - seli
    tl.store(out_ptr + slot, idx, mask=sel & valid)


@triton.jit
def _select_row(ROWS, OUT, GROUPS, row, L, W, T, CP, C_OUT, C0,
                BLOCK_L: tl.constexpr, GATHER: tl.constexpr, GROUP: tl.constexpr):
    offs = tl.arange(0, BLOCK_L)
    m = offs < L
    if GATHER:
        g = tl.load(GROUPS + row * (L // GROUP) + offs // GROUP, mask=m, other=0)
        idx = g * GROUP + offs % GROUP
        m = m & (idx < T)
        s = tl.load(ROWS + row * T + idx, mask=m, other=float("-inf"))
    else:
        idx = offs
        s = tl.load(ROWS + row * L + offs, mask=m, other=float("-inf"))
    key = _order_key(s, m)
    # The padding (past L, or a gathered position past T) sorts below every real key: at least W keys
    # >= the minimum (BLOCK_L >= L >= W). The range spans at most 2**32 keys: 32 halvings pin it, one
    # more costs nothing.
    lo = tl.min(key, axis=0).to(tl.int64)
    hi = tl.max(key, axis=0).to(tl.int64)
    for _ in tl.static_range(33):
        mid = lo + (hi - lo + 1) // 2
        ok = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0) >= W
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    out_row = (row // CP) * C_OUT + C0 + row % CP
    _write_selected(key, idx, lo.to(tl.int32), W, OUT + out_row * W, offs < L)


@triton.jit
def _select_rows_kernel(
    ROWS, OUT, GROUPS, FLAG,
    L, W, T, CP, C_OUT, C0,
    BLOCK_L: tl.constexpr, GATHER: tl.constexpr, GROUP: tl.constexpr, FLAGGED: tl.constexpr,
):
    """The indices of the W largest of each row of L float32 values, ascending, ties to the lower
    index; one program holds one whole row in registers. Row r (of R = B*H*CP) is stored at row
    (r // CP) * C_OUT + C0 + r % CP of OUT (., W) int32, so a pass over CP of C_OUT clusters writes
    its slice of the whole output in place.

    GATHER False: ROWS (R, L) are the values, OUT gets their indices.
    GATHER True (topk_index's second stage): the row is gathered from ROWS (R, T) scores at the
    positions of the L // GROUP ascending groups in GROUPS (R, L // GROUP), GROUP positions each
    (past T: never picked), and OUT gets positions: one launch instead of a gather kernel, a
    candidate buffer and five torch ops mapping indices back to positions.
    FLAGGED: only the rows r with FLAG[r] != 0 (those _threshold_select_kernel left); the others
    return at once.

    A bisection finds the W-th largest key; one in-order scan then takes every larger key and the
    first `need` equal ones, already sorted by index. Keys stay int32 (the per-step compare over the
    row is the kernel's main work); only the scalar bounds are int64. (A search in quarters, 17 steps of
    three counts packed into one int64 sum, measured slower on an H200: 76 against 62 us per call,
    NOTES_routing.md session 12.)
    """
    row = tl.program_id(0).to(tl.int64)
    if FLAGGED:
        if tl.load(FLAG + row) != 0:
            _select_row(ROWS, OUT, GROUPS, row, L, W, T, CP, C_OUT, C0, BLOCK_L, GATHER, GROUP)
    else:
        _select_row(ROWS, OUT, GROUPS, row, L, W, T, CP, C_OUT, C0, BLOCK_L, GATHER, GROUP)


@triton.jit
def _threshold_select_kernel(
    S_T, GMAX, OUT, GIDX, EKEY, EPOS, FLAG,
    T, G, W, NB, CP, C_OUT, C0,
    SG: tl.constexpr, GROUP: tl.constexpr, BLOCK_NB: tl.constexpr, BLOCK_G: tl.constexpr,
    CHUNK_G: tl.constexpr, CAP: tl.constexpr, STAGES: tl.constexpr, PHASES: tl.constexpr = 4,
    L1_SLACK: tl.constexpr = 0,
):
    """Exact top-W positions of one row of S_T (R, T) float32 scores, ascending, ties to the lower
    position, from GMAX (R, G), the maximum of each GROUP positions; OUT as in _select_rows_kernel.

    1. L1 = the W-th largest of the NB = ceil(G / SG) maxima of SG consecutive groups (NB >= W). Those
       W maxima are W distinct scores >= L1, so every score below L1 has W larger ones: the top W are
       all >= L1, and they lie in the groups whose maximum is >= L1. Any lower key with W maxima at or
       above it bounds them as well: with L1_SLACK the search stops within L1_SLACK keys of the W-th
       maximum (_kth_key's SLACK), a few more candidates for fewer steps; the result is the same.
    2. Those groups' indices, in order, into GIDX (R, CAP).
    3. Their positions scoring >= L1, in position order, as keys into EKEY (R, CAP) and positions into
       EPOS (R, CAP). With NB about 2W this is ~1.4 W positions for scores without ties.
    4. The W-th largest of these keys (at least W are >= L1) and the selected positions, as in
       _select_rows_kernel: the same result, from two bisections over ~2W and ~1.4W keys where the
       two-stage select runs two over G and W * GROUP keys (4096 and 8192 at T = 64k, W = 512).
    More than CAP groups or positions in 2-3 (ties: repeated tokens score alike): FLAG[row] = 1 and
    nothing is written; the flagged rows are the two-stage select's (its kernels' FLAGGED). Else 0.
    PHASES < 4 (benchmarks/select_phases.py times each phase): stop after that phase, writing a value
    it computed into FLAG so that the compiler keeps the work.
    """
    row = tl.program_id(0).to(tl.int64)
    gbase = GMAX + row * G
    # 1. L1 over the maxima of SG groups each.
    offs_b = tl.arange(0, BLOCK_NB)
    bvalid = offs_b < NB
    gi = offs_b[:, None] * SG + tl.arange(0, SG)[None, :]
    bmax = tl.max(tl.load(gbase + gi, mask=gi < G, other=float("-inf")), axis=1)
    bkey = _order_key(bmax, bvalid)
    lo = tl.min(tl.where(bvalid, bkey, 2147483647), axis=0).to(tl.int64)
    l1 = _kth_key(bkey, W, lo, tl.max(bkey, axis=0).to(tl.int64), L1_SLACK).to(tl.int32)
    if PHASES == 1:
        tl.store(FLAG + row, l1)
        return
    # 2. The groups whose maximum reaches L1, compacted in order.
    n_g = tl.sum(tl.zeros([BLOCK_G], tl.int32), axis=0)
    for g0 in range(0, G, BLOCK_G):
        offs_g = g0 + tl.arange(0, BLOCK_G)
        gvalid = offs_g < G
        f = (_order_key(tl.load(gbase + offs_g, mask=gvalid, other=0.0), gvalid) >= l1).to(tl.int32)
        slot = n_g + tl.cumsum(f, axis=0) - f
        tl.store(GIDX + row * CAP + slot, offs_g, mask=(f > 0) & (slot < CAP))
        n_g += tl.sum(f, axis=0)
    tl.debug_barrier()  # GIDX is read back by other threads of this program
    if PHASES == 2:
        tl.store(FLAG + row, n_g)
        return
    # 3. Their positions scoring >= L1, compacted in position order.
    n_e = tl.sum(tl.zeros([BLOCK_G], tl.int32), axis=0)
    n_gc = tl.minimum(n_g, CAP)
    for c0 in tl.range(0, n_gc, CHUNK_G, num_stages=STAGES):  # STAGES > 1: the next chunks' loads ahead
        offs_c = c0 + tl.arange(0, CHUNK_G)
        g = tl.load(GIDX + row * CAP + offs_c, mask=offs_c < n_gc, other=0)
        pos = g[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
        pvalid = (offs_c < n_gc)[:, None] & (pos < T)
        key = _order_key(tl.load(S_T + row * T + pos, mask=pvalid, other=0.0), pvalid)
        f = (key >= l1).to(tl.int32)
        # Slots: a scan over the chunk's groups of their counts, then one along each group (a scan over
        # all CHUNK_G * GROUP lanes took ~2/3 of the phase's instructions).
        cnt = tl.sum(f, axis=1)
        slot = (n_e + tl.cumsum(cnt, axis=0) - cnt)[:, None] + tl.cumsum(f, axis=1) - f
        keep = (f > 0) & (slot < CAP)
        tl.store(EKEY + row * CAP + slot, key, mask=keep)
        tl.store(EPOS + row * CAP + slot, pos, mask=keep)
        n_e += tl.sum(cnt, axis=0)
    tl.debug_barrier()  # EKEY / EPOS likewise
    if PHASES == 3:
        tl.store(FLAG + row, n_e)
        return
    # 4. The W-th largest candidate, and the selected positions.
    fits = (n_g <= CAP) & (n_e <= CAP)
    if fits:
        offs_e = tl.arange(0, CAP)
        evalid = offs_e < n_e
        ekey = tl.load(EKEY + row * CAP + offs_e, mask=evalid, other=_LOWEST)
        kth = _kth_key(ekey, W, l1.to(tl.int64), tl.max(ekey, axis=0).to(tl.int64)).to(tl.int32)
        epos = tl.load(EPOS + row * CAP + offs_e, mask=evalid & (ekey >= kth), other=0)
        _write_selected(ekey, epos, kth, W, OUT + ((row // CP) * C_OUT + C0 + row % CP) * W, evalid)
    tl.store(FLAG + row, 1 - fits.to(tl.int32))
