"""The fused routing-score kernel and its custom ops; see scores.py for what it computes and why.

Legend: B batch, H heads, T tokens, D head dim, C clusters, G = ceil(T / GROUP) groups.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._checks import gpu_plan
from .._dispatch import custom_op
from .._ints import cdiv, next_pow2
from .._launch import launch
from . import scores  # scores.GROUP is read at each call so tests can shrink it

_EPS = 1e-5  # kmeans.normalize's LayerNorm epsilon
# (BLOCK_T, BLOCK_C, warps) of the scoring passes (topk), for head dims up to 64; benchmarks/attention.py
# --sweep (part "scores") and benchmarks/score_pass.py time alternatives (session 17, whole-C passes of
# 4 heads at 64k: this tile on 2 stages 76.0 us, 76.9-83.4 on the others). BLOCK_T is a multiple of
# scores.GROUP. The interpreter runs each program as numpy: small C tiles exercise the C loop. On an H200 at T = 64k (2026-12-02,
# session 8, runs/h200_2026-12-02_7655994_scores_sweep.txt) the whole-C bf16-split pass took 0.160 ms on
# (128, 32, 4) against 0.191 on run D's (64, 32, 4); (128, 64, 8) 0.166.
TILES = {"cuda": (128, 32, 4), "cpu": (64, 16, 4)}
# The same for nearest's argmax (no scores written). On an H200 at T = 64k (run D's sweep) the
# bf16-split argmax alone took 0.113 ms at (128, 64, 4) against 0.143 at (64, 32, 4), but then the
# counting sort's slot kernel ranked the whole 128-position score tile and took 80 us against 47, so
# the whole fwd+bwd did not move. Now the kernel counts each COUNT_TILE positions' clusters separately
# and the slot kernel ranks 64 positions whatever the score tile is. The CPU tile spans two count
# tiles, so that the interpreter tests cover the split. Session 8's sweep: argmax + counts 0.126 ms
# here, 0.133-0.205 on the other seven tiles.
ARGMAX_TILES = {"cuda": (128, 64, 4), "cpu": (128, 16, 4)}
# Head dims above 64, both passes: the tiles the GPU tests passed with at 96 and 128. There (128, 64)
# asked for 256 KiB of shared memory, more than an H200 has (GPU tests, 2026-12-02 session 7).
WIDE_TILES = {"cuda": (64, 32, 4), "cpu": (64, 16, 4)}
COUNT_TILE = 64
# bf16 argmax without the scores (nearest): the argmax of x . (c - mean(c)), no LayerNorm statistics of x
# (see _scores_kernel, CENTRED). Measured by benchmarks/attention.py --sweep (part "argmax").
CENTRED_ARGMAX = True
# bf16 inputs: the centroids' three bf16 pieces (and their row sums) made once per call by
# _centroid_pieces_kernel, instead of by every program of the scoring kernel for every cluster tile.
# At T = 64k every program split the same (C, D) centroids again: ~470 of the argmax loop's 971 SASS
# instructions per 64-cluster tile (benchmarks/sm90_resources.py, Triton 3.9; the loop is now 510), in
# a kernel bound by instruction issue (ncu, session 8). On an H200 at T = 64k (session 12, call 1,
# runs/h200_2026-12-02_presplit-*): argmax + counts 0.110 -> 0.090 ms, graph fwd+bwd nearest 0.911 ->
# 0.892 ms and topk 1.384 -> 1.366 (A/B "in-kernel centroid split"). (Session 8's torch version, before
# the centred argmax, lost: five small kernels and an argmax then bound by the LayerNorm statistics.)
# The pieces equal the in-kernel ones up to the order sum(c) is reduced in.
PRESPLIT_CENTROIDS = True
# Pipeline stages of the scoring kernel on pre-split pieces: each stage holds a cluster tile's three bf16
# pieces (6 bytes per element against the float32 tile's 4), so three stages of the argmax's 64-cluster
# tile took 88 KiB of shared memory, two programs per SM, where the in-kernel split ran three on 72.
# Two stages: 64 KiB (sm90_resources.py); argmax + counts 0.090 ms against 0.095 at three (same call).
PRESPLIT_STAGES = 2

# bf16 inputs: score with three bf16 products on x as it is (see _scores_kernel, bf16x3) instead of
# tf32x3 on the normalised rows (NOTES_routing.md v8). On an H200 at T = 64k (run D's A/B) graph
# fwd+bwd took topk 1.617 ms with it against 1.703 without, nearest 1.192 against 1.261;
# benchmarks/attention.py --ab variant "tf32x3 scores" switches it off.
BF16_SPLIT_SCORES = True


@triton.jit
def _bf16_pieces(c):
    """c = c1 + c2 + c3 in bf16 pieces: each rounding leaves a residual exact in float32, and the three
    hold c to ~2**-27 (benchmarks/NOTES_routing.md v8)."""
    c1 = c.to(tl.bfloat16)
    r1 = c - c1.to(tl.float32)
    c2 = r1.to(tl.bfloat16)
    c3 = (r1 - c2.to(tl.float32)).to(tl.bfloat16)
    return c1, c2, c3


@triton.jit
def _piece_products(x, c1, c2, c3, PRECISION: tl.constexpr):
    """(BLOCK_T, BLOCK_C) x . (c1 + c2 + c3) for bf16 rows x and bf16 pieces (BLOCK_C, BLOCK_D): a bf16 x
    bf16 product is exact in float32, so the three products carry float32's rounding. "bf16x3-upcast":
    the same products in fp32 (the CPU interpreter of triton 3.9 mis-multiplies bf16 tiles)."""
    if PRECISION == "bf16x3-upcast":
        xf = x.to(tl.float32)
        acc = tl.dot(xf, tl.trans(c3.to(tl.float32)), input_precision="ieee")
        acc = tl.dot(xf, tl.trans(c2.to(tl.float32)), acc, input_precision="ieee")
        acc = tl.dot(xf, tl.trans(c1.to(tl.float32)), acc, input_precision="ieee")
    else:
        acc = tl.dot(x, tl.trans(c3))  # smallest pieces first
        acc = tl.dot(x, tl.trans(c2), acc)
        acc = tl.dot(x, tl.trans(c1), acc)
    return acc


@triton.jit
def _centred(cent, dmask, D):
    """c - mean(c) per centroid row, head-dim padding left 0, and the row sums of c."""
    csum = tl.sum(cent, axis=1)
    return tl.where(dmask[None, :], cent - csum[:, None] / D, 0.0), csum


@triton.jit
def _centroid_pieces_kernel(CENT, PIECES, CSUM, R, D, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
                            CENTRED: tl.constexpr):
    """The three bf16 pieces of BLOCK_R float32 centroid rows (of R = H * C): PIECES (3, R, D) bf16 and
    CSUM (R,) float32 their row sums. CENTRED: the pieces of c - mean(c) (_scores_kernel, CENTRED)."""
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    mask = (offs_r < R)[:, None] & dmask[None, :]
    at = offs_r[:, None] * D + offs_d[None, :]
    cent = tl.load(CENT + at, mask=mask, other=0.0)
    if CENTRED:
        c, csum = _centred(cent, dmask, D)
    else:
        c = cent
        csum = tl.sum(cent, axis=1)
    c1, c2, c3 = _bf16_pieces(c)
    tl.store(PIECES + at, c1, mask=mask)
    tl.store(PIECES + R * D + at, c2, mask=mask)
    tl.store(PIECES + 2 * R * D + at, c3, mask=mask)
    tl.store(CSUM + offs_r, csum, mask=offs_r < R)


@triton.jit
def _scores_kernel(
    X, CENT, PIECES, CSUM, S_T, GMAX, AMAX, COUNTS,
    sxb, sxh, sxt, H, T, C, C_BEGIN, C_COUNT, BH_BEGIN, D, G, eps,
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr, GROUP_SIZE: tl.constexpr,
    WRITE: tl.constexpr, ARGMAX: tl.constexpr, PRECISION: tl.constexpr, COUNT_BINS: tl.constexpr,
    COUNT_T: tl.constexpr, CENTRED: tl.constexpr, PRESPLIT: tl.constexpr, EVEN_C: tl.constexpr,
    STORE_SCORES: tl.constexpr = True,
):
    """One tile of BLOCK_T positions of one (batch, head) against centroids C_BEGIN .. C_BEGIN+C_COUNT-1.

    Program (i, j) scores batch-head BH_BEGIN + j (b * H + h) of X; BH_BEGIN > 0 only with WRITE.
    WRITE: S_T (BH', C_COUNT, T) float32 scores and GMAX (BH', C_COUNT, G) the max over each GROUP_SIZE
    positions, for the BH' batch-heads of the grid. A chunk that starts at a multiple of BLOCK_C runs
    exactly the tiles of the whole-C launch, and any BH_BEGIN the same tiles of its batch-heads, so their
    scores are the same bits (triton_ops.topk_index relies on it).
    ARGMAX: AMAX (BH, T) int64, the first cluster of highest score (torch.argmax's tie rule); with
    COUNT_BINS (a power of two >= C) also COUNTS (BH, COUNT_BINS, cdiv(T, COUNT_T)) int32, how many of
    each COUNT_T positions chose each cluster (the counting sort of triton_ops._nearest_indices_shared;
    BLOCK_T is a multiple of COUNT_T).
    PRECISION "tf32x3" on GPU: three tf32 tensor-core products, ~1e-7 relative error like fp32, while
    "ieee" fp32 dots ran at 12 TFLOP/s (0.74 ms at T=64k, H100), slower than the formula's matmul.
    "bf16x3" (bf16 x, BF16_SPLIT_SCORES): the scores as rstd * (x . c - mean * sum(c)), the LayerNorm
    folded out of the product so the tensor cores take x as it is, with c in three bf16 pieces
    (_bf16_pieces, _piece_products): float32's rounding, at the price of the cancellation in the
    subtraction, ~|mean| / std of extra relative error (benchmarks/NOTES_routing.md v8).
    CENTRED (ARGMAX without WRITE, bf16x3): the argmax of x . (c - mean(c)). Because
    (x - mean(x)) . c = x . (c - mean(c)), that is LayerNorm(x) . c up to each row's positive factor
    rstd: the same argmax, with no statistics of x and no cancellation against mean(x).
    PRESPLIT (bf16x3): the pieces of c (or of c - mean(c)) and sum(c) come ready in PIECES (3, H*C, D)
    and CSUM (H*C,) from _centroid_pieces_kernel (PRESPLIT_CENTROIDS); otherwise they are made here.
    EVEN_C: C_COUNT is a multiple of BLOCK_C, so no cluster tile has padding for the argmax to mask.
    STORE_SCORES False (WRITE, for benchmarks/score_pass.py only): GMAX alone, to time the S_T stores.
    """
    pid = tl.program_id(0)
    bh = BH_BEGIN + tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_t = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = offs_t < T
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    x_in = tl.load(X + b.to(tl.int64) * sxb + h.to(tl.int64) * sxh + offs_t[:, None].to(tl.int64) * sxt
                   + offs_d[None, :], mask=tmask[:, None] & dmask[None, :], other=0.0)
    if not CENTRED:
        x = x_in.to(tl.float32)
        mean = tl.sum(x, axis=1) / D
        xc = tl.where(dmask[None, :], x - mean[:, None], 0.0)
        var = tl.sum(xc * xc, axis=1) / D
        rstd = 1.0 / tl.sqrt(var + eps)
        xn = xc * rstd[:, None]
    best = tl.full([BLOCK_T], float("-inf"), dtype=tl.float32)
    best_c = tl.zeros([BLOCK_T], dtype=tl.int32)
    row0 = tl.program_id(1).to(tl.int64) * C_COUNT - C_BEGIN
    c_end = C_BEGIN + C_COUNT
    for c0 in range(C_BEGIN, c_end, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        cmask = offs_c < c_end
        at = (h * C + offs_c[:, None]).to(tl.int64) * D + offs_d[None, :]
        cdmask = cmask[:, None] & dmask[None, :]
        if PRECISION == "bf16x3" or PRECISION == "bf16x3-upcast":
            if PRESPLIT:
                HCD = H * C * D
                c1 = tl.load(PIECES + at, mask=cdmask, other=0.0)
                c2 = tl.load(PIECES + HCD + at, mask=cdmask, other=0.0)
                c3 = tl.load(PIECES + 2 * HCD + at, mask=cdmask, other=0.0)
                if not CENTRED:
                    csum = tl.load(CSUM + h * C + offs_c, mask=cmask, other=0.0)
            else:
                cent = tl.load(CENT + at, mask=cdmask, other=0.0)
                if CENTRED:
                    c1, c2, c3 = _bf16_pieces(_centred(cent, dmask, D)[0])
                else:
                    c1, c2, c3 = _bf16_pieces(cent)
                    csum = tl.sum(cent, axis=1)
            s = _piece_products(x_in, c1, c2, c3, PRECISION)
            if not CENTRED:
                s = rstd[:, None] * (s - mean[:, None] * csum[None, :])
        else:
            cent = tl.load(CENT + at, mask=cdmask, other=0.0)
            s = tl.dot(xn, tl.trans(cent), input_precision=PRECISION)
        if WRITE:
            rows = (row0 + offs_c)[None, :]
            if STORE_SCORES:
                tl.store(S_T + rows * T + offs_t[:, None], s, mask=tmask[:, None] & cmask[None, :])
            NG: tl.constexpr = BLOCK_T // GROUP_SIZE
            gmax = tl.max(tl.reshape(tl.where(tmask[:, None], s, float("-inf")), [NG, GROUP_SIZE, BLOCK_C]), axis=1)
            offs_g = pid * NG + tl.arange(0, NG)
            tl.store(GMAX + rows * G + offs_g[:, None], gmax, mask=(offs_g[:, None] < G) & cmask[None, :])
        if ARGMAX:
            if not EVEN_C:
                s = tl.where(cmask[None, :], s, float("-inf"))
            tile_best, tile_c = tl.max(s, axis=1, return_indices=True, return_indices_tie_break_left=True)
            better = tile_best > best  # strict: an equal score in a later tile keeps the lower cluster
            best_c = tl.where(better, tile_c + c0, best_c)
            best = tl.where(better, tile_best, best)
    if ARGMAX:
        tl.store(AMAX + bh.to(tl.int64) * T + offs_t, best_c.to(tl.int64), mask=tmask)
        NSUB: tl.constexpr = BLOCK_T // COUNT_T
        if COUNT_BINS > 0 and NSUB == 1:
            # One count tile per score tile (on the GPU: head dims above 64): the code the GPU tests passed
            # before count tiles existed. tl.histogram without its mask argument (not in every Triton we run
            # on): the positions past T count as cluster 0 and are taken back out of bin 0.
            bins = tl.arange(0, COUNT_BINS)
            hist = tl.histogram(tl.where(tmask, best_c, 0), COUNT_BINS)
            n_pad = BLOCK_T - tl.minimum(T - pid * BLOCK_T, BLOCK_T)
            hist = hist - tl.where(bins == 0, n_pad, 0)
            # (BH, COUNT_BINS, tiles): cluster-major, so one flat cumsum gives each (cluster, tile) its
            # first slot (triton_ops._nearest_slots_counting).
            nt = tl.num_programs(0)
            tl.store(COUNTS + (bh.to(tl.int64) * COUNT_BINS + bins) * nt + pid, hist)
        elif COUNT_BINS > 0:
            # One histogram for the tile's NSUB count tiles: position i goes to bin
            # (i // COUNT_T) * COUNT_BINS + cluster; the positions past T count in bin 0 and are taken
            # back out of it.
            key = (tl.arange(0, BLOCK_T) // COUNT_T) * COUNT_BINS + best_c
            hist = tl.histogram(tl.where(tmask, key, 0), NSUB * COUNT_BINS)
            n_pad = BLOCK_T - tl.minimum(T - pid * BLOCK_T, BLOCK_T)
            hist = tl.reshape(hist - tl.where(tl.arange(0, NSUB * COUNT_BINS) == 0, n_pad, 0), [NSUB, COUNT_BINS])
            # (BH, COUNT_BINS, count tiles): cluster-major, so one flat cumsum gives each (cluster, count
            # tile) its first slot (triton_ops._nearest_slots_counting).
            n_count = tl.cdiv(T, COUNT_T)
            sub = pid * NSUB + tl.arange(0, NSUB)
            bins = tl.arange(0, COUNT_BINS)
            tl.store(COUNTS + (bh.to(tl.int64) * COUNT_BINS + bins[None, :]) * n_count + sub[:, None], hist,
                     mask=(sub < n_count)[:, None])


def tiles(x: torch.Tensor, argmax: bool = False) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_C, warps) the kernel runs with for x: the scoring passes', or argmax's; rows wider
    than 64 take WIDE_TILES in both (and the one-count-tile histogram code)."""
    table = (ARGMAX_TILES if argmax else TILES) if x.shape[-1] <= 64 else WIDE_TILES
    block_t, block_c, warps = table["cuda" if gpu_plan(x) else "cpu"]
    if x.shape[-1] > 128:  # keep the (BLOCK_T x D) and (BLOCK_C x D) fp32 tiles in registers
        block_t, block_c = min(block_t, 32), min(block_c, 32)
    return block_t, block_c, warps


def count_tile(x: torch.Tensor) -> int:
    """Positions per cluster count of fused_argmax_counts (and per slot-kernel program)."""
    return min(COUNT_TILE, tiles(x, argmax=True)[0])


def _precision(x: torch.Tensor) -> str:
    if BF16_SPLIT_SCORES and x.dtype == torch.bfloat16:
        return "bf16x3" if gpu_plan(x) else "bf16x3-upcast"
    return "tf32x3" if gpu_plan(x) else "ieee"


def _centroid_pieces(x: torch.Tensor, cent: torch.Tensor, centred: bool, argmax: bool):
    """(pieces (3, H*C, D) bf16, csum (H*C,) float32) of float32 centroids cent (H, C, D) for the
    scoring kernel's launches on x (see _centroid_pieces_kernel)."""
    H, C, D = cent.shape
    _, block_c, warps = tiles(x, argmax=argmax)
    pieces = torch.empty((3, H * C, D), dtype=torch.bfloat16, device=x.device)
    csum = torch.empty((H * C,), dtype=torch.float32, device=x.device)
    # The scoring kernel's cluster tile and warps: the row sums reduce in the same order as there.
    launch(_centroid_pieces_kernel, (cdiv(H * C, block_c),), cent, pieces, csum, H * C, D,
           BLOCK_R=block_c, BLOCK_D=max(16, next_pow2(D)), CENTRED=centred, num_warps=warps)
    return pieces, csum


def _launch(x: torch.Tensor, centroids: torch.Tensor, write: bool, argmax: bool, c_begin: int = 0,
            c_count: int | None = None, count_bins: int = 0, pieces=None, store_scores: bool = True,
            bh_begin: int = 0, bh_count: int | None = None):
    """The scoring kernel on clusters [c_begin, c_begin + c_count); pieces: _centroid_pieces' result
    for these centroids where the caller has it (several scoring passes), else made here if used.
    store_scores False: the scores are not written (see _scores_kernel; a measurement, not a result).
    bh_begin, bh_count (write only): score batch-heads [bh_begin, bh_begin + bh_count) of the flattened
    (B * H) rows alone; the scores and maxima are then (1, bh_count, c_count, .)."""
    B, H, T, D = x.shape
    bh_count = B * H - bh_begin if bh_count is None else bh_count
    if (bh_begin, bh_count) != (0, B * H) and (argmax or not 0 <= bh_begin < bh_begin + bh_count <= B * H):
        raise ValueError(f"scoring batch-heads [{bh_begin}, {bh_begin} + {bh_count}) of {B * H}: only the "
                         "scores (write, not argmax) take a batch-head range, inside [0, B * H)")
    rows = (B, H) if bh_count == B * H else (1, bh_count)
    C = centroids.shape[1]
    c_count = C - c_begin if c_count is None else c_count
    if x.stride(-1) != 1:
        x = x.contiguous()
    cent = centroids.float().contiguous()
    G = cdiv(T, scores.GROUP)
    dev = x.device
    s_t = torch.empty((*rows, c_count, T) if write else (0,), dtype=torch.float32, device=dev)
    gmax = torch.empty((*rows, c_count, G) if write else (0,), dtype=torch.float32, device=dev)
    amax = torch.empty((B, H, T) if argmax else (0,), dtype=torch.int64, device=dev)
    block_d = max(16, next_pow2(D))
    block_t, block_c, warps = tiles(x, argmax=argmax)
    count_t = count_tile(x) if count_bins else block_t  # (a constant where unused: no extra compilations)
    if block_t % count_t:
        raise ValueError(f"score tile {block_t} is not a multiple of the count tile {count_t} (ARGMAX_TILES)")
    grid = (cdiv(T, block_t), bh_count)
    precision = _precision(x)
    counts = torch.empty((B * H, count_bins, cdiv(T, count_t)) if count_bins else (0,), dtype=torch.int32,
                         device=dev)
    split = precision.startswith("bf16x3")
    centred = CENTRED_ARGMAX and argmax and not write and split
    presplit = PRESPLIT_CENTROIDS and split
    if presplit:
        pieces, csum = pieces if pieces is not None else _centroid_pieces(x, cent, centred, argmax)
    else:
        pieces = csum = cent  # unread
    launch(_scores_kernel, grid, x, cent, pieces, csum, s_t, gmax, amax, counts, x.stride(0), x.stride(1),
           x.stride(2), H, T, C, c_begin, c_count, bh_begin, D, G, _EPS,
           BLOCK_T=block_t, BLOCK_C=block_c, BLOCK_D=block_d, GROUP_SIZE=scores.GROUP,
           WRITE=write, ARGMAX=argmax, PRECISION=precision, COUNT_BINS=count_bins,
           COUNT_T=count_t, CENTRED=centred, PRESPLIT=presplit, EVEN_C=c_count % block_c == 0,
           STORE_SCORES=store_scores, num_warps=warps,
           num_stages=PRESPLIT_STAGES if presplit else 3)
    return s_t, gmax, amax, counts


@custom_op("routeformer::fused_scores")
def fused_scores(x: torch.Tensor, centroids: torch.Tensor, c_begin: int = 0, c_count: int = -1
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, H, T, D), centroids (H, C, D) -> (scores (B, H, C', T), group maxima (B, H, C', G)), float32,
    for the C' = c_count clusters from c_begin on (c_count -1: all the rest). A c_begin that is a
    multiple of `tiles(x)[1]` gives the same bits as the matching rows of the whole-C call."""
    C = centroids.shape[1]
    if not (0 <= c_begin < C and (c_count == -1 or 1 <= c_count <= C - c_begin)):
        raise ValueError(f"fused_scores: clusters [{c_begin}, {c_begin} + {c_count}) are not inside [0, {C})")
    s_t, gmax, _, _ = _launch(x, centroids, write=True, argmax=False, c_begin=c_begin,
                              c_count=None if c_count == -1 else c_count)
    return s_t, gmax


def score_in_passes(x: torch.Tensor, centroids: torch.Tensor, chunk: int, consume, rows: int | None = None) -> None:
    """consume(r0, c0, scores, group maxima) for each scoring pass: batch-heads [r0, r0 + rows) of the
    flattened (B * H) (rows None: all of them, r0 = 0, scores (B, H, ., .); else (1, rows, ., .)) against
    clusters [c0, c0 + chunk), the clusters fastest, with the centroid pieces made once for all passes.
    Each pass's scores are dropped before the next pass allocates its own (a loop over a generator
    would hold two: 128 MiB more at T = 64k). For use inside a custom op (triton_ops.topk_index), where
    no tracer sees it."""
    B, H = x.shape[:2]
    C = centroids.shape[1]
    cent = centroids.float().contiguous()
    pieces = None
    if PRESPLIT_CENTROIDS and _precision(x).startswith("bf16x3"):
        pieces = _centroid_pieces(x, cent, centred=False, argmax=False)
    step = B * H if rows is None else rows
    for r0 in range(0, B * H, step):
        for c0 in range(0, C, chunk):
            consume(r0, c0, *_launch(x, cent, write=True, argmax=False, c_begin=c0, c_count=min(chunk, C - c0),
                                     pieces=pieces, bh_begin=r0, bh_count=min(step, B * H - r0))[:2])


@fused_scores.op.register_fake
def _(x, centroids, c_begin=0, c_count=-1):
    B, H, T, _ = x.shape
    n = centroids.shape[1] - c_begin if c_count == -1 else c_count
    G = (T + scores.GROUP - 1) // scores.GROUP
    return x.new_empty((B, H, n, T), dtype=torch.float32), x.new_empty((B, H, n, G), dtype=torch.float32)


@custom_op("routeformer::fused_argmax")
def fused_argmax(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), centroids (H, C, D) -> (B, H, T) int64 argmax cluster, no scores kept."""
    return _launch(x, centroids, write=False, argmax=True)[2]


@fused_argmax.op.register_fake
def _(x, centroids):
    return x.new_empty(x.shape[:3], dtype=torch.int64)


@custom_op("routeformer::fused_argmax_counts")
def fused_argmax_counts(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fused_argmax and, per count_tile(x) positions, how many chose each cluster:
    (B, H, T) int64 and (B*H, next_pow2(C), cdiv(T, count_tile(x))) int32."""
    _, _, amax, counts = _launch(x, centroids, write=False, argmax=True, count_bins=next_pow2(centroids.shape[1]))
    return amax, counts


@fused_argmax_counts.op.register_fake
def _(x, centroids):
    B, H, T, _ = x.shape
    n = (T + count_tile(x) - 1) // count_tile(x)
    return (x.new_empty(x.shape[:3], dtype=torch.int64),
            x.new_empty((B * H, next_pow2(centroids.shape[1]), n), dtype=torch.int32))

