"""Triton kernels for routing attention: gathered flash attention over index lists.

Legend: B batch, H heads, T tokens, D head dim (DV for values), C clusters, W window,
E query entries, S key slots (per batch-head; topk: E = S = C*W, nearest: E = S = T).

Both assignment modes reduce to one shape of problem. Query entry e sits at position QPOS[e] and
attends the key slots [LO[e], HI[e]); slot s holds the key at position KPOS[s]. LO and HI are
non-decreasing in e, so a tile of consecutive entries needs one band of slots, and the entries that
attend a tile of slots form one contiguous range (QLO/QHI per slot tile). Causality is folded into HI
by the launcher (topk: keys of a cluster are sorted by position, so the allowed keys are a prefix),
so the kernels never compare positions. Rows are read in place through the index lists: no gathered
copies of q, k or v. With SPLIT, the tiles that every row sees whole (between the tile's largest LO
and smallest HI) run without the per-element mask; only the tiles at the band's edges are masked.

DIRECT: every query and key sits in exactly one entry/slot (nearest), so outputs and gradients are
written at their token positions. Otherwise (topk) they go to per-entry buffers that
`_combine_kernel` sums per token.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    # "upcast": the CPU interpreter of triton 3.9 mis-multiplies bf16 tiles; the operands hold bf16
    # values either way, so an fp32 product keeps the rounding the GPU path sees.
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _rows(pos, ROW64: tl.constexpr):
    """Gathered row indices as the offsets' integer type: int64 only where the launcher says that a
    tensor's rows may pass 2**31 elements. int32 offsets take about a third fewer instructions per
    gathered row (sm_90 SASS of the loops: 508 -> 476 per forward tile)."""
    if ROW64:  # one return: Triton's JIT rejects returns of two types, even under a constexpr branch
        pos = pos.to(tl.int64)
    return pos


@triton.jit
def _in_band(offs, lo, hi):
    """lo <= offs < hi elementwise (broadcast shapes), as one unsigned compare: (offs - lo) <u (hi - lo).
    Two signed compares and two selects per element cost more than the tile's exponentials in the
    SASS of the masked loops; rows with no slot (hi <= lo) get width 0."""
    width = tl.maximum(hi - lo, 0).to(tl.uint32, bitcast=True)
    return (offs - lo).to(tl.uint32, bitcast=True) < width


@triton.jit
def _clamped_rows(index_ptr, offs, end, ROW64: tl.constexpr):
    """index_ptr[min(offs, end - 1)] (at least index 0): the positions of a tile, read one loop step
    ahead (PREFETCH). The step after the last reads in-range indices that nothing uses, so the load
    needs no predicate; the clamp at 0 covers an empty loop's read before its first step."""
    return _rows(tl.load(index_ptr + tl.maximum(tl.minimum(offs, end - 1), 0)), ROW64)


@triton.jit
def _first_rows(index_ptr, start, end, BLOCK: tl.constexpr, ROW64: tl.constexpr, PREFETCH: tl.constexpr):
    """The positions of a prefetching loop's first tile [start, + BLOCK) (or, without PREFETCH, a
    placeholder the loop passes on unused)."""
    offs = start + tl.arange(0, BLOCK)
    if PREFETCH:
        offs = _clamped_rows(index_ptr, offs, end, ROW64)
    return offs


