"""Triton kernels for blocked local attention (forward, backward; Shaw relative positions inside both).

Legend: B batch, H heads, T tokens, D head dim (DV for values), L block length, F flange,
FR right flange (F non-causal, 0 causal), M max relative distance, BM x BN a (query x key) tile,
BAND the power-of-two width holding the BM + BN - 1 distances j - i of one tile.

Tensors arrive contiguous as (B*H, T, D); program_id(1) (or (2)) picks the (batch, head) row.
Query i (block b = i // L) sees keys j in [b*L - F, (b+1)*L + FR), 0 <= j < T, and j <= i if causal.
Scores live in the log2 domain (qk_scale = scale * log2(e)) so the softmax uses exp2.

Shaw terms: for a tile at (m0, n0) the distances are d = dmin + t, dmin = n0 - m0 - (BM - 1),
t in [0, BAND). q @ rel_k[band]^T is a (BM, BAND) product in distance coordinates; `_skew` moves it
to key coordinates (column j - i + BM - 1) and `_unskew` moves a (BM, BN) tile back, so both rel
terms are tensor-core products plus a register gather, never a (T, 2M + 1) tensor in memory.
The table grads are the one exception: the dq kernel stores P and dS by distance, (T, n_dist) per
head with n_dist = L + F (causal), and two matmuls reduce them (triton_ops.local_attn_bwd).
With triton_ops.SHAW_BANDS (off by default) the rel terms are instead matmuls by distance around the
kernels, which read q @ rel_k^T and dO @ rel_v^T from (T, n_dist) bands (`_fwd_bands_kernel`, BANDS).
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, DOT: tl.constexpr):
    """DOT 0: tensor cores in the inputs' dtype; 1: fp32 inputs as true fp32 (tl.dot defaults to
    tf32, ~3e-4 relative error); 2: upcast first, because the CPU interpreter of triton 3.9 gets
    bf16 tl.dot wrong (a bf16 x bf16 product is exact in fp32, so results match the GPU's)."""
    if DOT == 0:
        r = tl.dot(a, b)
    elif DOT == 1:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return r


@triton.jit
def _cast(x, dtype: tl.constexpr, DOT: tl.constexpr):
    """x.to(dtype), rounding to nearest even; under the interpreter (DOT 2) fp32 -> bf16 truncates,
    which doubles the rounding error, so the rounding is done on the bits first."""
    if DOT == 2:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _band(R, dmin, M, offs_t, offs_d, D):
    """Rows rel[clip(dmin + t, -M, M) + M] for t in offs_t: (BAND, BD), zero past column D."""
    r = tl.minimum(tl.maximum(dmin + offs_t, -M), M) + M
    return tl.load(R + r[:, None] * D + offs_d[None, :], mask=offs_d[None, :] < D, other=0.0)


@triton.jit
def _skew(x, BM: tl.constexpr, BN: tl.constexpr):
    """(BM, BAND) in distance coordinates -> (BM, BN) in key coordinates."""
    i = tl.arange(0, BM)[:, None]
    j = tl.arange(0, BN)[None, :]
    return tl.gather(x, j - i + (BM - 1), axis=1)


@triton.jit
def _unskew(x, BM: tl.constexpr, BN: tl.constexpr, BAND: tl.constexpr):
    """(BM, BN) in key coordinates -> (BM, BAND) in distance coordinates, zero off the tile."""
    i = tl.arange(0, BM)[:, None]
    t = tl.arange(0, BAND)[None, :]
    j = t - (BM - 1) + i
    inside = (j >= 0) & (j < BN)
    g = tl.gather(x, tl.minimum(tl.maximum(j, 0), BN - 1), axis=1)
    return tl.where(inside, g, 0.0)


@triton.jit
def _allowed(offs_m, offs_n, T, L, F, FR, CAUSAL: tl.constexpr):
    """(BM, BN) bool: key j may be seen by query i (both inside [0, T))."""
    blk = offs_m // L
    i = offs_m[:, None]
    j = offs_n[None, :]
    ok = (j >= (blk * L - F)[:, None]) & (j < (blk * L + L + FR)[:, None])
    ok = ok & (j < T) & (j >= 0) & (i < T)
    if CAUSAL:
        ok = ok & (j <= i)
    return ok


@triton.jit
def _allowed_t(offs_n, offs_m, T, L, F, FR, CAUSAL: tl.constexpr):
    """(BN, BM) bool: the transpose of _allowed (rows are keys)."""
    blk = offs_m // L
    j = offs_n[:, None]
    i = offs_m[None, :]
    ok = (j >= (blk * L - F)[None, :]) & (j < (blk * L + L + FR)[None, :])
    ok = ok & (j < T) & (i < T)
    if CAUSAL:
        ok = ok & (j <= i)
    return ok


@triton.jit
def _query_tile_ranges(m0, T, L, F, FR, BM: tl.constexpr, BN: tl.constexpr, CAUSAL: tl.constexpr):
    """Key tiles n0 = lo + k*BN of query tile m0: k in [0, k1) and [k2, nk) need the element mask,
    k in [k1, k2) are allowed for every row. Separate loops keep branches out of the hot loop."""
    m_last = tl.minimum(m0 + BM, T) - 1
    lo = tl.maximum((m0 // L) * L - F, 0)
    hi = tl.minimum((m_last // L + 1) * L + FR, T)
    tail = tl.minimum((m0 // L + 1) * L + FR, T)
    if CAUSAL:
        hi = tl.minimum(hi, m_last + 1)
        tail = tl.minimum(tail, m0 + 1)
    nk = tl.cdiv(hi - lo, BN)
    k1 = tl.minimum(tl.cdiv(tl.maximum((m_last // L) * L - F - lo, 0), BN), nk)
    k2 = tl.maximum(tl.minimum((tail - lo) // BN, nk), k1)
    return lo, k1, k2, nk


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K, V, RK, RV, m0, n0, offs_m, offs_d, offs_dv, offs_t,
              T, D, DV, L, F, FR, M, qk_scale,
              MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_REL: tl.constexpr, DOT: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BAND: tl.constexpr):
    offs_n = n0 + tl.arange(0, BN)
    kt = tl.load(K + offs_n[None, :] * D + offs_d[:, None],
                 mask=(offs_n[None, :] < T) & (offs_d[:, None] < D), other=0.0)
    s = _dot(q, kt, DOT)
    if HAS_REL:
        dmin = n0 - m0 - (BM - 1)
        rk = _band(RK, dmin, M, offs_t, offs_d, D)
        s += _skew(_dot(q, tl.trans(rk), DOT), BM, BN)
    s = s * qk_scale
    if MASK:
        s = tl.where(_allowed(offs_m, offs_n, T, L, F, FR, CAUSAL), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    v = tl.load(V + offs_n[:, None] * DV + offs_dv[None, :],
                mask=(offs_n[:, None] < T) & (offs_dv[None, :] < DV), other=0.0)
    acc += _dot(_cast(p, v.dtype, DOT), v, DOT)
    if HAS_REL:
        rv = _band(RV, dmin, M, offs_t, offs_dv, DV)
        acc += _dot(_cast(_unskew(p, BM, BN, BAND), rv.dtype, DOT), rv, DOT)
    return acc, l_i, m_new


@triton.jit
def _bands_logits(q, K, RQ, m0, n0, offs_m, offs_d, T, D, L, F, FR, qk_scale, dlo, n_dist,
                  MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr, BN: tl.constexpr):
    """(BM, BN) scores in log2 units, q.k plus the precomputed q.rel_k band RQ at column (j - i) - dlo;
    -inf where MASK and the pair is not allowed. Returns (scores, offs_n)."""
    offs_n = n0 + tl.arange(0, BN)
    kt = tl.load(K + offs_n[None, :] * D + offs_d[:, None],
                 mask=(offs_n[None, :] < T) & (offs_d[:, None] < D), other=0.0)
    bcol = offs_n[None, :] - offs_m[:, None] - dlo
    bok = (bcol >= 0) & (bcol < n_dist) & (offs_m[:, None] < T) & (offs_n[None, :] < T)
    r = tl.load(RQ + offs_m.to(tl.int64)[:, None] * n_dist + bcol, mask=bok, other=0.0)
    s = (_dot(q, kt, DOT) + r.to(tl.float32)) * qk_scale
    if MASK:
        s = tl.where(_allowed(offs_m, offs_n, T, L, F, FR, CAUSAL), s, float("-inf"))
    return s, offs_n


@triton.jit
def _fwd_bands_tile(acc, l_i, m_i, q, K, V, RQ, PD, lse, m0, n0, offs_m, offs_d, offs_dv,
                    T, D, DV, L, F, FR, qk_scale, dlo, n_dist,
                    MASK: tl.constexpr, CAUSAL: tl.constexpr, DOT: tl.constexpr, BN: tl.constexpr,
                    PASS: tl.constexpr):
    """PASS 1: the row max and sum only (online, no V). PASS 2: with the final lse, P exactly,
    acc += P @ V, and P stored by distance into PD for the launcher's P_D @ rel_v product."""
    s, offs_n = _bands_logits(q, K, RQ, m0, n0, offs_m, offs_d, T, D, L, F, FR, qk_scale, dlo, n_dist,
                              MASK, CAUSAL, DOT, BN)
    if PASS == 1:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp2(m_i - m_new) + tl.sum(tl.exp2(s - m_new[:, None]), 1)
        m_i = m_new
    else:
        p = tl.exp2(s - lse[:, None])
        v = tl.load(V + offs_n[:, None] * DV + offs_dv[None, :],
                    mask=(offs_n[:, None] < T) & (offs_dv[None, :] < DV), other=0.0)
        acc += _dot(_cast(p, v.dtype, DOT), v, DOT)
        col = offs_n[None, :] - offs_m[:, None] - dlo
        ok = (col >= 0) & (col < n_dist) & (offs_m[:, None] < T)
        tl.store(PD + offs_m.to(tl.int64)[:, None] * n_dist + col, _cast(p, PD.dtype.element_ty, DOT), mask=ok)
    return acc, l_i, m_i


@triton.jit
def _fwd_bands_kernel(
    Q, K, V, RQ, PD, O, LSE,
    T, D, DV, L, F, FR, qk_scale, dlo, n_dist,
    CAUSAL: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, PASS: tl.constexpr,
):
    """The Shaw forward on precomputed bands (triton_ops.SHAW_BANDS), in two passes over the keys:
    PASS 1 stores LSE; PASS 2 stores O = P @ V (the content part; O is float32 here) and P by
    distance in PD (zeros first), from which the launcher adds P_D @ rel_v rows. q.rel_k comes from
    RQ, as in the backward, so no band product or skew gather is left in either pass."""
    m0 = tl.program_id(0) * BM
    bh = tl.program_id(1).to(tl.int64)
    Q += bh * T * D
    K += bh * T * D
    V += bh * T * DV
    RQ += bh * T * n_dist
    PD += bh * T * n_dist
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    row_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :], mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BM], -1.0e30, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    if PASS == 2:
        lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)
    else:
        lse = m_i
    lo, k1, k2, nk = _query_tile_ranges(m0, T, L, F, FR, BM, BN, CAUSAL)
    for k in range(0, k1):
        acc, l_i, m_i = _fwd_bands_tile(acc, l_i, m_i, q, K, V, RQ, PD, lse, m0, lo + k * BN, offs_m, offs_d,
                                        offs_dv, T, D, DV, L, F, FR, qk_scale, dlo, n_dist, True, CAUSAL, DOT, BN,
                                        PASS)
    for k in range(k1, k2):
        acc, l_i, m_i = _fwd_bands_tile(acc, l_i, m_i, q, K, V, RQ, PD, lse, m0, lo + k * BN, offs_m, offs_d,
                                        offs_dv, T, D, DV, L, F, FR, qk_scale, dlo, n_dist, False, CAUSAL, DOT, BN,
                                        PASS)
    for k in range(k2, nk):
        acc, l_i, m_i = _fwd_bands_tile(acc, l_i, m_i, q, K, V, RQ, PD, lse, m0, lo + k * BN, offs_m, offs_d,
                                        offs_dv, T, D, DV, L, F, FR, qk_scale, dlo, n_dist, True, CAUSAL, DOT, BN,
                                        PASS)
    if PASS == 1:
        tl.store(LSE + bh * T + offs_m, m_i + tl.log2(tl.where(l_i > 0, l_i, 1.0)), mask=row_ok)
    else:
        O += bh * T * DV
        tl.store(O + offs_m[:, None] * DV + offs_dv[None, :], acc, mask=row_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _fwd_kernel(
    Q, K, V, RK, RV, O, LSE,
    T, D, DV, L, F, FR, M, qk_scale,
    CAUSAL: tl.constexpr, HAS_REL: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BAND: tl.constexpr,
):
    m0 = tl.program_id(0) * BM
    bh = tl.program_id(1).to(tl.int64)
    Q += bh * T * D
    K += bh * T * D
    V += bh * T * DV
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    offs_t = tl.arange(0, BAND)
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :],
                mask=(offs_m[:, None] < T) & (offs_d[None, :] < D), other=0.0)

    lo, k1, k2, nk = _query_tile_ranges(m0, T, L, F, FR, BM, BN, CAUSAL)
    m_i = tl.full([BM], -1.0e30, tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, BDV], tl.float32)
    for k in range(0, k1):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, RK, RV, m0, lo + k * BN, offs_m, offs_d, offs_dv,
                                  offs_t, T, D, DV, L, F, FR, M, qk_scale, True, CAUSAL, HAS_REL, DOT, BM, BN, BAND)
    for k in range(k1, k2):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, RK, RV, m0, lo + k * BN, offs_m, offs_d, offs_dv,
                                  offs_t, T, D, DV, L, F, FR, M, qk_scale, False, CAUSAL, HAS_REL, DOT, BM, BN, BAND)
    for k in range(k2, nk):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, K, V, RK, RV, m0, lo + k * BN, offs_m, offs_d, offs_dv,
                                  offs_t, T, D, DV, L, F, FR, M, qk_scale, True, CAUSAL, HAS_REL, DOT, BM, BN, BAND)

    l_safe = tl.where(l_i > 0, l_i, 1.0)
    out = acc / l_safe[:, None]
    O += bh * T * DV
    tl.store(O + offs_m[:, None] * DV + offs_dv[None, :], _cast(out, O.dtype.element_ty, DOT),
             mask=(offs_m[:, None] < T) & (offs_dv[None, :] < DV))
    tl.store(LSE + bh * T + offs_m, m_i + tl.log2(l_safe), mask=offs_m < T)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, K, V, RK, RV, PD, DSD, RQ, RD, m0, n0, offs_m, offs_d, offs_dv, offs_t,
             T, D, DV, L, F, FR, M, qk_scale, dlo, n_dist,
             MASK: tl.constexpr, CAUSAL: tl.constexpr, HAS_REL: tl.constexpr, DOT: tl.constexpr,
             BM: tl.constexpr, BN: tl.constexpr, BAND: tl.constexpr, STORE_DIST: tl.constexpr,
             BANDS: tl.constexpr):
    offs_n = n0 + tl.arange(0, BN)
    kt = tl.load(K + offs_n[None, :] * D + offs_d[:, None],
                 mask=(offs_n[None, :] < T) & (offs_d[:, None] < D), other=0.0)
    vt = tl.load(V + offs_n[None, :] * DV + offs_dv[:, None],
                 mask=(offs_n[None, :] < T) & (offs_dv[:, None] < DV), other=0.0)
    s = _dot(q, kt, DOT)
    dp = _dot(do, vt, DOT)
    if HAS_REL:
        if BANDS:  # the rel terms read from the precomputed bands (see _bwd_dq_kernel)
            bcol = offs_n[None, :] - offs_m[:, None] - dlo
            bok = (bcol >= 0) & (bcol < n_dist) & (offs_m[:, None] < T) & (offs_n[None, :] < T)
            bidx = offs_m.to(tl.int64)[:, None] * n_dist + bcol
            s += tl.load(RQ + bidx, mask=bok, other=0.0).to(tl.float32)
            dp += tl.load(RD + bidx, mask=bok, other=0.0).to(tl.float32)
        else:
            dmin = n0 - m0 - (BM - 1)
            rk = _band(RK, dmin, M, offs_t, offs_d, D)
            rv = _band(RV, dmin, M, offs_t, offs_dv, DV)
            s += _skew(_dot(q, tl.trans(rk), DOT), BM, BN)
            dp += _skew(_dot(do, tl.trans(rv), DOT), BM, BN)
    p = tl.exp2(s * qk_scale - lse[:, None])
    if MASK:
        p = tl.where(_allowed(offs_m, offs_n, T, L, F, FR, CAUSAL), p, 0.0)
    ds = p * (dp - delta[:, None])
    if STORE_DIST:
        # P and dS in distance coordinates, row i column (j - i) - dlo: the table grads are then two
        # matmuls (P_D^T @ dO, dS_D^T @ q) instead of a kernel that recomputes the whole attention.
        # Each (i, j) pair is visited once; pairs never visited stay at the buffers' zeros.
        col = offs_n[None, :] - offs_m[:, None] - dlo
        ok = (col >= 0) & (col < n_dist) & (offs_m[:, None] < T)
        dist = offs_m.to(tl.int64)[:, None] * n_dist + col
        tl.store(PD + dist, _cast(p, PD.dtype.element_ty, DOT), mask=ok)
        tl.store(DSD + dist, _cast(ds, DSD.dtype.element_ty, DOT), mask=ok)
    dq += _dot(_cast(ds, kt.dtype, DOT), tl.trans(kt), DOT)
    if HAS_REL and not BANDS:  # with BANDS the launcher adds dS_D @ rel_k rows by a matmul
        dq += _dot(_cast(_unskew(ds, BM, BN, BAND), rk.dtype, DOT), rk, DOT)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, RK, RV, DO, O, LSE, DELTA, DQ, PD, DSD, RQ, RD,
    T, D, DV, L, F, FR, M, qk_scale, scale, dlo, n_dist,
    CAUSAL: tl.constexpr, HAS_REL: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BAND: tl.constexpr,
    STORE_DIST: tl.constexpr, BANDS: tl.constexpr,
):
    """dq per query tile; also stores DELTA = rowsum(dO * O) (float32) for the dk/dv kernel, which runs
    after it: computed from the tiles this kernel loads anyway, instead of by torch ops that moved ~13x
    the bytes of dO through float32 copies. STORE_DIST: also P and dS by distance, (B*H, T, n_dist),
    for the Shaw table grads (see _dq_tile).

    BANDS (with HAS_REL and STORE_DIST): the rel logits q_i . rel_k[j - i] and dO_i . rel_v[j - i] come
    precomputed by distance, RQ and RD (B*H, T, n_dist), read at column (j - i) - dlo, instead of a
    (BM x BAND) product and a skew gather per table and key tile; dq's rel term, dS_D @ rel_k rows, is
    then left to the launcher (one matmul)."""
    m0 = tl.program_id(0) * BM
    bh = tl.program_id(1).to(tl.int64)
    Q += bh * T * D
    K += bh * T * D
    DQ += bh * T * D
    V += bh * T * DV
    DO += bh * T * DV
    if STORE_DIST:
        PD += bh * T * n_dist
        DSD += bh * T * n_dist
    if BANDS:
        RQ += bh * T * n_dist
        RD += bh * T * n_dist
    offs_m = m0 + tl.arange(0, BM)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    offs_t = tl.arange(0, BAND)
    row_ok = offs_m < T
    q = tl.load(Q + offs_m[:, None] * D + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    dv_ok = row_ok[:, None] & (offs_dv[None, :] < DV)
    do = tl.load(DO + offs_m[:, None] * DV + offs_dv[None, :], mask=dv_ok, other=0.0)
    o = tl.load(O + bh * T * DV + offs_m[:, None] * DV + offs_dv[None, :], mask=dv_ok, other=0.0)
    lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), axis=1)
    tl.store(DELTA + bh * T + offs_m, delta, mask=row_ok)

    lo, k1, k2, nk = _query_tile_ranges(m0, T, L, F, FR, BM, BN, CAUSAL)
    dq = tl.zeros([BM, BD], tl.float32)
    for k in range(0, k1):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, RK, RV, PD, DSD, RQ, RD, m0, lo + k * BN, offs_m, offs_d, offs_dv,
                      offs_t, T, D, DV, L, F, FR, M, qk_scale, dlo, n_dist, True, CAUSAL, HAS_REL, DOT, BM, BN, BAND,
                      STORE_DIST, BANDS)
    for k in range(k1, k2):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, RK, RV, PD, DSD, RQ, RD, m0, lo + k * BN, offs_m, offs_d, offs_dv,
                      offs_t, T, D, DV, L, F, FR, M, qk_scale, dlo, n_dist, False, CAUSAL, HAS_REL, DOT, BM, BN, BAND,
                      STORE_DIST, BANDS)
    for k in range(k2, nk):
        dq = _dq_tile(dq, q, do, lse, delta, K, V, RK, RV, PD, DSD, RQ, RD, m0, lo + k * BN, offs_m, offs_d, offs_dv,
                      offs_t, T, D, DV, L, F, FR, M, qk_scale, dlo, n_dist, True, CAUSAL, HAS_REL, DOT, BM, BN, BAND,
                      STORE_DIST, BANDS)
    tl.store(DQ + offs_m[:, None] * D + offs_d[None, :], _cast(dq * scale, DQ.dtype.element_ty, DOT),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, RK, RV, DO, LSE, DELTA, DK, DV_, RQ, RD,
    T, D, DV, L, F, FR, M, qk_scale, scale, dlo, n_dist,
    CAUSAL: tl.constexpr, HAS_REL: tl.constexpr, DOT: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, BDV: tl.constexpr, BAND: tl.constexpr,
    BANDS: tl.constexpr,
):
    """Works on transposed tiles (keys as rows) so P^T and dS^T come out of tl.dot directly,
    with no register transposes; the Shaw terms then gather along axis 0 (or, with BANDS, are read
    from the precomputed bands, as in _bwd_dq_kernel)."""
    n0 = tl.program_id(0) * BN
    bh = tl.program_id(1).to(tl.int64)
    Q += bh * T * D
    K += bh * T * D
    DK += bh * T * D
    V += bh * T * DV
    DO += bh * T * DV
    DV_ += bh * T * DV
    if BANDS:
        RQ += bh * T * n_dist
        RD += bh * T * n_dist
    offs_n = n0 + tl.arange(0, BN)
    offs_d = tl.arange(0, BD)
    offs_dv = tl.arange(0, BDV)
    offs_t = tl.arange(0, BAND)
    col_ok = offs_n < T
    k = tl.load(K + offs_n[:, None] * D + offs_d[None, :],
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(V + offs_n[:, None] * DV + offs_dv[None, :],
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    pick = tl.arange(0, BN)[:, None] - tl.arange(0, BM)[None, :] + (BM - 1)

    # Queries whose window reaches this key tile: blocks b with b*L - F <= j < (b+1)*L + FR.
    n_last = tl.minimum(n0 + BN, T) - 1
    lo = (tl.maximum(n0 - FR, 0) // L) * L
    if CAUSAL:
        lo = tl.maximum(lo, n0)
    hi = tl.minimum(((n_last + F) // L + 1) * L, T)

    dk = tl.zeros([BN, BD], tl.float32)
    dv = tl.zeros([BN, BDV], tl.float32)
    for m0 in range(lo, hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        row_ok = offs_m < T
        qt = tl.load(Q + offs_m[None, :] * D + offs_d[:, None],
                     mask=row_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        do = tl.load(DO + offs_m[:, None] * DV + offs_dv[None, :],
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        lse = tl.load(LSE + bh * T + offs_m, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=row_ok, other=0.0)
        st = _dot(k, qt, DOT)
        dpt = _dot(v, tl.trans(do), DOT)
        if HAS_REL:
            if BANDS:
                bcol = offs_n[:, None] - offs_m[None, :] - dlo  # (keys, queries): distance j - i
                bok = (bcol >= 0) & (bcol < n_dist) & row_ok[None, :] & col_ok[:, None]
                bidx = offs_m.to(tl.int64)[None, :] * n_dist + bcol
                st += tl.load(RQ + bidx, mask=bok, other=0.0).to(tl.float32)
                dpt += tl.load(RD + bidx, mask=bok, other=0.0).to(tl.float32)
            else:
                dmin = n0 - m0 - (BM - 1)
                rk = _band(RK, dmin, M, offs_t, offs_d, D)
                rv = _band(RV, dmin, M, offs_t, offs_dv, DV)
                st += tl.gather(_dot(rk, qt, DOT), pick, axis=0)
                dpt += tl.gather(_dot(rv, tl.trans(do), DOT), pick, axis=0)
        pt = tl.exp2(st * qk_scale - lse[None, :])
        pt = tl.where(_allowed_t(offs_n, offs_m, T, L, F, FR, CAUSAL), pt, 0.0)
        dv += _dot(_cast(pt, do.dtype, DOT), do, DOT)
        dst = pt * (dpt - delta[None, :])
        dk += _dot(_cast(dst, qt.dtype, DOT), tl.trans(qt), DOT)
    tl.store(DK + offs_n[:, None] * D + offs_d[None, :], _cast(dk * scale, DK.dtype.element_ty, DOT),
             mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(DV_ + offs_n[:, None] * DV + offs_dv[None, :], _cast(dv, DV_.dtype.element_ty, DOT),
             mask=col_ok[:, None] & (offs_dv[None, :] < DV))
