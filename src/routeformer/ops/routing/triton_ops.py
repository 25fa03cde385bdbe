"""Routing attention on Triton: index preparation, launchers, custom ops with autograd.

Legend: B batch, H heads, T tokens, D head dim (Dv for values), C clusters, W window,
E query entries, S key slots per (batch, head) (topk: E = S = C*W; nearest: E = S = T).

Layers: `_kernels.py` (Triton) -> launchers here -> `torch.library.custom_op`s `routeformer::routing_fwd`
and `routeformer::routing_bwd` tied together by `register_autograd` (so `torch.compile` treats the
attention as one opaque op, no graph break; eager calls skip the dispatcher, see ops/_dispatch.py)
-> `routing_attention_triton`, called by `routeformer.ops.routing_attention` after validation.

The assignment takes its scores from scores.py like the reference does (same path for the same input)
and applies the same tie rules, so the kernels attend the same (query, key) pairs as the reference. Nothing here synchronises with the host: grids
come from shapes, data-dependent trip counts live inside the kernels.
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

from .._checks import TRITON_DTYPES, TRITON_MAX_ROUTING_HEAD_DIM, gpu_plan
from .. import _dispatch
from .._dispatch import custom_op, with_autograd
from .._ints import cdiv, next_pow2
from .._launch import launch
from . import _kernels as K
from . import _perm_kernels as PK
from . import _select_kernels as SK
from . import scores as scores_mod
from ._score_kernels import score_in_passes
from .assignment import assign_nearest

SUPPORTED_DTYPES = TRITON_DTYPES
MAX_HEAD_DIM = TRITON_MAX_ROUTING_HEAD_DIM

# Tile sizes per device kind; the benchmark may override entries to compare variants.
CONFIG = {
    # (BLOCK_M, BLOCK_N, warps, stages): the fastest of benchmarks/attention.py --sweep 65536 on an H100,
    # and again on an H200 (2026-12-01); combine (BLOCK_T, warps, AHEAD): (32, 4) took 0.856 ms of topk's
    # backward there against 0.891 for (64, 4); AHEAD (entries gathered at once, _combine_kernel) from
    # session 14. H200, 2026-12-02 (`--sweep-parts regs`, NOTES_routing.md):
    # the forward on 2 stages (topk 0.197 -> 0.190 ms, nearest 0.226 -> 0.220) and dk/dv on 32 x 64
    # tiles, 1 stage, 128 registers (MAXNREG) took the backward 0.810 -> 0.727 ms (topk) and 0.781 ->
    # 0.713 (nearest), against (32, 128, 4, 3) at 255 registers (2 programs per SM).
    "cuda": dict(fwd=(64, 64, 4, 2), dq=(64, 64, 4, 3), dkdv=(32, 64, 4, 1), combine=(32, 4, 4)),
    # The interpreter runs tiles as numpy arrays: small tiles exercise the multi-tile paths on tiny T.
    "cpu": dict(fwd=(16, 16, 4, 1), dq=(16, 16, 4, 1), dkdv=(16, 16, 4, 1), combine=(16, 4, 2)),
}

# Per kernel, how the slot (or entry) tiles that every row sees whole skip the per-element mask
# (the kernels' SPLIT): ALL_MASKED, every tile masked; THREE_LOOPS, masked tiles before and after an
# unmasked loop (NOTES_routing.md v8); TILE_BRANCH, one loop in which each tile branches around its
# mask (session 11). Run D (H200, 64k): three loops took dk/dv 479 -> 435 us for topk but made the
# forward (+25..30 us) and dq (+0..38 us) slower than all masked, as their loops run ~5 tiles, too
# few to pipeline three times; TILE_BRANCH keeps one pipelined loop. dk/dv runs on 1 stage (nothing
# to pipeline), and its unmasked loop needs no entry bounds at all, so it keeps three loops. With
# separate keys (SKIP_EMPTY), TILE_BRANCH falls back to all masked tiles and the empty-tile test.
# benchmarks/attention.py --ab switches them ("masked tiles", "unmasked tiles everywhere", "split
# loops", "one-loop dk/dv").
ALL_MASKED, THREE_LOOPS, TILE_BRANCH = 0, 1, 2
SPLIT_TILES = {"fwd": TILE_BRANCH, "dq": TILE_BRANCH, "dkdv": THREE_LOOPS}

# Per attention kernel: whether each loop step reads the next tile's gather indices (key positions in
# the forward and dq, query positions in dk/dv; the kernels' PREFETCH), so that a tile's row gathers
# wait on one memory round trip instead of two. The forward and dq prefetch only in their TILE_BRANCH
# loop, dk/dv in its three loops ("dkdv_direct": nearest's, which writes at token positions).
# H200, 64k, session 14 (A/B, graph fwd+bwd, NOTES_routing.md): topk's dk/dv 338 -> 420 us with it
# (sm_90 SASS: spills in its loops 42 -> 155 under the 128-register budget), the forward unchanged
# (162 us), dq +7 us; nearest 0.865 ms without dk/dv's prefetch against 0.856 with it, 0.847 without
# dq's. So only nearest's dk/dv prefetches. benchmarks/attention.py --ab: "prefetch everywhere".
PREFETCH = {"fwd": False, "dq": False, "dkdv": False, "dkdv_direct": True}

# Whether each forward program runs two entry tiles, p and NTILES - 1 - p (_fwd_kernel's PAIRED).
# Under the causal mask a cluster's entry tiles see 1 .. W / BLOCK_N slot tiles, so pairing the
# lightest with the heaviest gives every program the same work, in half as many programs.
# H200, 64k, session 19 (call 1, kernel profile): forward 156.9 -> 152.4 us (topk), 182.2 -> 178.7
# (nearest). The same pairing in dq and dk/dv was slower (dq 193 -> 203 / 211 -> 228 us, dk/dv
# 287 -> 326 / 331 -> 386: their loops under the 128-register budget), and is not built.
# benchmarks/attention.py --ab: "unpaired forward".
PAIRED_FORWARD = True


# True: the forward and dq read their entry tile's slot band from LO and HI at the tile's first and
# last entries (both are non-decreasing) instead of reducing over the tile (_kernels._entry_band);
# False for benchmarks/attention.py --ab ("band reductions").
SCALAR_BAND = True

# Per attention kernel: a register budget per thread (ptx .maxnreg) on CUDA, or None for the
# compiler's choice. dk/dv at 128 lets 4 programs share an SM (ncu: at 255 registers it ran 2, with
# the schedulers idle two cycles of three). Measured for 16-bit inputs with head dims up to 64 only,
# so only those get it: wider rows or float32 need more registers for the same tiles. A budget binds
# this Triton's code generation; a later Triton may need another (benchmarks/sm90_resources.py shows
# the spills it causes). Nearest's dk/dv ("dkdv_direct", which writes at token positions) spills
# 38-41 stores under 128 on sm_90 against topk's 16-19; the H200 sweep of 2026-12-02 session 7
# (`--sweep-parts dkdv`, NOTES_routing.md) timed its backward at 0.690 ms under 168, 0.693 with no
# budget and 0.712 under 128 (topk: 0.725 under 128, 0.746 under 168, 0.849 with none).
# Session 11 (H200, `--sweep-parts split`): after TILE_BRANCH the forward and dq compiled to 158-168
# registers (ncu), so 3 programs per SM where 128 had allowed 4; under 128 the forward took 0.226 ->
# 0.194 ms (nearest) and 0.191 -> 0.164 (topk) at 64k, the backward 0.684 -> 0.655 and 0.701 -> 0.675.
# Session 12 (H200, `--sweep-parts dkdv`, after the cluster tiles): nearest's backward took 0.572-0.576 ms
# with dk/dv under 128 against 0.591 under 168, so nearest's dk/dv now takes 128 too (whatever Triton 3.9
# spills on sm_90, the device's Triton 3.6 runs it faster).
MAXNREG = {"fwd": 128, "dq": 128, "dkdv": 128, "dkdv_direct": 128}


def _regs(t: torch.Tensor, name: str) -> dict:
    """Launch options for kernel `name`: the register budget, on the GPU path for 16-bit inputs with
    head dims up to 64 only."""
    if MAXNREG.get(name) is None or not gpu_plan(t) or t.element_size() != 2 or t.shape[-1] > 64:
        return {}
    return {"maxnreg": MAXNREG[name]}


# Tests set this to fill fresh buffers with NaN (or -1 for integers), so that unwritten memory shows.
POISON = False


def _new(shape, dtype, device) -> torch.Tensor:
    if not POISON:
        return torch.empty(shape, dtype=dtype, device=device)
    fill = float("nan") if dtype.is_floating_point else -1
    return torch.full(shape, fill, dtype=dtype, device=device)


def _cfg(t: torch.Tensor, name: str):
    return CONFIG["cuda" if gpu_plan(t) else "cpu"][name]


def _precision(t: torch.Tensor) -> str:
    # fp32 inputs get full-precision dots; tf32 would miss the fp32 tolerance by ~1000x.
    if t.dtype == torch.float32:
        return "ieee"
    return "tf32" if gpu_plan(t) else "upcast"  # see _kernels._dot


def _skip_empty(q, k, direct: bool) -> bool:
    """Nearest with separate keys: a query tile's slot band can hold runs no row needs, so test each
    tile. With shared QK the band is at most W + BLOCK_M and the test only costs pipelining."""
    return direct and k.data_ptr() != q.data_ptr()


def _pow2(n: int) -> int:
    return max(16, next_pow2(n))


# ---------------------------------------------------------------------------------------------
# Assignment: exact top-W per cluster without a full sort.


@custom_op("routeformer::topk_compact")
def _topk_compact(scores: torch.Tensor, kth: torch.Tensor, need: torch.Tensor, window: int) -> torch.Tensor:
    B, H, C, T = scores.shape
    out = _new((B, H, C, window), torch.int32, scores.device)
    block_c = 4
    grid = (B * H, cdiv(C, block_c))
    launch(K._topk_compact_kernel, grid, scores, kth, need, out, T, C, window,
           BLOCK_T=256 if gpu_plan(scores) else 16, BLOCK_C=block_c, num_warps=4)
    return out


@_topk_compact.op.register_fake
def _(scores, kth, need, window):
    B, H, C, T = scores.shape
    return scores.new_empty((B, H, C, window), dtype=torch.int32)


@custom_op("routeformer::gather_groups")
def _gather_groups(scores: torch.Tensor, groups: torch.Tensor, group: int) -> torch.Tensor:
    B, H, C, T = scores.shape
    W = groups.shape[-1]
    cand = _new((B, H, C, W * group), torch.float32, scores.device)
    block_w = 64 if gpu_plan(scores) else 16
    launch(K._gather_groups_kernel, (cdiv(W, block_w), B * H * C), scores, groups, cand, T, W,
           GROUP=group, BLOCK_W=block_w, num_warps=4)
    return cand


@_gather_groups.op.register_fake
def _(scores, groups, group):
    B, H, C, _ = scores.shape
    return scores.new_empty((B, H, C, groups.shape[-1] * group))


def _launch_select(rows: torch.Tensor, out: torch.Tensor, w: int, c0: int = 0, groups: torch.Tensor | None = None,
                   group: int = 1, flag: torch.Tensor | None = None) -> None:
    """Top-w indices of each row of rows (B, H, C', L) into out[:, :, c0:c0 + C'] (out (B, H, C, w) int32,
    contiguous); with groups (B, H, C', L // group), the row is gathered from rows (B, H, C', T) scores
    at those groups' positions and out gets positions; with flag (B*H*C',) int32, only the rows flagged
    non-zero (see _select_kernels._select_rows_kernel)."""
    B, H, Cp, n = rows.shape
    L = n if groups is None else groups.shape[-1] * group
    block = next_pow2(L)
    warps = (SELECT_WARPS or min(16, max(4, block // 512))) if gpu_plan(rows) else 4
    launch(SK._select_rows_kernel, (B * H * Cp,), rows, out, rows if groups is None else groups,
           rows if flag is None else flag, L, w, n, Cp, out.shape[2], c0, BLOCK_L=block, GATHER=groups is not None,
           GROUP=group, FLAGGED=flag is not None, num_warps=warps)


def threshold_plan(T: int, w: int, group: int) -> tuple[int, int, int] | None:
    """(SG, NB, CAP) of _threshold_select_kernel for rows of T scores in groups of `group` (None: the
    two-stage select instead): SG groups per first-stage maximum, the largest power of two leaving
    NB = ceil(G / SG) >= 2w of them (so that L1 is about their median and ~1.4w positions reach it);
    CAP = 2 * next_pow2(w) kept groups and positions per row before a row falls back."""
    G = cdiv(T, group)
    if G <= w or w > THRESHOLD_MAX_W:
        return None
    sg = 1
    while cdiv(G, sg * 2) >= 2 * w:
        sg *= 2
    return sg, cdiv(G, sg), 2 * next_pow2(w)


def _launch_threshold_select(s_t: torch.Tensor, gmax: torch.Tensor, out: torch.Tensor, w: int, c0: int,
                             group: int, phases: int = 4) -> torch.Tensor:
    """One pass's top-w positions by _threshold_select_kernel, and the rows it flags (ties) by the
    two-stage select's two kernels, which return at once on every other row (no host sync). Returns the
    flags. phases < 4: the kernel's first phases alone (benchmarks/select_phases.py), no fallback."""
    B, H, Cp, T = s_t.shape
    G = gmax.shape[-1]
    sg, nb, cap = threshold_plan(T, w, group)
    R = B * H * Cp
    dev = s_t.device
    gidx, ekey, epos = (_new((R, cap), torch.int32, dev) for _ in range(3))
    flag = _new((R,), torch.int32, dev)
    gpu = gpu_plan(s_t)
    chunk, warps, stages = THRESHOLD_TILES["cuda" if gpu else "cpu"]
    launch(SK._threshold_select_kernel, (R,), s_t, gmax, out, gidx, ekey, epos, flag, T, G, w, nb, Cp,
           out.shape[2], c0, SG=sg, GROUP=group, BLOCK_NB=next_pow2(nb), BLOCK_G=1024 if gpu else 16,
           CHUNK_G=chunk, CAP=cap, STAGES=stages, PHASES=phases, L1_SLACK=THRESHOLD_L1_SLACK,
           num_warps=warps * max(1, cap // 1024))
    if phases < 4:
        return flag
    if G <= SELECT_ROWS_MAX:
        groups = _new((B, H, Cp, w), torch.int32, dev)
        _launch_select(gmax, groups, w, flag=flag)
    else:  # rows of maxima too long for one program: every row's first stage, the flagged rows' second
        groups = select_top(gmax, w)
    _launch_select(s_t, out, w, c0, groups=groups, group=group, flag=flag)
    return flag


# True: each scoring pass selects through _threshold_select_kernel where threshold_plan allows (the
# two-stage select only for the rows it flags); False: the two-stage select for every row, for
# benchmarks/attention.py --ab. Windows above THRESHOLD_MAX_W take the two-stage select (the kernel
# holds ~4w keys per row in registers).
THRESHOLD_SELECT = True
THRESHOLD_MAX_W = 1024
# (CHUNK_G, warps, stages of the kept-positions loop) of _threshold_select_kernel (warps doubled for CAP
# 2048). On sm_90 (sm90_resources.py, Triton 3.9) 128 groups per chunk on two stages take 80 registers,
# so six programs of 4 warps fit an SM and a pass's 512 rows at T = 64k run at once (one stage: 129
# registers, three per SM). H200, T = 64k (benchmarks/select_phases.py, session 13): 50.5 us per pass
# against 63.6 for (64, 4, 1) and 49.2 for (128, 4, 3). Session 19: training calls select all 1024 rows
# at 64k in one launch (TRAINING_SCORE_BUDGET), more than one wave of 4-warp programs; on 2 warps
# (64, 2, 3) they run at once: 70.8 us against 82.0 for (128, 4, 2), and 47.4 against 48.3 for the 512
# rows of an inference pass (select_phases.py, same bits); A/B graph fwd+bwd at 64k 1.022 against 1.028
# ms ("four-warp threshold select"). The CPU chunk exercises the loop.
THRESHOLD_TILES = {"cuda": (64, 2, 3), "cpu": (4, 4, 1)}
# How far below the W-th largest first-stage maximum the threshold select's first bound may stop (in
# float32 ulps, _select_kernels._kth_key's SLACK): a row's maxima at T = 64k span ~2**23 keys, so 4095
# halves its ~23 bisection steps; a bound ~5e-4 relative lower keeps a few more candidate positions. The
# selection is exact either way. 0: the exact W-th maximum, for benchmarks/attention.py --ab ("exact
# first bound"); benchmarks/select_phases.py times phase 1 with both.
THRESHOLD_L1_SLACK = 4095


# Warps of the one-row select kernel; None: one per 512 of the row (4 to 16). benchmarks/attention.py
# --sweep times others: fewer warps per row let two rows' programs share an SM.
SELECT_WARPS: int | None = None


@custom_op("routeformer::select_rows")
def _select_rows(rows: torch.Tensor, w: int) -> torch.Tensor:
    B, H, C, L = rows.shape
    out = _new((B, H, C, w), torch.int32, rows.device)
    _launch_select(rows, out, w)
    return out


@_select_rows.op.register_fake
def _(rows, w):
    return rows.new_empty((*rows.shape[:3], w), dtype=torch.int32)


# Rows up to this long go through the one-kernel select (a whole row in registers), longer ones
# through torch.topk + a compaction scan.
SELECT_ROWS_MAX = 8192


def select_top(rows: torch.Tensor, w: int) -> torch.Tensor:
    """rows (B, H, C, L) float32 -> (B, H, C, w) int32 indices of the w largest, ascending, ties to the
    lower index. -0.0 and +0.0 compare equal, as in the reference's stable sort. Short rows: one kernel
    per row; long rows: torch.topk finds the w-th largest value, one in-order scan takes every larger
    value and the first `need` equal ones."""
    if rows.shape[-1] <= SELECT_ROWS_MAX:
        return _select_rows(rows.contiguous(), w)
    top = rows.topk(w, dim=-1, sorted=False).values
    kth = top.amin(dim=-1).contiguous()
    need = (top == kth[..., None]).sum(dim=-1, dtype=torch.int32).contiguous()
    return _topk_compact(rows, kth, need, w)


# "groups": two small top-k's (H100, T=64k: see benchmarks/RESULTS.md); "full": torch.topk over whole
# rows of T scores (3.0 ms at T=64k), kept for comparison in benchmarks/attention.py --sweep.
TOPK_SELECT = "groups"

# False: each pass's second stage gathers candidates and maps them to positions with a separate kernel
# and torch ops (before NOTES_routing.md v8), for benchmarks/attention.py --ab.
FUSED_CANDIDATES = True

# Clusters scored per pass of topk_index; None: as many as keep the float32 scores of one pass no
# larger than `budget` times x (see cluster_chunk). Tests set a small number to exercise several passes.
CLUSTER_CHUNK: int | None = None
# The budget (float32 scores of one pass over the size of x) of a call that will run a backward: its
# backward's own peak holds ~4x the size of x anyway (topk, shared QK: the output, per-entry dq and dv,
# the summed dq), so a forward transient of 4x does not raise the fwd+bwd peak, while a call without
# one keeps 2x (the forward's per-entry output and result). At T = 64k (H = 8, D = 64, bf16) that is
# one pass of all 128 clusters instead of two of 4 heads, at 128k two passes instead of four. H200,
# 64k, session 18 (A/B "inference scoring passes", graph fwd+bwd): 1.032 against 1.048 ms, the fwd+bwd
# peak 288 against 274 MiB (dense 388). 2: as without a backward, for benchmarks/attention.py --ab.
TRAINING_SCORE_BUDGET = 4


def cluster_chunk(x: torch.Tensor, C: int, budget: int = 2) -> int:
    """Clusters per scoring pass: the (B, H, C, T) float32 scores grow as T^2 / W (256 MiB at T = 64k,
    H = 8, W = 512, 4x the bf16 input), so topk_index scores the clusters in passes whose scores are at
    most `budget` times the size of x (D * itemsize * budget / 4 clusters): 2, about what the
    attention's per-entry output and result take after it, or TRAINING_SCORE_BUDGET; more passes would
    re-read x more often and launch more kernels for no lower peak. Each pass starts at a multiple of
    the score kernel's cluster tile, so it runs the very tiles of a whole-C launch and gets the same bits."""
    from ._score_kernels import tiles

    block_c = tiles(x)[1]
    chunk = CLUSTER_CHUNK or (x.shape[-1] * x.element_size() * budget // 4)
    return min(C, max(block_c, chunk // block_c * block_c))


# True: where one pass may not hold every cluster's scores of every batch-head (cluster_chunk < C) but
# does hold all clusters of some batch-heads, topk_index scores whole-C passes over blocks of batch-heads
# (rows_per_pass) instead of cluster chunks over all of them. Same scores in the same bytes per pass,
# but each pass reads its batch-heads' x once (the cluster passes each read all of x) and each program
# reuses its x tile and LayerNorm statistics for all cluster tiles. On an H200 at T = 64k the whole-C
# scoring took 0.142 ms against 2 x 0.081 in two cluster passes (session 16's tile sweep). False: the
# cluster passes, for benchmarks/attention.py --ab ("cluster passes").
HEAD_PASSES = True
# Batch-heads per scoring pass; None: as HEAD_PASSES decides. Tests set it to exercise several passes.
ROWS_PER_PASS: int | None = None


def scoring_passes(x: torch.Tensor, C: int, budget: int = 2) -> tuple[int | None, int]:
    """(batch-heads per pass, None for all of them; clusters per pass) of topk_index's scoring passes,
    never holding more scores at once than cluster_chunk's passes over all batch-heads would."""
    B, H = x.shape[:2]
    chunk = cluster_chunk(x, C, budget)
    if ROWS_PER_PASS is not None:
        return ROWS_PER_PASS, chunk
    if HEAD_PASSES and CLUSTER_CHUNK is None and chunk < C:
        rows = B * H * chunk // C
        if rows >= 1:
            return (None if rows >= B * H else rows), C
    return None, chunk


def _select_from_scores(s_t: torch.Tensor, gmax: torch.Tensor | None, w: int) -> torch.Tensor:
    """(B, H, C', T) float32 scores and their group maxima (None: computed here) -> (B, H, C', w)
    int32 top-w positions; the two stages of topk_index."""
    group = scores_mod.GROUP
    T = s_t.shape[-1]
    G = cdiv(T, group)
    if TOPK_SELECT == "full" or G <= w:
        return select_top(s_t, w)
    if gmax is None:
        gmax = F.pad(s_t, (0, G * group - T), value=float("-inf")).unflatten(-1, (G, group)).amax(-1)
    groups = select_top(gmax, w)
    pick = select_top(_gather_groups(s_t, groups, group), w)
    return groups.gather(-1, pick // group) * group + pick % group


def _select_pass(s_t: torch.Tensor, gmax: torch.Tensor, w: int, out: torch.Tensor, c0: int) -> None:
    """One scoring pass's top-w positions (scores s_t (B, H, C', T), group maxima gmax) written into
    out[:, :, c0:c0 + C']: by the threshold select where threshold_plan allows, else the top-w groups,
    then one kernel that gathers their positions' scores and selects among them (rows too long for one
    kernel, and TOPK_SELECT "full", take _select_from_scores)."""
    group = scores_mod.GROUP
    T = s_t.shape[-1]
    G = cdiv(T, group)
    if TOPK_SELECT == "full" or not FUSED_CANDIDATES or (T if G <= w else w * group) > SELECT_ROWS_MAX:
        out[:, :, c0:c0 + s_t.shape[2]] = _select_from_scores(s_t, gmax, w)
    elif G <= w:  # every group would be kept: select from the whole row
        _launch_select(s_t, out, w, c0)
    elif THRESHOLD_SELECT and threshold_plan(T, w, group) is not None:
        _launch_threshold_select(s_t, gmax, out, w, c0, group)
    else:
        _launch_select(s_t, out, w, c0, groups=select_top(gmax, w), group=group)


@custom_op("routeformer::topk_index")
def _topk_index_fused(x: torch.Tensor, centroids: torch.Tensor, window: int, budget: int = 2) -> torch.Tensor:
    """topk_index on the fused score kernel: one op for all scoring passes, each writing its clusters'
    rows of the one output (no concatenation)."""
    B, H, T, _ = x.shape
    C = centroids.shape[1]
    w = min(window, T)
    out = _new((B, H, C, w), torch.int32, x.device)
    rows, chunk = scoring_passes(x, C, budget)

    def select(r0, c0, s_t, gmax):  # a pass over some batch-heads writes their rows of out
        dest = out if rows is None else out.view(1, B * H, C, w).narrow(1, r0, s_t.shape[1])
        _select_pass(s_t, gmax, w, dest, c0)

    score_in_passes(x, centroids, chunk, select, rows)
    return out


@_topk_index_fused.op.register_fake
def _(x, centroids, window, budget=2):
    B, H, T, _ = x.shape
    return x.new_empty((B, H, centroids.shape[1], min(window, T)), dtype=torch.int32)


def topk_index(x: torch.Tensor, centroids: torch.Tensor, window: int, budget: int = 2) -> torch.Tensor:
    """(B, H, C, W) int32 positions, equal to assignment.topk_positions of the same scores.

    Two stages, exact: split each cluster's row of T scores into groups of GROUP positions and keep
    the W groups with the highest maxima (ordering elements by (score, -position), as the reference's
    stable sort does, each group's maximum element is unique). Every element of another group has W
    larger elements (the W kept maxima), so the top W all lie in the kept groups: the second stage
    takes the top W of those W*GROUP candidates, which sit in position order. On CUDA the scores are
    made in passes (`scoring_passes`: blocks of batch-heads against all clusters, or all batch-heads
    against chunks of clusters), so the scores alive at once never outgrow `budget` times the size of x
    (cluster_chunk).
    """
    if not scores_mod.use_fused(x):
        # The formula path (CPU, interpreter tests) scores all clusters in one matmul, as the
        # reference does: a matmul over fewer columns may round differently.
        return _select_from_scores(scores_mod.assignment_scores(x, centroids, fused=False), None,
                                   min(window, x.shape[2]))
    return _topk_index_fused(x, centroids, window, budget)


# ---------------------------------------------------------------------------------------------
# Index structures shared by both modes (see _kernels.py).


def _topk_indices(q, k, centroids, window, causal, budget=2):
    qi = topk_index(q, centroids, window, budget)
    ki = qi if k is q else topk_index(k, centroids, window, budget)
    B, H, C, W = qi.shape
    flat = lambda t: t.reshape(B * H, C * W).contiguous()  # noqa: E731
    if k is q or not causal:
        # Shared QK: a cluster's positions are distinct and ascending, so query rank r sees key ranks
        # 0..r; no causal mask: the whole cluster.
        lo, hi = topk_slot_bounds(qi, B * H, C * W, W, causal)
        return flat(qi), lo, hi, flat(ki), _no_tiles(q)
    # Keys of a cluster are sorted by position: the ones a query may see are a prefix.
    base = (torch.arange(C, device=q.device, dtype=torch.int32) * W)[:, None]
    hi = base + torch.searchsorted(ki, qi, right=True, out_int32=True)
    return flat(qi), flat(base.expand(B, H, C, W)), flat(hi), flat(ki), _no_tiles(q)


def _no_tiles(t: torch.Tensor) -> torch.Tensor:
    """The cluster tiles' placeholder: fixed tiles of BLOCK entries."""
    return t.new_empty((0,), dtype=torch.int32)


def _nearest_indices(q, k, centroids, window):
    B, H, T, _ = q.shape
    if k is q:
        return _nearest_indices_shared(q, centroids, window)
    flat = lambda t: t.reshape(B * H, T).to(torch.int32).contiguous()  # noqa: E731
    a = assign_nearest(q, k, centroids, window)
    pos = torch.arange(T, device=q.device)
    q_order = (a.query_cluster * T + pos).sort(dim=-1).indices
    lo = a.key_start.gather(2, q_order)
    hi = a.key_end.gather(2, q_order)
    return flat(q_order), flat(lo), flat(hi), flat(a.key_order), _no_tiles(q)


def _nearest_indices_shared(x, centroids, window):
    """Shared QK: what assign_nearest gives, derived in slot order with fewer and cheaper kernels.

    A stable sort of the cluster ids alone orders tokens by (cluster, position), as assign_nearest's
    sort of cluster * T + position does, but on 8- or 16-bit keys (a quarter or an eighth of the radix
    passes of int64). Slot s of that order holds query order[s], which is also key s, so its keys end
    at slot s + 1 and start at max(first slot of its cluster, s + 1 - window)."""
    B, H, T, _ = x.shape
    C = centroids.shape[1]
    if COUNTING_SORT and C <= COUNTING_SORT_MAX_C and scores_mod.use_fused(x):
        qpos, lo, hi, tiles = _nearest_slots_counting(x, centroids, window)
        return qpos, lo, hi, qpos, tiles
    small = torch.uint8 if C <= 256 else (torch.int16 if C <= 2**15 else torch.int32)
    sorted_cluster, order = scores_mod.nearest_clusters(x, centroids).to(small).sort(dim=-1, stable=True)
    sorted_cluster, order = sorted_cluster.reshape(B * H, T), order.reshape(B * H, T)
    cluster_first = count_below(sorted_cluster, C, 1, 0, C, False)  # (BH, C) first slot of each
    qpos, lo, hi = nearest_slot_bounds(order, sorted_cluster, cluster_first, window)
    return qpos, lo, hi, qpos, _no_tiles(x)


# Shared-QK nearest slots by a counting sort in two small kernels (the score kernel counts each tile's
# clusters; NOTES_routing.md v8) instead of a radix sort of the cluster ids, a boundary search and the
# bounds kernel; the per-tile counts are (B*H, T / 64, C) int32, so only for C up to this many. False:
# the sort, for benchmarks/attention.py --ab.
COUNTING_SORT = True
COUNTING_SORT_MAX_C = 256
# Shared-QK nearest on the counting sort: entry and slot tiles cut per cluster (no tile holds two
# clusters; _kernels._write_cluster_tiles) instead of every BLOCK entries. False: fixed tiles, for
# benchmarks/attention.py --ab ("fixed tiles").
CLUSTER_TILES = True
# Warps of the counting sort's slot kernel (64-position tiles). On an H200 at T = 64k (session 10,
# `--sweep-parts slots`, runs/h200_2026-12-02_slots_sweep.txt) argmax + cumsum + slots took 0.141 ms on
# 1 warp against 0.150 on 2, 0.161 on 4 (the earlier default) and 0.178 on 8; ncu had the 4-warp
# kernel at 88% of L1 throughput (its (64, 64) rank matrix crosses warps).
SLOT_WARPS = 1


@custom_op("routeformer::nearest_slots_counting")
def _nearest_slots_counting(x: torch.Tensor, centroids: torch.Tensor, window: int
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qpos, lo, hi), each (B*H, T) int32: the shared-QK nearest slots, equal to those of the stable
    sort of the cluster ids (see _kernels._nearest_slots_kernel), on the fused score kernel; and the
    cluster tiles (B*H, cluster_tile_count(T, C), 2) int32 of the attention kernels
    (_kernels._write_cluster_tiles), or an empty tensor where CLUSTER_TILES is off."""
    from ._score_kernels import count_tile, fused_argmax_counts

    B, H, T, _ = x.shape
    cluster, counts = fused_argmax_counts(x, centroids)
    # One flat scan (a single cub pass; a scan along a middle dim ran ~0.37 ms at T = 64k on an H200).
    # Its totals reach B*H*T, so int64 past int32's range.
    cum = torch.cumsum(counts.view(-1), dim=0, dtype=torch.int32 if B * H * T < 2**31 else torch.int64)
    qpos, lo, hi = (_new((B * H, T), torch.int32, x.device) for _ in range(3))
    block_t = count_tile(x)
    c_bins, nb = counts.shape[1], counts.shape[2]
    tiles = _new((B * H, cluster_tile_count(x, T, centroids.shape[1]), 2) if CLUSTER_TILES else (0,),
                 torch.int32, x.device)
    launch(K._nearest_slots_kernel, (nb, B * H), cluster, counts, cum, qpos, lo, hi, tiles if CLUSTER_TILES else qpos,
           T, nb, window, tiles.shape[1] if CLUSTER_TILES else 0,
           BLOCK_T=block_t, C_BINS=c_bins, TILE_BM=cluster_tile(x) if CLUSTER_TILES else 0, num_warps=SLOT_WARPS)
    return qpos, lo, hi, tiles


@_nearest_slots_counting.op.register_fake
def _(x, centroids, window):
    B, H, T, _ = x.shape
    tiles = x.new_empty((B * H, cluster_tile_count(x, T, centroids.shape[1]), 2) if CLUSTER_TILES else (0,),
                        dtype=torch.int32)
    return (*(x.new_empty((B * H, T), dtype=torch.int32) for _ in range(3)), tiles)


# Entries per cluster tile: CONFIG's forward and dq entry tiles and dk/dv's slot tile. A constant of its
# own, not read from CONFIG, so that a list made under one CONFIG is never run by kernels whose tiles a
# changed CONFIG made smaller than its tiles (rows past a kernel's tile would go uncomputed): a kernel
# whose tile differs from this runs on fixed tiles instead (see _tiled).
CLUSTER_TILE = {"cuda": 64, "cpu": 16}


def cluster_tile(t: torch.Tensor) -> int:
    """Entries per cluster tile on t's device kind (CLUSTER_TILE)."""
    return CLUSTER_TILE["cuda" if gpu_plan(t) else "cpu"]


def cluster_tile_count(t: torch.Tensor, T: int, C: int) -> int:
    """Tiles per row of the cluster tiles: enough for any cluster sizes (each of the C clusters adds
    at most one partial tile to ceil(T / tile))."""
    return cdiv(T, cluster_tile(t)) + C


def _tiled(tiles: torch.Tensor, t: torch.Tensor, block: int) -> bool:
    """Whether a kernel of entry (or slot) tiles of `block` runs on the cluster tiles."""
    return tiles.numel() > 0 and block == cluster_tile(t)


def _bounds(R: int, N: int, W: int, causal: bool, dev, block: int, order=None, group=None, first=None):
    nearest = order is not None
    lo, hi = _new((R, N), torch.int32, dev), _new((R, N), torch.int32, dev)
    qpos = _new((R, N), torch.int32, dev) if nearest else lo
    launch(K._slot_bounds_kernel, (cdiv(N, block), R),
           order if nearest else lo, group if nearest else lo, first if nearest else lo, qpos, lo, hi,
           N, first.shape[1] if nearest else 1, W, NEAREST=nearest, CAUSAL=causal, BLOCK=block, num_warps=4)
    return (qpos, lo, hi) if nearest else (lo, hi)


@custom_op("routeformer::topk_slot_bounds")
def topk_slot_bounds(like: torch.Tensor, R: int, N: int, W: int, causal: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(lo, hi), each (R, N) int32 on like's device: the key-slot range of every (cluster, rank) entry
    of clusters of W, shared QK (see _kernels._slot_bounds_kernel)."""
    return _bounds(R, N, W, causal, like.device, 1024 if gpu_plan(like) else 16)


@topk_slot_bounds.op.register_fake
def _(like, R, N, W, causal):
    return like.new_empty((R, N), dtype=torch.int32), like.new_empty((R, N), dtype=torch.int32)


@custom_op("routeformer::nearest_slot_bounds")
def nearest_slot_bounds(order: torch.Tensor, group: torch.Tensor, first: torch.Tensor, W: int
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(qpos, lo, hi), each (R, N) int32, shared QK nearest: order (R, N) int64 the sort of the cluster
    ids, group (R, N) the sorted ids, first (R, C) int32 each cluster's first slot."""
    R, N = order.shape
    return _bounds(R, N, W, True, order.device, 1024 if gpu_plan(order) else 16, order, group, first)


@nearest_slot_bounds.op.register_fake
def _(order, group, first, W):
    return tuple(order.new_empty(order.shape, dtype=torch.int32) for _ in range(3))


@custom_op("routeformer::count_below")
def count_below(x: torch.Tensor, m: int, step: int, offset: int, limit: int, right: bool) -> torch.Tensor:
    """x (R, N) integer rows sorted ascending -> (R, m) int32 torch.searchsorted(x, v, right=right) for
    v_i = min(i * step + offset, limit), i < m; one kernel (see _kernels._count_below_kernel)."""
    R, N = x.shape
    out = _new((R, m), torch.int32, x.device)
    block = 256  # also under the interpreter, where each program costs milliseconds (C = 40000 tested)
    launch(K._count_below_kernel, (cdiv(m, block), R), x, out, N, m, step, offset, limit, RIGHT=right,
           BLOCK=block, STEPS=max(1, N.bit_length()), num_warps=4)
    return out


@count_below.op.register_fake
def _(x, m, step, offset, limit, right):
    return x.new_empty((x.shape[0], m), dtype=torch.int32)


def tile_entry_ranges(lo: torch.Tensor, hi: torch.Tensor, nt: int, bn: int, S: int, nearest_window: int = 0,
                      tiles: torch.Tensor | None = None):
    """(qlo, qhi, flo, fhi), each (R, nt) int32: for key tile i (slots [i * bn, min(i * bn + bn, S)), or
    with tiles (R, nt, 2) the cluster tile [tiles[:, i, 0], tiles[:, i, 1]); see _nearest_slots_counting),
    the entries [qlo, qhi) that see one of its slots and [flo, fhi) that see all of them; lo and hi
    (R, N) are non-decreasing in the entry (see _kernels._tile_entry_ranges_kernel). nearest_window W > 0:
    entry e is slot e, hi = e + 1 and lo = max(first slot of e's cluster, e + 1 - W) (shared-QK nearest
    slots of window W; shared-QK causal topk slots of clusters of at most W), which bounds the searches
    by W (on an H200 at T = 64k the four whole-row searches took 17 us for nearest, 16 for topk). Called
    inside routing_bwd only, so a plain function rather than a custom op."""
    R, N = lo.shape
    out = _new((4, R, nt), torch.int32, lo.device)
    block = 256
    # A window past the row bounds nothing more than the row does (and v + W must stay inside int32).
    w = min(nearest_window, N) if nearest_window > 0 else N
    launch(K._tile_entry_ranges_kernel, (cdiv(nt, block), R), lo, hi, lo if tiles is None else tiles,
           out[0], out[1], out[2], out[3], N, nt, bn, S, max(w, 1), BLOCK=block, STEPS=max(1, w.bit_length()),
           NEAREST=nearest_window > 0, TILED=tiles is not None, num_warps=4)
    return out.unbind(0)


def _inverse(pos: torch.Tensor, T: int, run: int = 0):
    """pos (BH, E) positions -> (perm, rowptr): entries sorted by position (ties by entry) and CSR row
    pointers. run > 0 (topk): the entries are clusters of `run` distinct positions each, and the
    permutation comes from their membership bits (_perm_kernels) instead of a stable sort."""
    if run > 0 and COUNTING_INVERSE:
        return _inverse_by_membership(pos, T, run)
    sorted_pos, perm = pos.sort(dim=-1, stable=True)
    rowptr = count_below(sorted_pos, T + 1, 1, 0, T, False)  # entries at positions < t
    return perm.to(torch.int32).contiguous(), rowptr


# True: topk's dq kernel also writes each entry's log-sum-exp plus log2(n) (n: the keyed entries of its
# token, the scatter-mean's divisor; +2 MiB at 64k), and dk/dv recomputes p from that, so p carries the
# 1/n already: no per-step gather of INV_N at the entries' tokens and no multiply of the tile (sm_90
# SASS of its unmasked loop 296 -> 238 instructions, spills 26 -> 8). dk and dv round differently (one
# exponent instead of exponent and product); dq and the forward are unchanged.
# Measured in this form in session 16 (H200, runs/h200_2026-12-03_s16_*): dk/dv 331 -> 286 us at 64k,
# dq 184 -> 192 us (the extra store), topk graph fwd+bwd 1.116 -> 1.080 ms, memory 336 -> 338 MiB.
# Session 15 had tried the fold in the forward's combine instead (in place of LSE): the same dk/dv gain
# but that combine went 50 -> ~107 us. False: dk/dv multiplies by 1/n per step, for
# benchmarks/attention.py --ab ("1/n multiplies"); tests/ops/test_routing_triton.py checks both agree.
MEAN_IN_LSE = True

# True: topk's per-token index from cluster membership bits (three small kernels and a prefix sum);
# False: from torch.sort, for benchmarks/attention.py --ab ("sorted inverse").
COUNTING_INVERSE = True


def _inverse_by_membership(pos: torch.Tensor, T: int, run: int):
    R, E = pos.shape
    nw = cdiv(cdiv(E, run), 32)
    dev = pos.device
    member = torch.zeros((R, T, nw), dtype=torch.int32, device=dev)
    block = 1024 if gpu_plan(pos) else 32
    launch(PK._membership_kernel, (cdiv(E, block), R), pos, member, E, run, T, nw, BLOCK=block, num_warps=4)
    counts = _new((R, T + 1), torch.int32, dev)
    block_t = 256 if gpu_plan(pos) else 16
    launch(PK._entry_counts_kernel, (cdiv(T, block_t), R), member, counts, E, T, nw, BLOCK_T=block_t,
           BLOCK_W=next_pow2(nw), num_warps=4)
    rowptr = torch.cumsum(counts.view(-1), dim=0, dtype=torch.int32).view(R, T + 1)
    del counts
    perm = _new((R, E), torch.int32, dev)
    launch(PK._entry_perm_kernel, (cdiv(E, block // 2), R), pos, member, rowptr, perm, E, run, T, nw,
           BLOCK=block // 2, BLOCK_W=next_pow2(nw), num_warps=4)
    return perm, rowptr


# ---------------------------------------------------------------------------------------------
# Launchers.


def _placeholders(q):
    """Distinct empty outputs (custom ops may not return aliases) for the unused direct-mode slots."""
    return (q.new_empty(0), q.new_empty(0, dtype=torch.float32),
            q.new_empty(0, dtype=torch.int32), q.new_empty(0, dtype=torch.int32))


def _s4(t):
    return t.stride(0), t.stride(1), t.stride(2)


# Whether head dims equal to their power-of-two tiles let the attention kernels drop the column
# masks (EVEN_D). Session 11: sm_90 SASS 499 -> 460 instructions per forward tile; on the H200 nearest's
# dk/dv 414 -> 365 us at 64k (graph fwd+bwd 0.969 -> 0.922 ms). The ab variant "head-dim masks" turns it off.
FOLD_EVEN_D = True


def _even_d(D: int, Dv: int) -> bool:
    return FOLD_EVEN_D and D == _pow2(D) and Dv == _pow2(Dv)


def _row64(*ts) -> bool:
    """Whether the attention kernels must offset gathered rows in int64: a (B, H, T, D) tensor whose
    rows (position * stride(2) + column, batch and head offsets aside) may pass 2**31 elements."""
    return any(t.shape[2] * t.stride(2) + t.shape[3] >= 2**31 for t in ts)


def _combine(x, perm, rowptr, lo, hi, T, mean, out_dtype):
    B, H, E, Dx = x.shape
    y = _new((B, H, T, Dx), out_dtype, x.device)
    inv_n = _new((B * H, T), torch.float32, x.device) if mean else y
    block_t, warps, ahead = _cfg(x, "combine")
    grid = (cdiv(T, block_t), B * H)
    launch(K._combine_kernel, grid, x, perm, rowptr, lo, hi, y, inv_n,
           *_s4(x), *_s4(y), H, T, E, Dx,
           BLOCK_T=block_t, BLOCK_D=_pow2(Dx), MEAN=mean, AHEAD=ahead, num_warps=warps)
    return y, (inv_n if mean else None)


def attention_fwd(q, k, v, qpos, lo, hi, kpos, tiles, scale: float, direct: bool):
    """The in-cluster attention kernel alone -> (o (B,H,T,Dv) if direct else (B,H,E,Dv), lse (BH,E))."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    E, S = qpos.shape[1], kpos.shape[1]
    lse = _new((B * H, E), torch.float32, q.device)
    o = _new((B, H, T if direct else E, Dv), q.dtype, q.device)
    bm, bn, warps, stages = _cfg(q, "fwd")
    tiled = _tiled(tiles, q, bm)
    n_tiles = tiles.shape[1] if tiled else cdiv(E, bm)
    grid = (cdiv(n_tiles, 2) if PAIRED_FORWARD else n_tiles, B * H)
    launch(K._fwd_kernel, grid, q, k, v, qpos, lo, hi, kpos, tiles if tiled else qpos, o, lse,
           *_s4(q), *_s4(k), *_s4(v), *_s4(o),
           H, E, S, D, Dv, n_tiles, scale * math.log2(math.e),
           BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
           DIRECT=direct, SKIP_EMPTY=_skip_empty(q, k, direct), PRECISION=_precision(q),
           SPLIT=SPLIT_TILES["fwd"], ROW64=_row64(q, k, v, o), EVEN_D=_even_d(D, Dv), TILED=tiled,
           PREFETCH=PREFETCH["fwd"], SCALAR_BAND=SCALAR_BAND, PAIRED=PAIRED_FORWARD, num_warps=warps,
           num_stages=stages,
           **_regs(q, "fwd"))
    return o, lse


def routing_indices(q, k, centroids, window: int, causal: bool, assign: str, score_budget: int = 2):
    """The assignment as the kernels consume it -> (qpos, lo, hi, kpos), each (BH, E or S) int32, and
    the cluster tiles (BH, NT, 2) int32 or an empty tensor (see _nearest_slots_counting). score_budget:
    topk's scoring passes' (cluster_chunk)."""
    with torch.no_grad():
        if assign == "topk":
            return _topk_indices(q, k, centroids, window, causal, score_budget)
        return _nearest_indices(q, k, centroids, window)


@custom_op("routeformer::routing_fwd")
def _routing_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor, kpos: torch.Tensor, tiles: torch.Tensor, scale: float, direct: bool,
                 shared: bool, window: int = 0, run: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (out (B,H,T,Dv), o_entries, lse (BH,E), inv_n (BH,T), perm (BH,E), rowptr (BH,T+1)).

    direct (nearest): o_entries, inv_n, perm and rowptr are empty placeholders. shared (k is q) is
    only recorded for the backward: identity of inputs is not visible through torch.compile. window
    too: W > 0 says that entry e is slot e with HI = e + 1 and LO = max(first slot of its cluster,
    e + 1 - W) (shared-QK nearest; shared-QK causal topk, whose clusters hold at most W), which bounds
    the backward's searches of tile_entry_ranges; 0: nothing known. run (topk): entries per cluster,
    for the per-token index (_inverse); 0: not known (a sort).
    """
    T = q.shape[2]
    o_e, lse = attention_fwd(q, k, v, qpos, lo, hi, kpos, tiles, scale, direct)
    if direct:
        o_ph, n_ph, p_ph, r_ph = _placeholders(q)
        return o_e, o_ph, lse, n_ph, p_ph, r_ph
    perm, rowptr = _inverse(qpos, T, run)
    out, inv_n = _combine(o_e, perm, rowptr, lo, hi, T, True, q.dtype)
    return out, o_e, lse, inv_n, perm, rowptr


@_routing_fwd.op.register_fake
def _(q, k, v, qpos, lo, hi, kpos, tiles, scale, direct, shared, window=0, run=0):
    B, H, T, _ = q.shape
    Dv, E = v.shape[-1], qpos.shape[1]
    out = q.new_empty((B, H, T, Dv))
    lse = q.new_empty((B * H, E), dtype=torch.float32)
    if direct:
        o_ph, n_ph, p_ph, r_ph = _placeholders(q)
        return out, o_ph, lse, n_ph, p_ph, r_ph
    return (out, q.new_empty((B, H, E, Dv)), lse, q.new_empty((B * H, T), dtype=torch.float32),
            q.new_empty((B * H, E), dtype=torch.int32), q.new_empty((B * H, T + 1), dtype=torch.int32))


# topk's per-entry outputs o_e (the size of q) serve the backward's dq kernel alone (for delta), so an
# eager backward frees them right after it, unless the graph is kept for another backward
# (retain_graph=True): the context holds them in a list rather than through save_for_backward, whose
# references live until the backward returns. H200, 64k, session 18 (A/B "keep entry outputs", graph
# fwd+bwd): the peak 338 -> 274 MiB, the time unchanged (1.057 against 1.059 ms). Summing dq and dv in
# one combine launch at the old peak instead (both per-token sums alive at once) took 1.064 ms: the
# combine is bound by its bytes, not by the index reads the two sums would share (~106 us against
# 2 x 51), so that variant was removed.
RELEASE_ENTRY_OUTPUTS = True


def _saved_tensor_hooks_active() -> bool:
    """Whether saved-tensor hooks are installed (activation checkpointing, torch.autograd.graph.save_on_cpu):
    they see only what save_for_backward saves, so o_e must go through it; True where torch cannot tell."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if top is None:
        return True
    try:
        return top(False) is not None
    except (TypeError, RuntimeError):
        return True


def _keep_graph() -> bool:
    """Whether the running backward keeps the graph for another (retain_graph=True), so that what it saved
    must survive; True where this torch cannot tell."""
    query = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    if query is None:
        return True
    try:
        return bool(query())
    except RuntimeError:  # not inside a backward
        return True


def _routing_bwd_impl(dout, q, k, v, out, entry_outputs: list, lse, inv_n, qpos, lo, hi, kpos, tiles, perm,
                      rowptr, scale: float, direct: bool, shared: bool, window: int, run: int):
    """The backward (see routing_bwd). entry_outputs: [o_e] (topk), which this empties once the dq kernel
    has read it: o_e is freed there if nothing else holds it."""
    B, H, T, D = q.shape
    Dv = v.shape[-1]
    E, S = qpos.shape[1], kpos.shape[1]
    dev = q.device
    dout = dout.contiguous() if dout.stride(-1) != 1 else dout
    prec = _precision(q)
    sl2 = scale * math.log2(math.e)
    # Per-entry gradients are summed per token later; fp32 inputs keep fp32 partial sums.
    part = torch.float32 if q.dtype == torch.float32 else q.dtype
    delta = _new((B * H, E), torch.float32, dev)
    o_rows = out if direct else entry_outputs[0]
    inv = lse if direct else inv_n  # placeholder pointer when unused
    dq = _new((B, H, T, D), q.dtype, dev) if direct else _new((B, H, E, D), part, dev)
    # topk: the log-sum-exp with the scatter-mean's log2(n) added, written by dq for dk/dv (MEAN_IN_LSE)
    fold = MEAN_IN_LSE and not direct
    lse_w = _new((B * H, E), torch.float32, dev) if fold else lse
    bm, bn, warps, stages = _cfg(q, "dq")
    tiled = _tiled(tiles, q, bm)
    n_dq = tiles.shape[1] if tiled else cdiv(E, bm)
    launch(K._bwd_dq_kernel, (n_dq, B * H),
           q, k, v, dout, o_rows, lse, inv, qpos, lo, hi, kpos, tiles if tiled else qpos, delta, dq, lse_w,
           *_s4(q), *_s4(k), *_s4(v), *_s4(dout), *_s4(o_rows), *_s4(dq),
           H, T, E, S, D, Dv, n_dq, scale, sl2,
           BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
           DIRECT=direct, SKIP_EMPTY=_skip_empty(q, k, direct), PRECISION=prec, SPLIT=SPLIT_TILES["dq"],
           ROW64=_row64(q, k, v, dout, o_rows, dq), EVEN_D=_even_d(D, Dv), TILED=tiled, PREFETCH=PREFETCH["dq"],
           SCALAR_BAND=SCALAR_BAND, MEAN_IN_LSE=fold, num_warps=warps, num_stages=stages, **_regs(q, "dq"))
    # Nothing below reads o_e: if the caller let go of it, it is freed here (stream order keeps the
    # memory from being reused before the kernel above has read it).
    del o_rows
    entry_outputs.clear()

    bm, bn, warps, stages = _cfg(q, "dkdv")
    tiled = _tiled(tiles, q, bn)
    nt = tiles.shape[1] if tiled else cdiv(S, bn)
    qlo, qhi, flo, fhi = tile_entry_ranges(lo, hi, nt, bn, S, window, tiles if tiled else None)
    # Shared QK: entry e and slot e are the same (cluster, rank) or token, so the dk/dv kernel adds
    # dk into the dq buffer in place and one buffer holds the whole gradient of q.
    if direct:
        dk = dq if shared else _new((B, H, T, D), q.dtype, dev)
        dv = _new((B, H, T, Dv), q.dtype, dev)
    else:
        dk = dq if shared else _new((B, H, S, D), part, dev)
        dv = _new((B, H, S, Dv), part, dev)
    launch(K._bwd_dkdv_kernel, (nt, B * H),
           q, k, v, dout, lse_w, inv, delta, qpos, lo, hi, kpos, tiles if tiled else qpos, qlo, qhi, flo, fhi, dk, dv,
           *_s4(q), *_s4(k), *_s4(v), *_s4(dout), *_s4(dk), *_s4(dv),
           H, T, E, S, nt, D, Dv, scale, sl2,
           BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=_pow2(D), BLOCK_DV=_pow2(Dv),
           DIRECT=direct, ADD_DK=shared, PRECISION=prec, SPLIT=SPLIT_TILES["dkdv"],
           ROW64=_row64(q, k, v, dout, dk, dv), EVEN_D=_even_d(D, Dv), TILED=tiled, PREFETCH=PREFETCH["dkdv_direct" if direct else "dkdv"],
           MEAN_IN_LSE=fold, num_warps=warps, num_stages=stages, **_regs(q, "dkdv_direct" if direct else "dkdv"))
    empty = q.new_empty(0)
    if direct:
        return dq, (empty if shared else dk), dv
    # Each per-entry buffer is dropped as soon as it is summed per token, so that the partials and the
    # summed gradients are never all alive at once (peak memory).
    kperm, krowptr = (perm, rowptr) if shared else _inverse(kpos, T, run)
    dq_t = _combine(dq, perm, rowptr, lo, hi, T, False, q.dtype)[0]
    del dq
    if shared:
        del dk  # the same buffer as dq
    dv_t = _combine(dv, kperm, krowptr, lo, hi, T, False, q.dtype)[0]
    del dv
    if shared:
        return dq_t, empty, dv_t
    return dq_t, _combine(dk, kperm, krowptr, lo, hi, T, False, q.dtype)[0], dv_t


@custom_op("routeformer::routing_bwd")
def _routing_bwd(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                 o_e: torch.Tensor, lse: torch.Tensor, inv_n: torch.Tensor, qpos: torch.Tensor, lo: torch.Tensor,
                 hi: torch.Tensor, kpos: torch.Tensor, tiles: torch.Tensor, perm: torch.Tensor,
                 rowptr: torch.Tensor, scale: float, direct: bool, shared: bool, window: int = 0, run: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (dq, dk, dv); with shared QK dq already holds dk and dk is an empty placeholder. window, run:
    see routing_fwd. (The caller's o_e stays alive: a custom op cannot free its inputs.)"""
    return _routing_bwd_impl(dout, q, k, v, out, [o_e], lse, inv_n, qpos, lo, hi, kpos, tiles, perm, rowptr,
                             scale, direct, shared, window, run)


@_routing_bwd.op.register_fake
def _(dout, q, k, v, out, o_e, lse, inv_n, qpos, lo, hi, kpos, tiles, perm, rowptr, scale, direct, shared,
      window=0, run=0):
    # The real op returns fresh contiguous tensors; empty_like would keep a transposed input's strides.
    return q.new_empty(q.shape), (q.new_empty(0) if shared else k.new_empty(k.shape)), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, qpos, lo, hi, kpos, tiles, scale, direct, shared, *extra = inputs
    out, o_e, lse, inv_n, perm, rowptr = output
    # Eager topk: o_e held in a list that the backward may empty (RELEASE_ENTRY_OUTPUTS); traced, or
    # under saved-tensor hooks (which must see it to drop or move it), saved.
    ctx.entry_outputs = ([o_e] if RELEASE_ENTRY_OUTPUTS and not direct and not _dispatch.tracing()
                         and not _saved_tensor_hooks_active() else None)
    ctx.save_for_backward(q, k, v, out, lse if ctx.entry_outputs else o_e, lse, inv_n, qpos, lo, hi, kpos,
                          tiles, perm, rowptr)
    ctx.scale, ctx.direct = scale, direct
    ctx.window, ctx.run = (list(extra) + [0, 0])[:2]
    ctx.n_inputs = len(inputs)
    # Shared QK: one gradient (dq + dk), summed by the kernels instead of autograd.
    ctx.shared = shared
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, dout, *_unused):
    if dout is None:  # only the non-differentiable outputs were used
        return (None,) * ctx.n_inputs
    q, k, v, out, o_e, lse, inv_n, qpos, lo, hi, kpos, tiles, perm, rowptr = ctx.saved_tensors
    held = ctx.entry_outputs
    if held is not None:
        if not held:
            raise RuntimeError("routing attention (topk): this graph's backward already ran and freed its "
                               "per-entry outputs; pass retain_graph=True to the first backward to run another, "
                               "or set routeformer.ops.routing.triton_ops.RELEASE_ENTRY_OUTPUTS = False")
        o_e = held[0]
    args = (lse, inv_n, qpos, lo, hi, kpos, tiles, perm, rowptr, ctx.scale, ctx.direct, ctx.shared, ctx.window,
            ctx.run)
    if held is not None and not _dispatch.tracing():
        # Give the kernels the context's own list unless another backward will need o_e again.
        keep = _keep_graph()
        del o_e
        dq, dk, dv = _routing_bwd_impl(dout, q, k, v, out, list(held) if keep else held, *args)
    else:
        dq, dk, dv = _routing_bwd(dout, q, k, v, out, o_e, *args)
    return (dq, (None if ctx.shared else dk), dv) + (None,) * (ctx.n_inputs - 3)


_routing = with_autograd(_routing_fwd, _backward, _setup_context)


def check_triton_inputs(q: torch.Tensor, v: torch.Tensor) -> None:
    """Raise a clear error for inputs the kernels do not cover (the reference handles them)."""
    if not (q.is_cuda or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on CPU): use "
                         "backend='reference' or move q, k, v and the centroids to a GPU")
    if q.dtype not in SUPPORTED_DTYPES or v.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"backend='triton' supports {SUPPORTED_DTYPES}, got {q.dtype}: cast the inputs or use "
                        "backend='reference'")
    for name, d in (("D", q.shape[-1]), ("Dv", v.shape[-1])):
        if d > MAX_HEAD_DIM:
            raise ValueError(f"backend='triton' supports head dims up to {MAX_HEAD_DIM}, got {name}={d}: use "
                             "backend='reference'")


def routing_attention_triton(q, k, v, centroids, *, window, causal, assign, scale):
    """Triton routing attention; arguments already validated by routing_attention."""
    check_triton_inputs(q, v)
    shared = k is q
    q, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, v))
    k = q if shared else (k if k.stride(-1) == 1 else k.contiguous())
    # A call that will run a backward may score in larger passes (TRAINING_SCORE_BUDGET): its backward's
    # peak is larger anyway.
    backward = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    qpos, lo, hi, kpos, tiles = routing_indices(q, k, centroids, window, causal, assign,
                                                TRAINING_SCORE_BUDGET if backward else 2)
    # The slot structure that bounds tile_entry_ranges' searches (see routing_fwd): shared QK, and for
    # topk causal (without the mask a cluster's entries all see the whole cluster).
    band = window if shared and (assign == "nearest" or causal) else 0
    run = 0 if assign == "nearest" else qpos.shape[1] // centroids.shape[1]  # topk: W (or T) per cluster
    return _routing(q, k, v, qpos, lo, hi, kpos, tiles, scale, assign == "nearest", shared, band, run)[0]