@triton.jit
def _gather_slots(kbase, vbase, kpos_ptr, offs_s, offs_d, offs_dv, band_hi, skt, svt, D, DV, kpos_pre,
                  CLAMP: tl.constexpr, ROW64: tl.constexpr, PREFETCHED: tl.constexpr):
    """The k and v rows of slots offs_s. CLAMP: a tile that may pass the band's end reads its last
    slot in their place rather than masking the loads: every row masks slots past band_hi (hi <=
    band_hi), so their values never count, and unpredicated gathers keep the loop short.
    PREFETCHED: kpos_pre holds the slots' key positions already (read by the step before, see
    _clamped_rows), so the row gathers wait for no index load."""
    if PREFETCHED:
        kpos = kpos_pre
    else:
        if CLAMP:
            offs_s = tl.minimum(offs_s, band_hi - 1)
        kpos = _rows(tl.load(kpos_ptr + offs_s), ROW64)
    k = tl.load(kbase + kpos[:, None] * skt + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
    v = tl.load(vbase + kpos[:, None] * svt + offs_dv[None, :], mask=offs_dv[None, :] < DV, other=0.0)
    return k, v


@triton.jit
def _fwd_step(q, kbase, vbase, kpos_ptr, s0, band_hi, lo, hi, m_i, l_i, acc,
              skt, svt, D, DV, sm_scale_log2, edge,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
              MASKED: tl.constexpr, ROW64: tl.constexpr, kpos_pre=0, PREFETCHED: tl.constexpr = False):
    """One slot tile of the online softmax: returns the updated (m_i, l_i, acc).

    MASKED 0: the caller knows every row may see every slot of the tile (and that the tile ends
    inside the band), so nothing is masked. 1: the elements are (and slots past the band clamped,
    see _gather_slots). 2: slots are clamped, and the elements masked only where the run-time flag
    `edge` says a row does not see the whole tile (a branch around the select, so one loop serves
    both kinds of tile and keeps its pipelining).
    """
    offs_s = s0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k, v = _gather_slots(kbase, vbase, kpos_ptr, offs_s, offs_d, offs_dv, band_hi, skt, svt, D, DV, kpos_pre,
                         MASKED != 0, ROW64, PREFETCHED)
    qk = _dot(q, tl.trans(k), PRECISION)
    # The scale stays out of the select, so the exponent's argument is one FMA either way.
    if MASKED == 1:
        qk = tl.where(_in_band(offs_s[None, :], lo[:, None], hi[:, None]), qk, float("-inf"))
    elif MASKED == 2:  # decided per tile at run time (edge: a tile some row does not see whole)
        if edge:
            qk = tl.where(_in_band(offs_s[None, :], lo[:, None], hi[:, None]), qk, float("-inf"))
    # The running maximum and the rescale of acc on every tile stay: on the H200 neither skipping the
    # rescale unless the maximum moves by 2**8 (session 20: one cross-warp max per tile, +11%) nor a
    # fixed reference point, each row's own logit under shared QK, with flagged tiles run again
    # (session 21-22: 151 vs 152 us topk, 196 vs 178 nearest at 64k) measured faster.
    # benchmarks/NOTES_routing.md has the figures; commits c9d91f4 and 9ab5a25 the code.
    m_new = tl.maximum(m_i, tl.max(qk, axis=1) * sm_scale_log2)
    p = tl.exp2(qk * sm_scale_log2 - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, PRECISION)
    return m_new, l_i, acc


@triton.jit
def _dq_step(q, do, kbase, vbase, kpos_ptr, s0, band_hi, lo, hi, lse, delta, dq,
             skt, svt, D, DV, sm_scale_log2, edge,
             BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
             MASKED: tl.constexpr, ROW64: tl.constexpr, kpos_pre=0, PREFETCHED: tl.constexpr = False):
    """One slot tile of dq (unscaled): returns dq + ds @ k. MASKED and edge as in _fwd_step."""
    offs_s = s0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k, v = _gather_slots(kbase, vbase, kpos_ptr, offs_s, offs_d, offs_dv, band_hi, skt, svt, D, DV, kpos_pre,
                         MASKED != 0, ROW64, PREFETCHED)
    qk = _dot(q, tl.trans(k), PRECISION)
    p = tl.exp2(qk * sm_scale_log2 - lse[:, None])
    if MASKED == 1:
        p = tl.where(_in_band(offs_s[None, :], lo[:, None], hi[:, None]), p, 0.0)
    elif MASKED == 2:
        if edge:
            p = tl.where(_in_band(offs_s[None, :], lo[:, None], hi[:, None]), p, 0.0)
    dp = _dot(do, tl.trans(v), PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + _dot(ds.to(k.dtype), k, PRECISION)


@triton.jit
def _entry_band(LO, HI, ibase, lo, hi, emask, first, end, S, SCALAR: tl.constexpr):
    """(band_lo, band_hi, lo_max, hi_min) of the entry tile [first, end) (rows lo, hi under emask):
    the band of slots its rows see, [min LO, max HI), and [max LO, min HI), what every row sees (see
    _full_slot_tiles). An empty tile gets the band [S, 0), so its loops run no step.

    SCALAR: LO and HI are non-decreasing in the entry, so the four are LO[first], HI[end - 1],
    LO[end - 1] and HI[first]: four scalar loads in place of four block-wide reductions, each a
    shared-memory round trip between barriers (sm_90 SASS of topk's forward, Triton 3.9: 7 -> 0 barriers
    before its loop, 24 -> 6 in all, spill stores 20 -> 4; dq's 55 -> 34).
    """
    if SCALAR:
        some = end > first
        last = tl.maximum(end - 1, first)
        band_lo = tl.load(LO + ibase + first, mask=some, other=S)
        band_hi = tl.load(HI + ibase + last, mask=some, other=0)
        lo_max = tl.load(LO + ibase + last, mask=some, other=S)
        hi_min = tl.load(HI + ibase + first, mask=some, other=0)
    else:
        band_lo = tl.min(lo, axis=0)
        band_hi = tl.max(hi, axis=0)
        lo_max = tl.max(tl.where(emask, lo, band_lo), axis=0)
        hi_min = tl.min(tl.where(emask, hi, band_hi), axis=0)
    return band_lo, band_hi, lo_max, hi_min


@triton.jit
def _full_slot_tiles(lo_max, hi_min, band_lo, band_hi, BLOCK_N: tl.constexpr):
    """[full_lo, full_hi): the slot tiles (on the band_lo + i * BLOCK_N grid) that every valid row of
    the tile sees whole, so they need no mask. LO and HI are non-decreasing in the entry, so that is
    [max LO, min HI) of the valid rows (lo_max, hi_min from _entry_band), and the tiles before and
    after it are the masked ones."""
    band_end = band_lo + tl.cdiv(tl.maximum(band_hi - band_lo, 0), BLOCK_N) * BLOCK_N
    full_lo = tl.minimum(band_lo + tl.cdiv(tl.maximum(lo_max - band_lo, 0), BLOCK_N) * BLOCK_N, band_end)
    full_hi = tl.maximum(band_lo + (tl.maximum(hi_min - band_lo, 0) // BLOCK_N) * BLOCK_N, full_lo)
    return full_lo, full_hi


@triton.jit
def _fwd_masked_tiles(q, kbase, vbase, kpos_ptr, start, end, band_hi, lo, hi, m_i, l_i, acc,
                      skt, svt, D, DV, sm_scale_log2,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                      SKIP_EMPTY: tl.constexpr, ROW64: tl.constexpr):
    """The masked slot tiles [start, end); SKIP_EMPTY: tiles no row sees are skipped."""
    for s0 in range(start, end, BLOCK_N):
        if SKIP_EMPTY:
            if tl.max(((lo < s0 + BLOCK_N) & (hi > s0)).to(tl.int32), axis=0) > 0:
                m_i, l_i, acc = _fwd_step(q, kbase, vbase, kpos_ptr, s0, band_hi, lo, hi, m_i, l_i, acc,
                                          skt, svt, D, DV, sm_scale_log2, True,
                                          BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, 1, ROW64)
        else:
            m_i, l_i, acc = _fwd_step(q, kbase, vbase, kpos_ptr, s0, band_hi, lo, hi, m_i, l_i, acc,
                                      skt, svt, D, DV, sm_scale_log2, True,
                                      BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, 1, ROW64)
    return m_i, l_i, acc


@triton.jit
def _dq_masked_tiles(q, do, kbase, vbase, kpos_ptr, start, end, band_hi, lo, hi, lse, delta, dq,
                     skt, svt, D, DV, sm_scale_log2,
                     BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
                     SKIP_EMPTY: tl.constexpr, ROW64: tl.constexpr):
    for s0 in range(start, end, BLOCK_N):
        if SKIP_EMPTY:
            if tl.max(((lo < s0 + BLOCK_N) & (hi > s0)).to(tl.int32), axis=0) > 0:
                dq = _dq_step(q, do, kbase, vbase, kpos_ptr, s0, band_hi, lo, hi, lse, delta, dq,
                              skt, svt, D, DV, sm_scale_log2, True, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, 1, ROW64)
        else:
            dq = _dq_step(q, do, kbase, vbase, kpos_ptr, s0, band_hi, lo, hi, lse, delta, dq,
                          skt, svt, D, DV, sm_scale_log2, True, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, 1, ROW64)
    return dq


@triton.jit
def _entry_tile(TILES, bh, pid, NTILES, E, BLOCK: tl.constexpr, TILED: tl.constexpr):
    """(offsets, mask, first, end) of tile pid's BLOCK entries (or slots): [first, end) = [pid * BLOCK,
    + BLOCK) below E, or with TILED TILES[bh, pid] (a tile of one cluster, at most BLOCK entries;
    first = end: an empty tile, whose program loads nothing and stores nothing)."""
    if TILED:
        at = (bh.to(tl.int64) * NTILES + pid) * 2
        first = tl.load(TILES + at)
        end = tl.load(TILES + at + 1)
    else:
        first = pid * BLOCK
        end = tl.minimum(first + BLOCK, E)
    offs = first + tl.arange(0, BLOCK)
    return offs, offs < end, first, end


@triton.jit
def _fwd_tile(
    pid_m,
    Q, K, V, QPOS, LO, HI, KPOS, TILES, O, LSE,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    H, E, S, D, DV, NTILES, sm_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DIRECT: tl.constexpr, SKIP_EMPTY: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    ROW64: tl.constexpr, EVEN_D: tl.constexpr, TILED: tl.constexpr, PREFETCH: tl.constexpr = False,
    SCALAR_BAND: tl.constexpr = True,
):
    """One entry tile of _fwd_kernel (pid_m: which)."""
    if EVEN_D:  # head dims equal to their tiles: the column masks fold away (fewer live predicates)
        D = BLOCK_D
        DV = BLOCK_DV
    bh = tl.program_id(1)
    # int64: b * stride overflows int32 once a tensor passes 2**31 elements.
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_e, emask, first, end = _entry_tile(TILES, bh, pid_m, NTILES, E, BLOCK_M, TILED)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    ibase = bh.to(tl.int64) * E
    qpos = tl.load(QPOS + ibase + offs_e, mask=emask, other=0).to(tl.int64)
    lo = tl.load(LO + ibase + offs_e, mask=emask, other=S)
    hi = tl.load(HI + ibase + offs_e, mask=emask, other=0)
    band_lo, band_hi, lo_max, hi_min = _entry_band(LO, HI, ibase, lo, hi, emask, first, end, S, SCALAR_BAND)

    q = tl.load(Q + b * sqb + h * sqh + qpos[:, None] * sqt + offs_d[None, :],
                mask=emask[:, None] & (offs_d[None, :] < D), other=0.0)
    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    sbase = bh.to(tl.int64) * S
    # A finite start keeps rows with no key NaN-free: exp2(-inf - m_i) = 0 rather than NaN.
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    # One loop, each tile deciding at run time whether it needs the mask; not with SKIP_EMPTY, whose
    # per-tile test around the whole step is what the masked-tile loops below are for.
    if SPLIT == 2 and not SKIP_EMPTY:
        full_lo, full_hi = _full_slot_tiles(lo_max, hi_min, band_lo, band_hi, BLOCK_N)
        # PREFETCH: each step reads the next tile's key positions, so that its row gathers wait on
        # one memory round trip instead of two (the positions, then the rows).
        kp = _first_rows(KPOS + sbase, band_lo, band_hi, BLOCK_N, ROW64, PREFETCH)
        for s0 in range(band_lo, band_hi, BLOCK_N):
            kcur = kp
            if PREFETCH:
                kp = _clamped_rows(KPOS + sbase, s0 + BLOCK_N + tl.arange(0, BLOCK_N), band_hi, ROW64)
            m_i, l_i, acc = _fwd_step(q, kbase, vbase, KPOS + sbase, s0, band_hi, lo, hi, m_i, l_i, acc,
                                      skt, svt, D, DV, sm_scale_log2, (s0 < full_lo) | (s0 >= full_hi),
                                      BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, 2, ROW64, kcur, PREFETCH)
    else:
        # masked tiles before and after the ones every row sees whole (with SKIP_EMPTY, TILE_BRANCH
        # falls back to all masked tiles, as before it existed)
        if SPLIT == 1:
            full_lo, full_hi = _full_slot_tiles(lo_max, hi_min, band_lo, band_hi, BLOCK_N)
        else:
            full_lo, full_hi = band_lo, band_lo
        m_i, l_i, acc = _fwd_masked_tiles(q, kbase, vbase, KPOS + sbase, band_lo, full_lo, band_hi, lo, hi,
                                          m_i, l_i, acc, skt, svt, D, DV, sm_scale_log2,
                                          BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, SKIP_EMPTY, ROW64)
        for s0 in range(full_lo, full_hi, BLOCK_N):
            m_i, l_i, acc = _fwd_step(q, kbase, vbase, KPOS + sbase, s0, band_hi, lo, hi, m_i, l_i, acc,
                                      skt, svt, D, DV, sm_scale_log2, False,
                                      BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, 0, ROW64)
        m_i, l_i, acc = _fwd_masked_tiles(q, kbase, vbase, KPOS + sbase, full_hi, band_hi, band_hi, lo, hi,
                                          m_i, l_i, acc, skt, svt, D, DV, sm_scale_log2,
                                          BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, SKIP_EMPTY, ROW64)
    has_key = l_i > 0
    o = acc / tl.where(has_key, l_i, 1.0)[:, None]
    # +inf marks "no key": backward recomputes p = exp2(s - lse) = 0 for such rows.
    lse = tl.where(has_key, m_i + tl.log2(tl.where(has_key, l_i, 1.0)), float("inf"))
    tl.store(LSE + ibase + offs_e, lse, mask=emask)
    if DIRECT:
        orow = qpos
    else:
        orow = offs_e.to(tl.int64)
    tl.store(O + b * sob + h * soh + orow[:, None] * sot + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=emask[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _fwd_kernel(
    Q, K, V, QPOS, LO, HI, KPOS, TILES, O, LSE,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    H, E, S, D, DV, NTILES, sm_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DIRECT: tl.constexpr, SKIP_EMPTY: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    ROW64: tl.constexpr, EVEN_D: tl.constexpr, TILED: tl.constexpr, PREFETCH: tl.constexpr = False,
    SCALAR_BAND: tl.constexpr = True, PAIRED: tl.constexpr = False,
):
    """Attention of entry tiles: tile t is entries [t * BLOCK_M, + BLOCK_M), or with TILED the tile's
    [first, end) from TILES (R, NTILES, 2) (see _write_cluster_tiles). Program p runs tile p, or with
    PAIRED tile p, then tile NTILES - 1 - p (if it is another): a grid of cdiv(NTILES, 2).

    Why PAIRED: under the causal mask a cluster's first tiles see few slots and its last ones many,
    and tile p's partner is as heavy as p is light, so every program does about the same work."""
    # One call site per branch: the unpaired kernel compiles exactly as before PAIRED existed.
    pid0 = tl.program_id(0)
    if PAIRED:
        partner = NTILES - 1 - pid0
        for j in range(0, 1 + (partner > pid0).to(tl.int32)):
            _fwd_tile(pid0 + j * (partner - pid0),
                      Q, K, V, QPOS, LO, HI, KPOS, TILES, O, LSE,
                      sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                      H, E, S, D, DV, NTILES, sm_scale_log2,
                      BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, DIRECT, SKIP_EMPTY, PRECISION, SPLIT,
                      ROW64, EVEN_D, TILED, PREFETCH, SCALAR_BAND)
    else:
        _fwd_tile(pid0,
                  Q, K, V, QPOS, LO, HI, KPOS, TILES, O, LSE,
                  sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
                  H, E, S, D, DV, NTILES, sm_scale_log2,
                  BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, DIRECT, SKIP_EMPTY, PRECISION, SPLIT,
                  ROW64, EVEN_D, TILED, PREFETCH, SCALAR_BAND)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, O, LSE, INV_N, QPOS, LO, HI, KPOS, TILES, DELTA, DQ, LSE_W,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sob, soh, sot, sdqb, sdqh, sdqt,
    H, T, E, S, D, DV, NTILES, sm_scale, sm_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DIRECT: tl.constexpr, SKIP_EMPTY: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    ROW64: tl.constexpr, EVEN_D: tl.constexpr, TILED: tl.constexpr, PREFETCH: tl.constexpr = False,
    SCALAR_BAND: tl.constexpr = True, MEAN_IN_LSE: tl.constexpr = False,
):
    """dq per query entry (entry tiles as in _fwd_kernel); also stores DELTA = rowsum(dO * O_entry) for
    the dk/dv kernel.

    With topk the entry's output is scaled by 1/n (scatter-mean); the kernels keep dO unscaled and
    multiply ds by INV_N instead, which saves a rounding of dO. MEAN_IN_LSE (topk): also store
    LSE_W = LSE + log2(n) per entry, with which the dk/dv kernel's exp2(s - LSE_W) is p / n already.
    """
    if EVEN_D:  # head dims equal to their tiles: the column masks fold away (fewer live predicates)
        D = BLOCK_D
        DV = BLOCK_DV
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: b * stride overflows int32 once a tensor passes 2**31 elements.
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_e, emask, first, end = _entry_tile(TILES, bh, pid_m, NTILES, E, BLOCK_M, TILED)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    ibase = bh.to(tl.int64) * E
    qpos = tl.load(QPOS + ibase + offs_e, mask=emask, other=0).to(tl.int64)
    lo = tl.load(LO + ibase + offs_e, mask=emask, other=S)
    hi = tl.load(HI + ibase + offs_e, mask=emask, other=0)
    band_lo, band_hi, lo_max, hi_min = _entry_band(LO, HI, ibase, lo, hi, emask, first, end, S, SCALAR_BAND)
    dmask = emask[:, None] & (offs_d[None, :] < D)
    dvmask = emask[:, None] & (offs_dv[None, :] < DV)

    q = tl.load(Q + b * sqb + h * sqh + qpos[:, None] * sqt + offs_d[None, :], mask=dmask, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + qpos[:, None] * sdot + offs_dv[None, :], mask=dvmask, other=0.0)
    if DIRECT:
        orow = qpos
        inv_n = tl.full([BLOCK_M], 1.0, dtype=tl.float32)
    else:
        orow = offs_e.to(tl.int64)
        inv_n = tl.load(INV_N + bh.to(tl.int64) * T + qpos, mask=emask, other=0.0)
    o = tl.load(O + b * sob + h * soh + orow[:, None] * sot + offs_dv[None, :], mask=dvmask, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + ibase + offs_e, delta, mask=emask)
    lse = tl.load(LSE + ibase + offs_e, mask=emask, other=float("inf"))
    if MEAN_IN_LSE:  # inv_n is 1/n with n >= 1 (_combine_kernel); +inf (no key) stays +inf
        tl.store(LSE_W + ibase + offs_e, lse - tl.log2(inv_n), mask=emask)

    kbase = K + b * skb + h * skh
    vbase = V + b * svb + h * svh
    sbase = bh.to(tl.int64) * S
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if SPLIT == 2 and not SKIP_EMPTY:  # one loop, the mask decided per tile (as in _fwd_kernel)
        full_lo, full_hi = _full_slot_tiles(lo_max, hi_min, band_lo, band_hi, BLOCK_N)
        kp = _first_rows(KPOS + sbase, band_lo, band_hi, BLOCK_N, ROW64, PREFETCH)
        for s0 in range(band_lo, band_hi, BLOCK_N):
            kcur = kp
            if PREFETCH:  # the next tile's key positions (as in _fwd_kernel)
                kp = _clamped_rows(KPOS + sbase, s0 + BLOCK_N + tl.arange(0, BLOCK_N), band_hi, ROW64)
            dq = _dq_step(q, do, kbase, vbase, KPOS + sbase, s0, band_hi, lo, hi, lse, delta, dq,
                          skt, svt, D, DV, sm_scale_log2, (s0 < full_lo) | (s0 >= full_hi),
                          BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, 2, ROW64, kcur, PREFETCH)
    else:
        if SPLIT == 1:  # (TILE_BRANCH with SKIP_EMPTY: all masked, as in _fwd_kernel)
            full_lo, full_hi = _full_slot_tiles(lo_max, hi_min, band_lo, band_hi, BLOCK_N)
        else:
            full_lo, full_hi = band_lo, band_lo
        dq = _dq_masked_tiles(q, do, kbase, vbase, KPOS + sbase, band_lo, full_lo, band_hi, lo, hi, lse, delta,
                              dq, skt, svt, D, DV, sm_scale_log2,
                              BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, SKIP_EMPTY, ROW64)
        for s0 in range(full_lo, full_hi, BLOCK_N):
            dq = _dq_step(q, do, kbase, vbase, KPOS + sbase, s0, band_hi, lo, hi, lse, delta, dq,
                          skt, svt, D, DV, sm_scale_log2, False, BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, 0, ROW64)
        dq = _dq_masked_tiles(q, do, kbase, vbase, KPOS + sbase, full_hi, band_hi, band_hi, lo, hi, lse, delta,
                              dq, skt, svt, D, DV, sm_scale_log2,
                              BLOCK_N, BLOCK_D, BLOCK_DV, PRECISION, SKIP_EMPTY, ROW64)
    dq = dq * (sm_scale * inv_n)[:, None]
    if DIRECT:
        drow = qpos
    else:
        drow = offs_e.to(tl.int64)
    tl.store(DQ + b * sdqb + h * sdqh + drow[:, None] * sdqt + offs_d[None, :], dq.to(DQ.dtype.element_ty),
             mask=dmask)


@triton.jit
def _dkdv_step(e0, end, k, v, dk, dv, offs_s, qbase, dobase, QPOS, LO, HI, LSE, DELTA, INV_N, ibase, nbase,
               sqt, sdot, S, D, DV, sm_scale_log2, edge,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               WEIGHTED: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
               ROW64: tl.constexpr, qpos_pre=0, PREFETCHED: tl.constexpr = False):
    """One entry tile [e0, e0 + BLOCK_M) of the dk/dv loop: returns the updated (dk, dv).

    MASKED 0: the caller knows every entry of the tile (all < end) sees every valid slot of the
    key tile, so neither entries nor slots are masked (the tile's slots past S only feed rows that
    are never stored). 1: both are. 2: entries are, and slots only where `edge` (as in _fwd_step)."""
    offs_e = e0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    if MASKED != 0:
        # Entries from `end` on (the next loop's, or past E) read entry end - 1 in their place and get
        # an empty slot range, so that no load needs a predicate: the mask drops them.
        offs_c = tl.minimum(offs_e, end - 1)
        lo = tl.load(LO + ibase + offs_c)
        hi = tl.where(offs_e < end, tl.load(HI + ibase + offs_c), lo)
    else:
        offs_c = offs_e
    if PREFETCHED:  # the tile's query positions, read by the step before (_dkdv_loop)
        qpos = qpos_pre
    else:
        qpos = _rows(tl.load(QPOS + ibase + offs_c), ROW64)
    lse = tl.load(LSE + ibase + offs_c)
    delta = tl.load(DELTA + ibase + offs_c)
    q = tl.load(qbase + qpos[:, None] * sqt + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)
    do = tl.load(dobase + qpos[:, None] * sdot + offs_dv[None, :], mask=offs_dv[None, :] < DV, other=0.0)
    qkT = _dot(k, tl.trans(q), PRECISION)
    pT = tl.exp2(qkT * sm_scale_log2 - lse[None, :])
    if MASKED == 1:
        pT = tl.where(_in_band(offs_s[:, None], lo[None, :], hi[None, :]), pT, 0.0)
    elif MASKED == 2:
        if edge:
            pT = tl.where(_in_band(offs_s[:, None], lo[None, :], hi[None, :]), pT, 0.0)
    if WEIGHTED:  # topk's scatter-mean weight 1/n of the entry's token (unless LSE holds it)
        pT = pT * tl.load(INV_N + nbase + qpos)[None, :]
    dv = dv + _dot(pT.to(do.dtype), do, PRECISION)
    dpT = _dot(v, tl.trans(do), PRECISION)
    dsT = pT * (dpT - delta[None, :])
    dk = dk + _dot(dsT.to(q.dtype), q, PRECISION)
    return dk, dv


@triton.jit
def _dkdv_loop(start, end, k, v, dk, dv, offs_s, qbase, dobase, QPOS, LO, HI, LSE, DELTA, INV_N, ibase, nbase,
               sqt, sdot, S, D, DV, sm_scale_log2,
               BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               WEIGHTED: tl.constexpr, PRECISION: tl.constexpr, MASKED: tl.constexpr,
               ROW64: tl.constexpr, PREFETCH: tl.constexpr):
    """The entry tiles [start, end) of one of the dk/dv kernel's loops (MASKED 0 or 1, see _dkdv_step).
    PREFETCH: each step reads the next tile's query positions, so that its q and dO gathers wait on
    one memory round trip instead of two."""
    qp = _first_rows(QPOS + ibase, start, end, BLOCK_M, ROW64, PREFETCH)
    for e0 in range(start, end, BLOCK_M):
        qcur = qp
        if PREFETCH:
            qp = _clamped_rows(QPOS + ibase, e0 + BLOCK_M + tl.arange(0, BLOCK_M), end, ROW64)
        dk, dv = _dkdv_step(e0, end, k, v, dk, dv, offs_s, qbase, dobase, QPOS, LO, HI, LSE, DELTA, INV_N,
                            ibase, nbase, sqt, sdot, S, D, DV, sm_scale_log2, True,
                            BLOCK_M, BLOCK_D, BLOCK_DV, WEIGHTED, PRECISION, MASKED, ROW64, qcur, PREFETCH)
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, INV_N, DELTA, QPOS, LO, HI, KPOS, TILES, QLO, QHI, FLO, FHI, DK, DV_OUT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
    H, T, E, S, NT, D, DV, sm_scale, sm_scale_log2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    DIRECT: tl.constexpr, ADD_DK: tl.constexpr, PRECISION: tl.constexpr, SPLIT: tl.constexpr,
    ROW64: tl.constexpr, EVEN_D: tl.constexpr, TILED: tl.constexpr, PREFETCH: tl.constexpr = False,
    MEAN_IN_LSE: tl.constexpr = False,
):
    """dk, dv per slot tile, looping over the contiguous entry range [QLO, QHI) that attends it.
    Slot tile pid_n is [pid_n * BLOCK_N, + BLOCK_N), or with TILED TILES[bh, pid_n] (R, NT, 2), as
    the entry tiles of _fwd_kernel (shared QK: slot s is entry s).

    SPLIT: the entries [FLO, FHI) see the whole tile (see tile_entry_ranges), so the entry tiles
    inside that range run without masks; the ones before and after it are masked.
    ADD_DK (shared QK): DK is the dq buffer, which holds dq at these rows (token positions if DIRECT,
    else entries, which are the slots); add dk to it, so one rounding covers dq + dk.
    topk weighs each entry's p by its token's 1/n: with MEAN_IN_LSE, LSE is the dq kernel's LSE_W, which
    holds it (no per-step gather of INV_N at the entries' tokens, no multiply); else by INV_N.
    """
    WEIGHTED: tl.constexpr = not DIRECT and not MEAN_IN_LSE
    if EVEN_D:  # head dims equal to their tiles: the column masks fold away (fewer live predicates)
        D = BLOCK_D
        DV = BLOCK_DV
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: b * stride overflows int32 once a tensor passes 2**31 elements.
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_s, smask, _, _ = _entry_tile(TILES, bh, pid_n, NT, S, BLOCK_N, TILED)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    sbase = bh.to(tl.int64) * S
    ibase = bh.to(tl.int64) * E
    nbase = bh.to(tl.int64) * T
    kpos = tl.load(KPOS + sbase + offs_s, mask=smask, other=0).to(tl.int64)
    kdmask = smask[:, None] & (offs_d[None, :] < D)
    vdmask = smask[:, None] & (offs_dv[None, :] < DV)
    k = tl.load(K + b * skb + h * skh + kpos[:, None] * skt + offs_d[None, :], mask=kdmask, other=0.0)
    v = tl.load(V + b * svb + h * svh + kpos[:, None] * svt + offs_dv[None, :], mask=vdmask, other=0.0)
    qlo = tl.load(QLO + bh * NT + pid_n)
    qhi = tl.load(QHI + bh * NT + pid_n)
    if SPLIT:
        # [full_lo, full_hi): whole entry tiles on the qlo + i * BLOCK_M grid inside [FLO, FHI).
        flo = tl.load(FLO + bh * NT + pid_n)
        fhi = tl.load(FHI + bh * NT + pid_n)
        full_lo = tl.minimum(qlo + tl.cdiv(tl.maximum(flo - qlo, 0), BLOCK_M) * BLOCK_M, qhi)
        full_hi = tl.maximum(full_lo + (tl.maximum(fhi - full_lo, 0) // BLOCK_M) * BLOCK_M, full_lo)
    else:
        full_lo, full_hi = qlo, qlo
    qbase = Q + b * sqb + h * sqh
    dobase = DO + b * sdob + h * sdoh
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if SPLIT == 2:  # one loop, the slot mask decided per entry tile (as in _fwd_kernel)
        for e0 in range(qlo, qhi, BLOCK_M):
            dk, dv = _dkdv_step(e0, qhi, k, v, dk, dv, offs_s, qbase, dobase, QPOS, LO, HI, LSE, DELTA, INV_N,
                                ibase, nbase, sqt, sdot, S, D, DV, sm_scale_log2,
                                (e0 < full_lo) | (e0 >= full_hi),
                                BLOCK_M, BLOCK_D, BLOCK_DV, WEIGHTED, PRECISION, 2, ROW64)
    else:
        dk, dv = _dkdv_loop(qlo, full_lo, k, v, dk, dv, offs_s, qbase, dobase, QPOS, LO, HI, LSE, DELTA, INV_N,
                            ibase, nbase, sqt, sdot, S, D, DV, sm_scale_log2,
                            BLOCK_M, BLOCK_D, BLOCK_DV, WEIGHTED, PRECISION, 1, ROW64, PREFETCH)
        dk, dv = _dkdv_loop(full_lo, full_hi, k, v, dk, dv, offs_s, qbase, dobase, QPOS, LO, HI, LSE, DELTA, INV_N,
                            ibase, nbase, sqt, sdot, S, D, DV, sm_scale_log2,
                            BLOCK_M, BLOCK_D, BLOCK_DV, WEIGHTED, PRECISION, 0, ROW64, PREFETCH)
        dk, dv = _dkdv_loop(full_hi, qhi, k, v, dk, dv, offs_s, qbase, dobase, QPOS, LO, HI, LSE, DELTA, INV_N,
                            ibase, nbase, sqt, sdot, S, D, DV, sm_scale_log2,
                            BLOCK_M, BLOCK_D, BLOCK_DV, WEIGHTED, PRECISION, 1, ROW64, PREFETCH)
    dk = dk * sm_scale
    if DIRECT:
        row = kpos
    else:
        row = offs_s.to(tl.int64)
    dk_ptr = DK + b * sdkb + h * sdkh + row[:, None] * sdkt + offs_d[None, :]
    if ADD_DK:
        dk = dk + tl.load(dk_ptr, mask=kdmask, other=0.0).to(tl.float32)
    tl.store(dk_ptr, dk.to(DK.dtype.element_ty), mask=kdmask)
    tl.store(DV_OUT + b * sdvb + h * sdvh + row[:, None] * sdvt + offs_dv[None, :], dv.to(DV_OUT.dtype.element_ty),
             mask=vdmask)


@triton.jit
def _tile_entry_ranges_kernel(
    LO, HI, TILES, QLO, QHI, FLO, FHI,
    N, M, BN, S, W,
    BLOCK: tl.constexpr, STEPS: tl.constexpr, NEAREST: tl.constexpr, TILED: tl.constexpr,
):
    """For key tile i of each row (slots [i * BN, min(i * BN + BN, S)), or with TILED TILES[row, i]
    = [first, end) (R, M, 2); first f and last l), the entry ranges of the dk/dv kernel, from LO and
    HI (R, N) non-decreasing (an empty tile, f = end, gets an empty [QLO, QHI)):
    QLO = #(HI <= f), QHI = #(LO <= l): [QLO, QHI) are the entries that see a slot of the tile;
    FLO = #(HI <= l), FHI = #(LO <= f): [FLO, FHI) are those that see all of it (empty if FLO >= FHI).
    One launch for the four (vectorised binary searches of STEPS >= bit length of N halvings).

    NEAREST (shared-QK nearest of window W, or shared-QK causal topk with clusters of at most W): entry e
    is slot e, HI[e] = e + 1 and LO[e] = max(first slot of its cluster, e + 1 - W). So QLO = f and
    FLO = l exactly, and since LO[e] <= e and LO[e] > e - W, #(LO <= v) lies in [v + 1, v + W]: two
    searches of STEPS >= bit length of W halvings instead of four over the whole row (W <= N, so that
    v + W cannot overflow int32)."""
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    if TILED:
        at = (row * M + offs) * 2
        first = tl.load(TILES + at, mask=mask, other=0)
        last = tl.load(TILES + at + 1, mask=mask, other=1) - 1
    else:
        first = offs * BN
        last = tl.minimum(first + BN, S) - 1
    out = row * M + offs
    if NEAREST:
        tl.store(QLO + out, first, mask=mask)
        tl.store(FLO + out, last, mask=mask)
        tl.store(QHI + out, _count_le_in(LO + row * N, last + 1, tl.minimum(last + W, N), last, mask, STEPS),
                 mask=mask)
        tl.store(FHI + out, _count_le_in(LO + row * N, first + 1, tl.minimum(first + W, N), first, mask, STEPS),
                 mask=mask)
    else:
        tl.store(QLO + out, _count_le(HI + row * N, N, first, mask, BLOCK, STEPS), mask=mask)
        tl.store(QHI + out, _count_le(LO + row * N, N, last, mask, BLOCK, STEPS), mask=mask)
        tl.store(FLO + out, _count_le(HI + row * N, N, last, mask, BLOCK, STEPS), mask=mask)
        tl.store(FHI + out, _count_le(LO + row * N, N, first, mask, BLOCK, STEPS), mask=mask)


@triton.jit
def _count_le(X, N, v, mask, BLOCK: tl.constexpr, STEPS: tl.constexpr):
    """#(X[j] <= v) per lane, X sorted ascending (N of them): torch.searchsorted(X, v, right=True)."""
    return _count_le_in(X, tl.zeros([BLOCK], dtype=tl.int32), tl.zeros([BLOCK], dtype=tl.int32) + N, v, mask,
                        STEPS)


@triton.jit
def _count_le_in(X, lo, hi, v, mask, STEPS: tl.constexpr):
    """_count_le where the answer is known to lie in [lo, hi] (per lane); STEPS >= bit length of
    max(hi - lo) halvings."""
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2  # < hi <= N whenever lo < hi
        go = lo < hi
        x = tl.load(X + mid, mask=mask & go, other=0).to(tl.int32)
        below = x <= v
        lo = tl.where(go & below, mid + 1, lo)
        hi = tl.where(go & ~below, mid, hi)
    return lo


@triton.jit
def _count_below_kernel(
    X, OUT,
    N, M, STEP, OFFSET, LIMIT,
    RIGHT: tl.constexpr, BLOCK: tl.constexpr, STEPS: tl.constexpr,
):
    """OUT (R, M) int32: for each row of X (R, N) int32 sorted ascending and each query
    v_i = min(i * STEP + OFFSET, LIMIT), the number of elements < v_i (<= v_i if RIGHT): exactly
    torch.searchsorted(X, v, right=RIGHT), for an arithmetic run of queries made in the kernel.

    One launch instead of arange, expand, contiguous and searchsorted: the launchers need such
    boundaries three times per topk fwd+bwd (CSR row pointers, the dk/dv kernel's entry range per key
    tile), and each torch op costs host time in an eager step. A vectorised binary search: STEPS >=
    bit length of N halvings over [0, N].
    """
    row = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M
    v = tl.minimum(offs * STEP + OFFSET, LIMIT)
    lo = tl.zeros([BLOCK], dtype=tl.int32)  # invariant: the answer lies in [lo, hi]
    hi = tl.zeros([BLOCK], dtype=tl.int32) + N
    for _ in tl.static_range(STEPS):
        mid = (lo + hi) // 2  # < hi <= N whenever lo < hi
        x = tl.load(X + row * N + mid, mask=mask & (lo < hi), other=0).to(tl.int32)
        below = (x <= v) if RIGHT else (x < v)
        go = lo < hi
        lo = tl.where(go & below, mid + 1, lo)
        hi = tl.where(go & ~below, mid, hi)
    tl.store(OUT + row * M + offs, lo, mask=mask)


@triton.jit
def _slot_bounds_kernel(
    ORDER, GROUP, FIRST, QPOS, LO, HI,
    N, C, W,
    NEAREST: tl.constexpr, CAUSAL: tl.constexpr, BLOCK: tl.constexpr,
):
    """Each entry's key-slot range [LO, HI) (and, for nearest, its query position QPOS) for shared QK,
    rows of N entries; one launch instead of the 6-7 small torch ops that build them.

    NEAREST: entries are tokens sorted by (cluster, position): ORDER (R, N) int64 the sort's indices,
    GROUP (R, N) the sorted cluster ids, FIRST (R, C) int32 each cluster's first slot. Entry s is
    query ORDER[s] and key s: HI = s + 1, LO = max(FIRST[GROUP[s]], s + 1 - W), QPOS = ORDER[s].
    topk: entries are (cluster, rank) pairs, rank = s % W within cluster s // W: LO = the cluster's
    first slot; HI = LO + rank + 1 if CAUSAL (distinct ascending positions) else LO + W.
    """
    row = tl.program_id(1).to(tl.int64)
    s = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = s < N
    if NEAREST:
        g = tl.load(GROUP + row * N + s, mask=mask, other=0).to(tl.int32)
        first = tl.load(FIRST + row * C + g, mask=mask, other=0)
        hi = s + 1
        lo = tl.maximum(first, hi - W)
        tl.store(QPOS + row * N + s, tl.load(ORDER + row * N + s, mask=mask, other=0).to(tl.int32), mask=mask)
    else:
        lo = (s // W) * W
        hi = lo + (s % W) + 1 if CAUSAL else lo + W
    tl.store(LO + row * N + s, lo, mask=mask)
    tl.store(HI + row * N + s, hi, mask=mask)


@triton.jit
def _nearest_slots_kernel(
    CLUSTER, COUNTS, CUM, QPOS, LO, HI, TILES,
    T, NB, W, NT,
    BLOCK_T: tl.constexpr, C_BINS: tl.constexpr, TILE_BM: tl.constexpr,
):
    """Shared-QK nearest slots by a counting sort, equal to a stable sort of the cluster ids. For the
    BLOCK_T positions of tile b: slot = the first slot of (its cluster, tile b) + the earlier positions
    of this tile in the cluster; then QPOS[slot] = position, HI[slot] = slot + 1 and
    LO[slot] = max(first slot of the cluster, slot + 1 - W) (as _slot_bounds_kernel NEAREST).

    CLUSTER (R, T) int64 the cluster ids; COUNTS (R, C_BINS, NB) the per-tile cluster counts and CUM
    their inclusive cumsum over the whole flat tensor. Flat order is (row, cluster, tile) and each row
    holds T positions, so CUM - COUNTS - row * T at (row, c, b) is the number of positions of the row
    that sort before tile b's positions of cluster c: their first slot.
    TILE_BM > 0: program 0 of each row also writes the row's cluster tiles of TILE_BM (see
    _write_cluster_tiles) into TILES (R, NT, 2); a launch of its own cost host time in eager steps.
    """
    b = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    if TILE_BM > 0:
        if b == 0:
            _write_cluster_tiles(COUNTS, CUM, TILES, row, T, NB, NT, TILE_BM, C_BINS, 256)
    offs = b * BLOCK_T + tl.arange(0, BLOCK_T)
    m = offs < T
    c = tl.load(CLUSTER + row * T + offs, mask=m, other=0)
    at_tile0 = (row * C_BINS + c) * NB
    start = tl.load(CUM + at_tile0 + b, mask=m, other=0) - tl.load(COUNTS + at_tile0 + b, mask=m, other=0)
    first = tl.load(CUM + at_tile0, mask=m, other=0) - tl.load(COUNTS + at_tile0, mask=m, other=0)
    i = tl.arange(0, BLOCK_T)
    # Positions past T sit after every valid one in the tile, so they never count as earlier.
    earlier = (c[:, None] == c[None, :]) & (i[None, :] < i[:, None])
    slot = (start - row * T + tl.sum(earlier.to(tl.int32), axis=1)).to(tl.int32)
    tl.store(QPOS + row * T + slot, offs, mask=m)
    tl.store(LO + row * T + slot, tl.maximum((first - row * T).to(tl.int32), slot + 1 - W), mask=m)
    # HI[s] = s + 1 whichever position lands in slot s, and the tiles' slots cover 0 .. T-1 once: each
    # program writes HI over its own position range, coalesced, instead of a third scattered store
    # (the slot of a tile's positions spreads over up to C clusters: one 32-byte sector per store).
    tl.store(HI + row * T + offs, offs + 1, mask=m)


@triton.jit
def _write_cluster_tiles(COUNTS, CUM, TILES, row, T, NB, NT, BM: tl.constexpr, C_BINS: tl.constexpr,
                         BLOCK: tl.constexpr):
    """Shared-QK nearest: row `row`'s slots cut into tiles of BM per cluster, so that no tile holds two
    clusters. TILES (R, NT, 2): [first, end) of tile j, cluster by cluster, each cluster's tiles from
    its first slot on (the last one partial); tiles past the row's count are empty, [T, T).

    Why: the attention kernels run a tile of entries (or slots) against the union of its rows' key
    ranges. A tile that straddles two clusters spans the first cluster's window although the second
    cluster's rows need little of it: ~7% of the tile pairs at T = 64k, C = 128, W = 512 (a CPU
    simulation, session 12), for 6% more tiles. Measured on an H200 at 64k: the three attention
    kernels 2-4% faster each, graph fwd+bwd 0.890 -> 0.862 ms (benchmarks/RESULTS.md, run M). NT >=
    ceil(T / BM) + C bounds the count (each cluster adds at most one partial tile).

    COUNTS, CUM: as _nearest_slots_kernel's (per-tile cluster counts and their flat inclusive cumsum),
    from which cluster c of the row holds slots [CUM[row, c, 0] - COUNTS[row, c, 0], CUM[row, c, NB - 1])
    - row * T.
    """
    c = tl.arange(0, C_BINS)
    at0 = (row * C_BINS + c) * NB
    first = (tl.load(CUM + at0) - tl.load(COUNTS + at0) - row * T).to(tl.int32)
    end = (tl.load(CUM + at0 + NB - 1) - row * T).to(tl.int32)
    n_tiles = (end - first + BM - 1) // BM
    tile0 = tl.cumsum(n_tiles, axis=0) - n_tiles  # each cluster's first tile
    base = TILES + row * NT * 2
    for i in range(0, tl.max(n_tiles, axis=0)):
        has = i < n_tiles
        start = first + i * BM
        tl.store(base + (tile0 + i) * 2, start, mask=has)
        tl.store(base + (tile0 + i) * 2 + 1, tl.minimum(start + BM, end), mask=has)
    total = tl.sum(n_tiles, axis=0)
    for j0 in range(0, NT, BLOCK):
        j = j0 + tl.arange(0, BLOCK)
        empty = (j >= total) & (j < NT)
        tl.store(base + j * 2, tl.full([BLOCK], 0, tl.int32) + T, mask=empty)
        tl.store(base + j * 2 + 1, tl.full([BLOCK], 0, tl.int32) + T, mask=empty)


@triton.jit
def _combine_kernel(
    X, PERM, ROWPTR, LO, HI, Y, INV_N,
    sxb, sxh, sxe, syb, syh, syt,
    H, T, E, D,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, MEAN: tl.constexpr, AHEAD: tl.constexpr,
):
    """Y[t] = sum of X[e] over the entries e at position t, via a position-sorted PERM.

    MEAN (forward scatter-mean): divide by the number of entries that had a key (HI > LO) and store
    that inverse count in INV_N for the backward; tokens no cluster gave a key get 0.

    AHEAD: each token's first AHEAD entries are gathered at once (one (BLOCK_T, AHEAD, D) load), and
    only entries past them in a loop. Each step of that loop is two dependent gathers (PERM, then the
    row), so a tile whose busiest token has n entries waits 2n memory round trips; topk's counts are
    about Poisson(1) (benchmarks' 64k: 0.3% of tokens have 5 or more), so AHEAD = 4 leaves one round
    trip of each kind for nearly every tile.
    """
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    # int64: b * stride overflows int32 once a tensor passes 2**31 elements.
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    rbase = bh.to(tl.int64) * (T + 1)
    ibase = bh.to(tl.int64) * E
    start = tl.load(ROWPTR + rbase + offs_t, mask=tmask, other=0)
    end = tl.load(ROWPTR + rbase + offs_t + 1, mask=tmask, other=0)
    cnt = end - start
    xbase = X + b * sxb + h * sxh
    offs_j = tl.arange(0, AHEAD)
    # (BLOCK_T, AHEAD) names of their own: the loop below gives its (BLOCK_T,) ones other types.
    has_a = offs_j[None, :] < cnt[:, None]
    e_a = tl.load(PERM + ibase + start[:, None] + offs_j[None, :], mask=has_a, other=0).to(tl.int64)
    x_a = tl.load(xbase + e_a[:, :, None] * sxe + offs_d[None, None, :],
                  mask=has_a[:, :, None] & dmask[None, :, :], other=0.0)
    acc = tl.sum(x_a.to(tl.float32), axis=1)
    if MEAN:
        lo_a = tl.load(LO + ibase + e_a, mask=has_a, other=0)
        hi_a = tl.load(HI + ibase + e_a, mask=has_a, other=0)
        nk = tl.sum((has_a & (hi_a > lo_a)).to(tl.float32), axis=1)
    else:
        nk = tl.zeros([BLOCK_T], dtype=tl.float32)
    for j in range(AHEAD, tl.max(cnt, axis=0)):
        has = j < cnt
        e = tl.load(PERM + ibase + start + j, mask=has, other=0).to(tl.int64)
        m2 = has[:, None] & dmask
        acc += tl.load(xbase + e[:, None] * sxe + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
        if MEAN:
            lo = tl.load(LO + ibase + e, mask=has, other=0)
            hi = tl.load(HI + ibase + e, mask=has, other=0)
            nk += (hi > lo).to(tl.float32)
    if MEAN:
        inv = 1.0 / tl.maximum(nk, 1.0)
        acc = acc * inv[:, None]
        tl.store(INV_N + bh.to(tl.int64) * T + offs_t, inv, mask=tmask)
    tl.store(Y + b * syb + h * syh + offs_t[:, None] * syt + offs_d[None, :], acc.to(Y.dtype.element_ty),
             mask=tmask[:, None] & dmask)


@triton.jit
def _topk_compact_kernel(
    SCORES, KTH, NEED, OUT,
    T, C, W,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Exact top-W positions per (batch-head, cluster), ascending, ties to the lower position.

    SCORES (BH, C, T) float32; KTH (BH, C) the W-th largest score; NEED (BH, C) how many of the
    positions scoring exactly KTH belong to the top W. One in-order scan selects every score > KTH
    and the first NEED that equal it, and writes their positions compacted, already sorted.
    """
    bh = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = offs_c < C
    kth = tl.load(KTH + bh * C + offs_c, mask=cmask, other=float("inf"))
    need = tl.load(NEED + bh * C + offs_c, mask=cmask, other=0)
    n_sel = tl.zeros([BLOCK_C], dtype=tl.int32)
    n_eq = tl.zeros([BLOCK_C], dtype=tl.int32)
    sbase = SCORES + bh.to(tl.int64) * T * C
    obase = OUT + bh.to(tl.int64) * C * W
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        tmask = offs_t < T
        m2 = tmask[:, None] & cmask[None, :]
        s = tl.load(sbase + offs_c[None, :] * T + offs_t[:, None], mask=m2, other=float("-inf"))
        eq = (s == kth[None, :]) & m2
        eq_rank = n_eq[None, :] + tl.cumsum(eq.to(tl.int32), axis=0) - eq.to(tl.int32)
        sel = ((s > kth[None, :]) & m2) | (eq & (eq_rank < need[None, :]))
        seli = sel.to(tl.int32)
        slot = n_sel[None, :] + tl.cumsum(seli, axis=0) - seli
        # slot < W always for finite scores; the bound keeps NaN scores from writing out of range.
        tl.store(obase + offs_c[None, :] * W + slot, offs_t[:, None] + 0 * slot, mask=sel & (slot < W))
        n_sel += tl.sum(seli, axis=0)
        n_eq += tl.sum(eq.to(tl.int32), axis=0)


@triton.jit
def _gather_groups_kernel(
    SCORES, GROUPS, CAND,
    T, W,
    GROUP: tl.constexpr, BLOCK_W: tl.constexpr,
):
    """CAND (R, W*GROUP) = the scores of the GROUP positions of each selected group, in position order.

    SCORES (R, T) float32 rows (R = B*H*C); GROUPS (R, W) ascending group ids. Positions past T
    (the last group's tail) get -inf, which the top-W of the candidates never picks.
    """
    row = tl.program_id(1).to(tl.int64)
    offs_w = tl.program_id(0) * BLOCK_W + tl.arange(0, BLOCK_W)
    wmask = offs_w < W
    offs_g = tl.arange(0, GROUP)
    g = tl.load(GROUPS + row * W + offs_w, mask=wmask, other=0)
    pos = g[:, None] * GROUP + offs_g[None, :]
    s = tl.load(SCORES + row * T + pos, mask=wmask[:, None] & (pos < T), other=float("-inf"))
    tl.store(CAND + row * W * GROUP + offs_w[:, None] * GROUP + offs_g[None, :], s, mask=wmask[:, None])
