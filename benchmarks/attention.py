"""One run measures every attention claim: routing (ours, topk and nearest) against dense SDPA, the PyPI
peer `routing-transformer` 1.6.1 KmeansAttention and a plain gather + SDPA baseline; local attention
(ours) against FlexAttention with the same sliding-window block mask, and ours with the Shaw
relative-position tables the paper presets use (FlexAttention cannot express their value term).

Setting (the issue's): bf16, B=1, H=8, D=64, window 512, causal, C = T / 512 clusters, shared QK (k is q,
the model's default for causal LMs) for every routing row unless the row says "sep-k"; local attention
with block (query_shape) 256 and flange 256. Times are medians of CUDA-event timings
(triton.testing.do_bench); memory is the peak allocated above the inputs (q, k, v, dout, centroids).

    PYTHONPATH=src python benchmarks/attention.py [--T 4096,8192,...] [--out results.json] [--md table.md]

"fwd" runs without autograd recording (inference); "fwd+bwd" records and back-propagates dout.
TFLOP/s counts useful FLOPs of the in-cluster attention kernel alone: causal, 2*T*W*D*H per forward.
assign% is the assignment's share of our forward time.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import sys
import traceback

import torch
import torch.nn.functional as F

B, H, D, WINDOW, BLOCK, FLANGE = 1, 8, 64, 512, 256, 256
DTYPE = torch.bfloat16


def _bench(fn, grads=()):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, grad_to_none=list(grads), return_mode="median")


def _bench_graph(fn):
    """fn's GPU time alone: captured once in a CUDA graph (after a warm-up that compiles its kernels)
    and timed as replays, so a slow host launching many small kernels does not show."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return _bench(graph.replay)


def _peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _inputs(T, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda: torch.randn(B, H, T, D, device="cuda", dtype=DTYPE, generator=g).requires_grad_()  # noqa: E731
    q, k, v = mk(), mk(), mk()
    dout = torch.randn(B, H, T, D, device="cuda", dtype=DTYPE, generator=g)
    centroids = torch.nn.functional.normalize(torch.randn(H, T // WINDOW, D, device="cuda", generator=g), dim=-1)
    return q, k, v, dout, centroids


# Each maker returns f(q, k, v) -> out for given inputs; the harness times f and f + backward.

def _ours(assign, shared=True):
    from routeformer.ops import routing_attention

    def make(T, centroids):
        def f(q, k, v):
            return routing_attention(q, q if shared else k, v, centroids, window=WINDOW, causal=True,
                                     assign=assign, backend="triton")
        return f
    return make


def _dense(T, centroids):
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, q, v, is_causal=True)
    return f


def _gather_sdpa(T, centroids):
    """Plain PyTorch routing: torch.topk, gathered copies, SDPA per cluster, scatter-mean."""
    from routeformer.ops.kmeans import routing_scores

    def f(q, k, v):
        with torch.no_grad():
            scores = routing_scores(q, centroids)  # (B, H, T, C)
            idx = scores.transpose(2, 3).topk(WINDOW, dim=-1).indices.sort(dim=-1).values  # (B, H, C, W)
        C = idx.shape[2]
        flat = idx.reshape(B, H, C * WINDOW, 1).expand(-1, -1, -1, D)
        qc = q.gather(2, flat).view(B * H * C, 1, WINDOW, D)
        vc = v.gather(2, flat).view(B * H * C, 1, WINDOW, D)
        # Shared QK: a cluster's keys are its queries, sorted by position, so causal is is_causal.
        oc = F.scaled_dot_product_attention(qc, qc, vc, is_causal=True).view(B, H, C * WINDOW, D)
        out = torch.zeros(B, H, T, D, device=q.device, dtype=torch.float32).scatter_add(2, flat, oc.float())
        cnt = torch.zeros(B, H, T, device=q.device).scatter_add(2, idx.reshape(B, H, -1),
                                                                  torch.ones(B, H, C * WINDOW, device=q.device))
        return (out / cnt.clamp_min(1)[..., None]).to(q.dtype)
    return f


def _peer(T, centroids):
    from routing_transformer.routing_transformer import KmeansAttention

    attn = KmeansAttention(num_clusters=T // WINDOW, window_size=WINDOW, num_heads=H, head_dim=D, causal=True,
                           shared_qk=True).cuda().eval()
    # First call runs the peer's k-means initialisation; keep it out of the timings.
    with torch.no_grad():
        x = torch.randn(B, H, T, D, device="cuda", dtype=DTYPE)
        attn(x, x, x)

    def f(q, k, v):
        return attn(q, q, v)[0]
    return f


def _local_ours(T, centroids):
    from routeformer.ops import local_attention

    def f(q, k, v):
        return local_attention(q, k, v, block=BLOCK, flange=FLANGE, causal=True, backend="triton")
    return f


def _local_ours_shaw(T, centroids):
    """With the Shaw tables of the paper presets (max_relative_distance 513, random values)."""
    from routeformer.ops import local_attention

    g = torch.Generator(device="cuda").manual_seed(1)
    # Trainable, as in the model: fwd+bwd includes the tables' gradient kernel.
    rel_k, rel_v = ((torch.randn(2 * 513 + 1, D, device="cuda", dtype=DTYPE, generator=g) * 0.1).requires_grad_()
                    for _ in range(2))

    def f(q, k, v):
        return local_attention(q, k, v, block=BLOCK, flange=FLANGE, causal=True, rel_k=rel_k, rel_v=rel_v,
                               backend="triton")
    return f


def _local_flex(T, centroids):
    from flex_window import sliding_window_flex

    return sliding_window_flex(T, BLOCK, FLANGE)


ROWS = [
    ("ours topk", _ours("topk")),
    ("ours nearest", _ours("nearest")),
    ("ours topk sep-k", _ours("topk", shared=False)),
    ("dense SDPA", _dense),
    ("peer KmeansAttention", _peer),
    ("gather+SDPA", _gather_sdpa),
    ("local ours", _local_ours),
    ("local ours (Shaw)", _local_ours_shaw),
    ("local FlexAttention", _local_flex),
]


def _measure(name, make, T):
    q, k, v, dout, centroids = _inputs(T)
    row = {"name": name, "T": T}
    try:
        f = make(T, centroids)

        def fwd():
            with torch.no_grad():
                return f(q, k, v)

        def fwdbwd():
            f(q, k, v).backward(dout)

        fwd(), fwdbwd()  # compile and warm up outside the timings
        row["fwd_ms"] = _bench(fwd)
        row["fwd_mib"] = _peak_mib(fwd)
        row["fwdbwd_ms"] = _bench(fwdbwd, (q, k, v))
        q.grad = k.grad = v.grad = None
        row["fwdbwd_mib"] = _peak_mib(fwdbwd)
    except Exception as e:  # a missing kernel or an OOM is a table entry, not the end of the run
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        traceback.print_exc(limit=2)
    del q, k, v, dout
    torch.cuda.empty_cache()
    return row


def _graph_rows(T, assigns=("topk", "nearest")):
    """Ours replayed from CUDA graphs (what torch.compile(mode="reduce-overhead") gives a model): the GPU
    time without Python and launch overhead, which dominates the eager rows at small T."""
    from routeformer.ops import routing_attention

    out = []
    for assign in assigns:
        q, k, v, dout, centroids = _inputs(T)
        row = {"name": f"ours {assign} (CUDA graph)", "T": T}
        try:
            def f():
                return routing_attention(q, q, v, centroids, window=WINDOW, causal=True, assign=assign,
                                         backend="triton")

            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm up (compiles the kernels) outside the capture
                for _ in range(2):
                    with torch.no_grad():
                        f()
                    f().backward(dout)
            torch.cuda.current_stream().wait_stream(side)
            q.grad = k.grad = v.grad = None
            g_fwd, g_all = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(g_fwd), torch.no_grad():
                f()
            with torch.cuda.graph(g_all):
                f().backward(dout)
            row["fwd_ms"] = _bench(g_fwd.replay)
            row["fwdbwd_ms"] = _bench(g_all.replay)
        except Exception as e:
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            traceback.print_exc(limit=2)
        out.append(row)
        del q, k, v, dout
        torch.cuda.empty_cache()
    return out


def _kernel_rows(T):
    """Our in-cluster attention kernel alone (TFLOP/s) and the assignment alone, per mode: GPU time,
    from CUDA-graph replays (eagerly the assignment's small kernels measured the host: run C at e47518b
    timed topk's as 1.04 ms at 64k, 0.57 ms of it GPU work)."""
    from routeformer.ops.routing import triton_ops as TO

    q, k, v, dout, centroids = _inputs(T)
    out = []
    for assign in ("topk", "nearest"):
        with torch.no_grad():
            idx = TO.routing_indices(q, q, centroids, WINDOW, True, assign)
            t_assign = _bench_graph(lambda: TO.routing_indices(q, q, centroids, WINDOW, True, assign))
            t_kernel = _bench_graph(lambda: TO.attention_fwd(q, q, v, *idx, 1 / math.sqrt(D), assign == "nearest"))
        flops = 2 * T * WINDOW * D * H * B
        out.append({"name": f"kernel {assign}", "T": T, "assign_ms": t_assign, "kernel_ms": t_kernel,
                    "tflops": flops / t_kernel / 1e9})
    return out


def profile(T, host=False):
    """Breakdown of our eager forward+backward per mode: the GPU kernels (torch.profiler, 5 iterations)
    or, with host=True, where the host time goes (cProfile by own time, 50 iterations): below 32k the
    GPU idles while Python launches kernels, and that is what the eager rows measure."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity, profile as prof

    q, k, v, dout, centroids = _inputs(T)
    iters = 50 if host else 5
    for assign in ("topk", "nearest"):
        f = _ours(assign)(T, centroids)

        def run(n):
            for _ in range(n):
                q.grad = k.grad = v.grad = None  # else each backward adds into .grad: 2 adds of 67 MB at 64k
                f(q, k, v).backward(dout)
            torch.cuda.synchronize()

        run(3)
        print(f"== {'host ' if host else ''}profile {assign} T={T} ({iters} fwd+bwd)")
        if host:
            pr = cProfile.Profile()
            pr.enable()
            run(iters)
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(22)
            # The same steps as the profiler's CPU side sees them: torch ops, autograd nodes and the
            # CUDA runtime calls (launches, allocations, synchronisations) by their own host time.
            with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
                run(iters)
            print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=60))
        else:
            with prof(activities=[ProfilerActivity.CUDA]) as p:
                run(iters)
            print(p.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60))


SWEEP_PARTS = ("assignment", "scores", "argmax", "fwd", "bwd", "dq", "regs", "dkdv", "slots", "split", "combine")


def ncu_target(T):
    """What the ncu step profiles: per mode, one eager fwd+bwd of ours inside cudaProfilerStart/Stop
    after three warm-up ones (so Triton's compilations and the allocator's growth stay outside)."""
    q, k, v, dout, centroids = _inputs(T)
    for assign in ("topk", "nearest"):
        f = _ours(assign)(T, centroids)
        for _ in range(3):
            q.grad = k.grad = v.grad = None
            f(q, k, v).backward(dout)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStart()
        q.grad = k.grad = v.grad = None
        f(q, k, v).backward(dout)
        torch.cuda.synchronize()
        torch.cuda.cudart().cudaProfilerStop()


def sweep(T, parts=SWEEP_PARTS):
    """Tile configurations of the attention kernels at one T: kernel-only times per config. parts: which
    of SWEEP_PARTS to time ("regs": tiles with a register budget per thread, triton_ops.MAXNREG, as a
    fifth entry; each part starts from the default configuration, the baseline of the same run)."""
    from routeformer.ops.routing import triton_ops as TO

    q, k, v, dout, centroids = _inputs(T)
    scale = 1 / math.sqrt(D)
    res = []
    default = dict(TO.CONFIG["cuda"])
    default_regs = dict(TO.MAXNREG)

    def set_regs(name=None, cfg=()):
        """The default budgets, but kernel `name` gets cfg's fifth entry (None if it has four)."""
        TO.MAXNREG.update(default_regs)
        for key in ((name, name + "_direct") if name else ()):  # dk/dv has a budget per mode
            if key in TO.MAXNREG:
                TO.MAXNREG[key] = cfg[4] if len(cfg) > 4 else None
    # Session 11: the forward and dq run under a 128-register budget (the fifth entry); the default first.
    # Session 14: 128-slot tiles (half the loop steps, ~11% more masked work per cluster of 512); the
    # settings of sessions 10-11 (1-4 stages, 64 x 32, 128 x 64 on 8 warps) are in NOTES_routing.md.
    # Session 15: 128-entry tiles on 8 warps again (topk's clusters of 512 waste ~10% more on the diagonal,
    # but each program gathers a cluster's keys for twice the queries): they lost, topk 0.189-0.312 ms
    # against 0.158, nearest 0.232-0.382 against 0.181.
    fwd_cfgs = [(64, 64, 4, 2, 128), (64, 128, 4, 2, 128), (64, 128, 4, 2), (64, 128, 8, 2), (64, 128, 4, 3),
                (128, 64, 8, 2, 128), (128, 64, 8, 3, 128), (128, 64, 8, 2), (64, 64, 4, 3, 128), (64, 64, 4, 2, 128)]
    # Session 23 (part "dq" alone): 128-entry tiles on 8 warps under the budget (sm_90, Triton 3.6: 388 SASS
    # instructions per 128-row step against 400 per 64-row one, no spills; ncu had dq's warps 41% outside
    # its loop) lost: the backward at 64k 0.623 ms (topk) / 0.612 (nearest) against 0.588 / 0.556.
    dq_cfgs = [(64, 64, 4, 3, 128), (64, 128, 4, 3, 128), (64, 128, 4, 3), (64, 128, 8, 3), (64, 128, 4, 2),
               (128, 64, 8, 3, 128), (128, 64, 8, 2, 128), (128, 64, 8, 3, 168), (128, 64, 8, 3),
               (128, 32, 8, 3, 128), (64, 64, 4, 3, 128)]
    dkdv_cfgs = [(32, 64, 4, 1, 128), (32, 128, 4, 3), (32, 64, 4, 3), (32, 128, 8, 3), (64, 128, 8, 3),
                 (16, 128, 4, 3), (32, 128, 4, 4), (64, 64, 4, 3)]
    # (BLOCK_T, warps, AHEAD) of topk's per-token sums, the default first and last (1-warp settings:
    # session 10; AHEAD, the entries gathered at once: session 14; wider tiles: session 15, flat, 0.622-0.661
    # ms of backward against the default's 0.624-0.627). Part "bwd", or "combine" alone.
    combine_cfgs = [(32, 4, 4), (32, 4, 1), (64, 4, 4), (16, 4, 4), (32, 4, 2), (32, 4, 8), (64, 8, 4), (16, 2, 4),
                    (64, 4, 2), (128, 4, 2), (128, 8, 4), (32, 2, 4), (32, 4, 4)]
    # Register budgets that would fit more programs per SM (ncu, 64k: fwd and dq at 128 registers run 4
    # programs of 4 warps per SM, dk/dv at 255 only 2, and all three are latency-bound).
    # Each list starts with the default, the baseline of the same run.
    reg_fwd = [(64, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2, 96), (64, 64, 4, 1, 96)]
    reg_dq = [(64, 64, 4, 3), (64, 64, 4, 3, 112), (64, 64, 4, 3, 120), (64, 64, 4, 2)]
    reg_dkdv = [(32, 64, 4, 1, 128), (32, 128, 4, 3), (32, 128, 4, 1), (32, 64, 4, 3, 128), (32, 64, 4, 2, 128),
                (32, 64, 4, 1), (32, 64, 4, 1, 120), (32, 64, 4, 1, 136)]
    # "dkdv": dk/dv alone, per mode. On sm_90 (sm90_resources.py, Triton 3.9) the 128-register budget
    # costs nearest's dk/dv (which writes at token positions) 38-41 spill stores against topk's 16-19,
    # and the run F regs sweep had nearest faster without it (0.692 vs 0.713 ms) but topk slower (0.853
    # vs 0.727). topk's default first and last (the first settings of a sweep have read high).
    dkdv_only = [(32, 64, 4, 1, 128), (32, 64, 4, 1), (32, 64, 4, 2), (32, 64, 4, 3), (32, 64, 4, 1, 168),
                 (32, 64, 4, 2, 168), (64, 64, 8, 1), (64, 64, 8, 2), (32, 128, 8, 1), (32, 64, 4, 1, 128)]
    chosen = TO.TOPK_SELECT
    for mode in (("groups", "full") if "assignment" in parts else ()):
        TO.TOPK_SELECT = mode
        try:
            t = _bench(lambda: TO.routing_indices(q, q, centroids, WINDOW, True, "topk"))
            res.append(("topk", "assignment", mode, t, float("nan")))
        except Exception as e:
            res.append(("topk", "assignment", mode, float("nan"), str(e)[:60]))
    TO.TOPK_SELECT = chosen
    for warps in ((None, 4, 8, 16) if "assignment" in parts else ()):  # the one-row select kernel's warps
        TO.SELECT_WARPS = warps
        try:
            with torch.no_grad():
                t = _bench_graph(lambda: TO.routing_indices(q, q, centroids, WINDOW, True, "topk"))
            res.append(("topk", "assignment (graph), select warps", warps, t, float("nan")))
        except Exception as e:
            res.append(("topk", "assignment (graph), select warps", warps, float("nan"), str(e)[:60]))
    TO.SELECT_WARPS = None
    # The threshold select's (CHUNK_G, warps, stages), the default first and last; then the two-stage select.
    threshold_default = dict(TO.THRESHOLD_TILES)
    for cfg in (((64, 2, 3), (128, 4, 2), (64, 4, 1), (128, 4, 3), (64, 2, 2), (128, 2, 2), (64, 2, 3), None)
                if "assignment" in parts else ()):
        TO.THRESHOLD_SELECT = cfg is not None
        TO.THRESHOLD_TILES["cuda"] = cfg or threshold_default["cuda"]
        try:
            with torch.no_grad():
                t = _bench_graph(lambda: TO.routing_indices(q, q, centroids, WINDOW, True, "topk"))
            res.append(("topk", "assignment (graph), threshold select", cfg or "two-stage", t, float("nan")))
        except Exception as e:
            res.append(("topk", "assignment (graph), threshold select", cfg, float("nan"), str(e)[:60]))
    TO.THRESHOLD_SELECT = True
    TO.THRESHOLD_TILES.update(threshold_default)
    from routeformer.ops.kmeans import routing_scores
    from routeformer.ops.routing import scores

    if "scores" in parts:
        res.append(("both", "routing_scores (formula)", "-", _bench(lambda: routing_scores(q, centroids)),
                    float("nan")))
    from routeformer.ops.routing import _score_kernels as SK

    default_tiles, default_argmax = dict(SK.TILES), dict(SK.ARGMAX_TILES)
    default_split = SK.BF16_SPLIT_SCORES
    # The bf16 split (NOTES_routing.md v8). tf32x3 on the normalised rows lost at every tile in run D
    # (argmax 0.207-0.294 ms against 0.113-0.305) and is no longer swept. Session 8 also timed the
    # centroids split once per call in torch instead of by each program: slower (argmax + counts 0.145
    # against 0.126 ms; runs/h200_2026-12-02_7655994_scores_sweep.txt), and the code is gone.
    if "scores" in parts:
        SK.BF16_SPLIT_SCORES = True
        kind = " (bf16 split)"
        for tiles in [(128, 64, 4), (128, 64, 8), (64, 32, 4), (128, 128, 8), (64, 64, 4), (128, 32, 4),
                      (256, 64, 8), (256, 32, 8)]:
            SK.TILES["cuda"] = SK.ARGMAX_TILES["cuda"] = tiles
            try:
                with torch.no_grad():  # graph replays: one kernel each, whose launch the host could outlast
                    res.append(("topk", "fused scores" + kind, tiles,
                                _bench_graph(lambda: scores.assignment_scores(q, centroids)), math.nan))
                    # with the per-64-position cluster counts, as the counting sort calls it
                    res.append(("nearest", "fused argmax+counts" + kind, tiles,
                                _bench_graph(lambda: SK.fused_argmax_counts(q, centroids)), math.nan))
            except Exception as e:
                res.append(("both", "fused kernel" + kind, tiles, math.nan, str(e)[:60]))
    # Session 9: nearest's argmax with and without its LayerNorm statistics (SK.CENTRED_ARGMAX; the
    # centred one won and is the default), with and without the cluster counts. (The argmax as one
    # packed int64 max was slower at every tile: runs/h200_2026-12-02_1534a89_argmax_sweep.txt.)
    # Session 12: the centroid pieces made once per call by a Triton kernel (SK.PRESPLIT_CENTROIDS)
    # against in every program (call 1, runs/h200_2026-12-02_presplit-call1_sweep.txt: 0.090 ms at
    # (128, 64, 4) on 2 stages against 0.110 split per program, 0.095 on 3 stages; 0.093-0.103 on
    # (128, 32, 4), (128, 128, 8), (64, 64, 4), (256, 64, 8)). (Each tile's argmax as a max and then the
    # first column equal to it, instead of one (value, index) reduction, measured 0.090 against 0.089
    # and 0.092 against 0.090 on the two tiles here in call 3: no gain, and the code is gone.)
    default_centred = SK.CENTRED_ARGMAX
    default_presplit = (SK.PRESPLIT_CENTROIDS, SK.PRESPLIT_STAGES)
    for tiles in ([(128, 64, 4), (128, 32, 4)] if "argmax" in parts else []):
        SK.ARGMAX_TILES["cuda"] = tiles
        SK.BF16_SPLIT_SCORES = True
        SK.CENTRED_ARGMAX = True
        for presplit, stages in ((False, 3), (True, 2), (True, 3)):
            SK.PRESPLIT_CENTROIDS, SK.PRESPLIT_STAGES = presplit, stages
            how = f"presplit, {stages} stages" if presplit else "split per program"
            try:
                with torch.no_grad():
                    res.append(("nearest", f"fused argmax+counts, {how}", tiles,
                                _bench_graph(lambda: SK.fused_argmax_counts(q, centroids)), math.nan))
            except Exception as e:
                res.append(("nearest", f"fused argmax, {how}", tiles, math.nan, str(e)[:60]))
    SK.PRESPLIT_CENTROIDS, SK.PRESPLIT_STAGES = default_presplit
    SK.CENTRED_ARGMAX = default_centred
    # Session 10: the counting sort's slot kernel (45 us at 64k in run J) on other warp counts. The
    # timing includes the argmax and the cumsum, the same in every row; the slots must not change.
    want = TO._nearest_slots_counting(q, centroids, WINDOW) if "slots" in parts else None
    default_warps = TO.SLOT_WARPS
    for warps in ((default_warps, 2, 4, default_warps) if "slots" in parts else ()):
        TO.SLOT_WARPS = warps
        try:
            with torch.no_grad():
                got = TO._nearest_slots_counting(q, centroids, WINDOW)
                same = all(torch.equal(a, b) for a, b in zip(got, want))
                res.append(("nearest", f"argmax+cumsum+slots, slot warps{'' if same else ' (SLOTS DIFFER)'}",
                            warps, _bench_graph(lambda: TO._nearest_slots_counting(q, centroids, WINDOW)),
                            math.nan))
        except Exception as e:
            res.append(("nearest", "slots", warps, math.nan, str(e)[:60]))
    TO.SLOT_WARPS = default_warps
    # (Register budgets of 96-128 on the score kernel, same call: argmax 0.109-0.115 ms against 0.110,
    # topk's pass 0.159-0.172 against 0.159; no gain, and the knob is gone.)
    SK.TILES.update(default_tiles)
    SK.ARGMAX_TILES.update(default_argmax)
    SK.BF16_SPLIT_SCORES = default_split
    for assign in ("topk", "nearest"):
        direct = assign == "nearest"
        idx = TO.routing_indices(q, q, centroids, WINDOW, True, assign)
        for cfg in (fwd_cfgs if "fwd" in parts else []) + (reg_fwd if "regs" in parts else []):
            TO.CONFIG["cuda"] = dict(default, fwd=cfg[:4])
            set_regs("fwd", cfg)
            try:
                t = _bench(lambda: TO.attention_fwd(q, q, v, *idx, scale, direct))
                res.append((assign, "fwd", cfg, t, 2 * T * WINDOW * D * H / t / 1e9))
            except Exception as e:
                res.append((assign, "fwd", cfg, float("nan"), str(e)[:60]))
        TO.CONFIG["cuda"] = dict(default)
        set_regs()
        # Session 11: how the forward and dq skip their masks (SPLIT_TILES), with a register budget
        # (MAXNREG) and int32 or int64 row offsets (_row64); (mode, budget, int64), the default first
        # and last. dq is timed as the whole backward.
        default_split, row64 = dict(TO.SPLIT_TILES), TO._row64
        split_cfgs = [(TO.TILE_BRANCH, None, False), (TO.ALL_MASKED, None, False), (TO.TILE_BRANCH, 128, False),
                      (TO.ALL_MASKED, 128, False), (TO.TILE_BRANCH, None, True), (TO.ALL_MASKED, None, True),
                      (TO.TILE_BRANCH, 168, False), (TO.TILE_BRANCH, None, False)]
        for name in (("fwd", "dq") if "split" in parts else ()):
            saved = TO._routing_fwd(q.detach(), q.detach(), v.detach(), *idx, scale, direct, True)
            for mode, regs, wide in split_cfgs:
                TO.SPLIT_TILES[name], TO.MAXNREG[name] = mode, regs
                TO._row64 = lambda *ts, wide=wide: wide
                fn = ((lambda: TO.attention_fwd(q, q, v, *idx, scale, direct)) if name == "fwd" else
                      (lambda: TO._routing_bwd(dout, q.detach(), q.detach(), v.detach(), saved[0], saved[1], saved[2],
                                               saved[3], *idx, saved[4], saved[5], scale, direct, True)))
                try:
                    res.append((assign, f"{name} split/regs/int64" if name == "fwd" else "bwd(dq split/regs/int64)",
                                (mode, regs, wide), _bench(fn), math.nan))
                except Exception as e:
                    res.append((assign, name, (mode, regs, wide), float("nan"), str(e)[:60]))
                finally:
                    TO.SPLIT_TILES.update(default_split)
                    TO._row64 = row64
                    set_regs()
        saved = TO._routing_fwd(q.detach(), q.detach(), v.detach(), *idx, scale, direct, True)
        varied = []
        if "bwd" in parts:
            varied += [("dq", dq_cfgs), ("dkdv", dkdv_cfgs)]
        elif "dq" in parts:
            varied += [("dq", dq_cfgs)]
        if ("bwd" in parts or "combine" in parts) and not direct:
            varied += [("combine", combine_cfgs)]
        if "regs" in parts:
            varied += [("dq", reg_dq), ("dkdv", reg_dkdv)]
        if "dkdv" in parts:
            varied += [("dkdv", dkdv_only)]
        for name, cfgs in varied:
            for cfg in cfgs:
                TO.CONFIG["cuda"] = dict(default, **{name: cfg[:4] if name != "combine" else cfg})
                set_regs(name, cfg)
                try:
                    t = _bench(lambda: TO._routing_bwd(dout, q.detach(), q.detach(), v.detach(), saved[0], saved[1],
                                                       saved[2], saved[3], *idx, saved[4], saved[5], scale, direct,
                                                       True))
                    res.append((assign, f"bwd({name} varied)", cfg, t, 5 * T * WINDOW * D * H / t / 1e9))
                except Exception as e:
                    res.append((assign, f"bwd({name} varied)", cfg, float("nan"), str(e)[:60]))
        TO.CONFIG["cuda"] = dict(default)
        set_regs()
    print(f"== tile sweep T={T} (ms, useful TFLOP/s)")
    for r in res:
        print(f"{r[0]:8s} {r[1]:24s} {str(r[2]):18s} {r[3]:8.3f} {r[4] if isinstance(r[4], str) else f'{r[4]:.0f}'}")
    return res


AB_VARIANTS = ("all changes", "one scoring pass", "torch.topk select", "through the dispatcher", "torch index ops",
               "masked tiles", "unmasked tiles everywhere", "candidate gather ops", "sorted cluster ids",
               "tf32x3 scores", "argmax tiles 64x32", "score tiles 64x32",
               "jit launches", "uncentred argmax", "whole-row entry searches", "split loops", "one-loop dk/dv",
               "head-dim masks", "in-kernel centroid split", "fixed tiles", "two-stage select", "sorted inverse",
               "prefetch everywhere", "combine one entry at a time", "band reductions", "1/n multiplies",
               "cluster passes", "exact first bound", "keep entry outputs", "inference scoring passes",
               "unpaired forward", "four-warp threshold select")


# "torch index ops": the index bounds built from torch ops as before NOTES_routing.md v7 (same values;
# tests/benchmarks/test_attention_variants.py checks that), in place of the two small kernels.
def _torch_count_below(x, m, step, offset, limit, right):
    v = torch.clamp(torch.arange(m, device=x.device, dtype=torch.int32) * step + offset, max=limit)
    return torch.searchsorted(x, v.to(x.dtype).expand(x.shape[0], m).contiguous(), right=right, out_int32=True)


def _torch_topk_slot_bounds(like, R, N, W, causal):
    base = (torch.arange(N // W, device=like.device, dtype=torch.int32) * W)[:, None]
    hi = base + (torch.arange(1, W + 1, device=like.device, dtype=torch.int32) if causal else W)
    return (base.expand(N // W, W).reshape(1, N).expand(R, N).contiguous(),
            hi.expand(N // W, W).reshape(1, N).expand(R, N).contiguous())


def _torch_nearest_slot_bounds(order, group, first, W):
    R, N = order.shape
    hi = torch.arange(1, N + 1, device=order.device, dtype=torch.int32)
    lo = torch.maximum(first.gather(1, group.long()), hi - W)
    return order.to(torch.int32), lo, hi.expand(R, N).contiguous()


@contextlib.contextmanager
def _variant(name):
    """One change switched back, to measure it alone (NOTES_routing.md v5, v7 and v8); "unmasked tiles
    everywhere" instead switches the forward's and dq's unmasked tiles on (measured slower in v8)."""
    from routeformer.ops import _dispatch, _launch
    from routeformer.ops.routing import _score_kernels as SK
    from routeformer.ops.routing import triton_ops as TO

    saved = (TO.FOLD_EVEN_D, _launch.FAST_LAUNCH, TO.CLUSTER_CHUNK, TO.SELECT_ROWS_MAX, _dispatch.tracing,
             TO.SPLIT_TILES, TO.FUSED_CANDIDATES, TO.COUNTING_SORT, SK.BF16_SPLIT_SCORES, dict(SK.TILES),
             dict(SK.ARGMAX_TILES), SK.CENTRED_ARGMAX, TO.tile_entry_ranges, SK.PRESPLIT_CENTROIDS,
             TO.CLUSTER_TILES, TO.THRESHOLD_SELECT, TO.COUNTING_INVERSE)
    prefetch, config, scalar_band = dict(TO.PREFETCH), {kind: dict(c) for kind, c in TO.CONFIG.items()}, TO.SCALAR_BAND
    mean_in_lse, head_passes, l1_slack = TO.MEAN_IN_LSE, TO.HEAD_PASSES, TO.THRESHOLD_L1_SLACK
    release, budget = TO.RELEASE_ENTRY_OUTPUTS, TO.TRAINING_SCORE_BUDGET
    paired, threshold_tiles = TO.PAIRED_FORWARD, dict(TO.THRESHOLD_TILES)
    entry_ranges = TO.tile_entry_ranges
    index_ops = (TO.count_below, TO.topk_slot_bounds, TO.nearest_slot_bounds)
    if name == "torch index ops":
        TO.count_below, TO.topk_slot_bounds, TO.nearest_slot_bounds = (
            _torch_count_below, _torch_topk_slot_bounds, _torch_nearest_slot_bounds)
    elif name == "one scoring pass":
        TO.CLUSTER_CHUNK = 1 << 30
    elif name == "torch.topk select":
        TO.SELECT_ROWS_MAX = 0
    elif name == "masked tiles":  # every attention tile masked, as before NOTES_routing.md v8
        TO.SPLIT_TILES = dict.fromkeys(TO.SPLIT_TILES, TO.ALL_MASKED)
    elif name == "unmasked tiles everywhere":  # three loops in every kernel, measured slower in v8
        TO.SPLIT_TILES = dict.fromkeys(TO.SPLIT_TILES, TO.THREE_LOOPS)
    elif name == "split loops":  # the forward and dq all masked, dk/dv in three loops: before session 11
        TO.SPLIT_TILES = {"fwd": TO.ALL_MASKED, "dq": TO.ALL_MASKED, "dkdv": TO.THREE_LOOPS}
    elif name == "head-dim masks":  # the column masks kept where head dims equal their tiles (session 11)
        TO.FOLD_EVEN_D = False
    elif name == "one-loop dk/dv":  # dk/dv also in one loop with a branch per entry tile
        TO.SPLIT_TILES = {**TO.SPLIT_TILES, "dkdv": TO.TILE_BRANCH}
    elif name == "candidate gather ops":  # topk's second stage as before v8 (gather kernel + torch ops)
        TO.FUSED_CANDIDATES = False
    elif name == "sorted cluster ids":  # nearest's slots from the radix sort, as before v8
        TO.COUNTING_SORT = False
    elif name == "tf32x3 scores":  # bf16 inputs scored with tf32x3 on the normalised rows, as before v8
        SK.BF16_SPLIT_SCORES = False
    elif name == "argmax tiles 64x32":  # nearest's argmax on the scoring passes' tile, as before run G
        SK.ARGMAX_TILES["cuda"] = (64, 32, 4)
    elif name == "jit launches":  # every launch through Triton's JIT, as before ops/_launch.py
        _launch.FAST_LAUNCH = False
    elif name == "score tiles 64x32":  # topk's scoring passes on run D's tile, as before session 8
        SK.TILES["cuda"] = (64, 32, 4)
    elif name == "fixed tiles":  # nearest's entry and slot tiles every BLOCK entries, as before session 12
        TO.CLUSTER_TILES = False
    elif name == "two-stage select":  # topk's top-w groups, then their positions, as before session 13
        TO.THRESHOLD_SELECT = False
    elif name == "sorted inverse":  # topk's per-token index from torch.sort, as before session 13
        TO.COUNTING_INVERSE = False
    elif name == "band reductions":  # the forward's and dq's slot band reduced over the tile, as before session 14
        TO.SCALAR_BAND = False
    elif name == "1/n multiplies":  # topk's dk/dv multiplies p by 1/n per step, as before session 16
        TO.MEAN_IN_LSE = False
    elif name == "cluster passes":  # topk scores chunks of clusters over all heads, as before session 17
        TO.HEAD_PASSES = False
    elif name == "exact first bound":  # topk's threshold select searches L1 exactly, as before session 17
        TO.THRESHOLD_L1_SLACK = 0
    elif name == "inference scoring passes":  # topk's training calls score in 2x-x passes, as before session 18
        TO.TRAINING_SCORE_BUDGET = 2
    elif name == "keep entry outputs":  # topk's o_e alive through the whole backward, as before session 18
        TO.RELEASE_ENTRY_OUTPUTS = False
    elif name == "four-warp threshold select":  # topk's select rows on 4 warps, as before session 19
        TO.THRESHOLD_TILES["cuda"] = (128, 4, 2)
    elif name == "unpaired forward":  # one entry tile per forward program, as before session 19
        TO.PAIRED_FORWARD = False
    elif name == "prefetch everywhere":  # every kernel reads the next tile's gather indices (session 14)
        TO.PREFETCH.update(dict.fromkeys(TO.PREFETCH, True))
    elif name == "combine one entry at a time":  # topk's per-token sums one entry per step, as before session 14
        TO.CONFIG["cuda"]["combine"] = TO.CONFIG["cuda"]["combine"][:2] + (1,)
    elif name == "in-kernel centroid split":  # every score program splits the centroids, as before session 12
        SK.PRESPLIT_CENTROIDS = False
    elif name == "uncentred argmax":  # nearest's argmax on the LayerNorm scores, as before session 9
        SK.CENTRED_ARGMAX = False
    elif name == "whole-row entry searches":  # nearest's tile_entry_ranges unbounded, as before session 9
        TO.tile_entry_ranges = (lambda lo, hi, nt, bn, S, nearest_window=0, tiles=None:
                                entry_ranges(lo, hi, nt, bn, S, 0, tiles))
    elif name == "through the dispatcher":
        _dispatch.tracing = lambda: True  # eager calls take the custom ops, as before ops/_dispatch.py
    try:
        yield
    finally:
        (TO.FOLD_EVEN_D, _launch.FAST_LAUNCH, TO.CLUSTER_CHUNK, TO.SELECT_ROWS_MAX, _dispatch.tracing, TO.SPLIT_TILES,
         TO.FUSED_CANDIDATES, TO.COUNTING_SORT, SK.BF16_SPLIT_SCORES, tiles, argmax_tiles, SK.CENTRED_ARGMAX,
         TO.tile_entry_ranges, SK.PRESPLIT_CENTROIDS, TO.CLUSTER_TILES, TO.THRESHOLD_SELECT,
         TO.COUNTING_INVERSE) = saved
        SK.TILES.clear()
        SK.TILES.update(tiles)
        SK.ARGMAX_TILES.clear()
        SK.ARGMAX_TILES.update(argmax_tiles)
        TO.count_below, TO.topk_slot_bounds, TO.nearest_slot_bounds = index_ops
        TO.PREFETCH.update(prefetch)
        TO.PAIRED_FORWARD = paired
        TO.THRESHOLD_TILES.update(threshold_tiles)
        TO.SCALAR_BAND = scalar_band
        TO.MEAN_IN_LSE, TO.HEAD_PASSES, TO.THRESHOLD_L1_SLACK = mean_in_lse, head_passes, l1_slack
        TO.RELEASE_ENTRY_OUTPUTS, TO.TRAINING_SCORE_BUDGET = release, budget
        for kind, c in config.items():
            TO.CONFIG[kind].update(c)


def ab(Ts, only=()):
    """Each recent change alone: eager and CUDA-graph fwd and fwd+bwd times and eager peaks of ours with
    it switched back (see _variant). only: these variants alone (and "all changes")."""
    unknown = set(only) - set(AB_VARIANTS)
    if unknown:
        sys.exit(f"--ab-only: unknown {sorted(unknown)}; choose from {', '.join(AB_VARIANTS)}")
    rows = []
    for T in Ts:
        for assign in ("topk", "nearest"):
            for name in AB_VARIANTS:
                if only and name not in only and name != "all changes":
                    continue
                if assign == "nearest" and name in ("one scoring pass", "torch.topk select", "candidate gather ops",
                                                    "score tiles 64x32", "two-stage select", "sorted inverse",
                                                    "combine one entry at a time", "cluster passes",
                                                    "exact first bound", "keep entry outputs",
                                                    "inference scoring passes", "four-warp threshold select"):
                    continue  # nearest has no top-k
                if assign == "topk" and name in ("sorted cluster ids", "argmax tiles 64x32"):
                    continue  # a nearest-only change
                with _variant(name):
                    r = _measure(f"ours {assign} / {name}", _ours(assign), T)
                    # The GPU's own time (eager rows below 32k are host-bound noise)
                    g = _graph_rows(T, (assign,))[0]
                r["graph_fwd_ms"], r["graph_fwdbwd_ms"] = g.get("fwd_ms"), g.get("fwdbwd_ms")
                print(json.dumps(r), flush=True)
                rows.append(r)
    print("| T | variant | fwd ms | fwd+bwd ms | graph fwd ms | graph fwd+bwd ms | fwd MiB | fwd+bwd MiB |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['name']} | {_fmt(r.get('fwd_ms'), '.3f')} | {_fmt(r.get('fwdbwd_ms'), '.3f')} "
              f"| {_fmt(r.get('graph_fwd_ms'), '.3f')} | {_fmt(r.get('graph_fwdbwd_ms'), '.3f')} "
              f"| {_fmt(r.get('fwd_mib'), '.0f')} | {_fmt(r.get('fwdbwd_mib'), '.0f')} |")
    return rows


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def table(rows, kernels):
    lines = ["| T | variant | fwd ms | fwd+bwd ms | fwd MiB | fwd+bwd MiB | note |",
             "|---:|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['T']} | {r['name']} | {_fmt(r.get('fwd_ms'), '.3f')} | {_fmt(r.get('fwdbwd_ms'), '.3f')} "
                     f"| {_fmt(r.get('fwd_mib'), '.0f')} | {_fmt(r.get('fwdbwd_mib'), '.0f')} | {r.get('error', '')} |")
    # GPU times (graph replays); the share is of the graph-replayed forward where the table has it.
    lines += ["", "| T | mode | attention kernel ms | TFLOP/s (useful, fwd) | assignment ms | assign % of fwd |",
              "|---:|---|---:|---:|---:|---:|"]
    fwd = {(r["name"], r["T"]): r.get("fwd_ms") for r in rows}
    for r in kernels:
        mode = r["name"].split()[1]
        total = fwd.get((f"ours {mode} (CUDA graph)", r["T"])) or fwd.get((f"ours {mode}", r["T"]))
        share = 100 * r["assign_ms"] / total if total else None
        lines.append(f"| {r['T']} | {mode} | {r['kernel_ms']:.3f} | {r['tflops']:.0f} | {r['assign_ms']:.3f} "
                     f"| {_fmt(share, '.0f')} |")
    lines += ["", "| T | ours | fwd+bwd speed-up over dense / peer / gather | fwd over dense |",
              "|---:|---|---|---:|"]
    by = {(r["name"], r["T"]): r for r in rows}
    for T in sorted({r["T"] for r in rows}):
        for ours in ("ours topk", "ours nearest", "ours topk (CUDA graph)", "ours nearest (CUDA graph)"):
            o = by.get((ours, T), {})
            if not o.get("fwd_ms"):
                continue
            ratio = lambda n, key: (by.get((n, T), {}).get(key) or math.nan) / (o.get(key) or math.nan)  # noqa: E731
            lines.append(f"| {T} | {ours[5:]} | {ratio('dense SDPA', 'fwdbwd_ms'):.1f}x / "
                         f"{ratio('peer KmeansAttention', 'fwdbwd_ms'):.1f}x / {ratio('gather+SDPA', 'fwdbwd_ms'):.1f}x"
                         f" | {ratio('dense SDPA', 'fwd_ms'):.1f}x |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", default="4096,8192,16384,32768,65536,131072")
    p.add_argument("--rows", default="", help="comma-separated substrings of row names to keep (default all)")
    p.add_argument("--out", default="", help="write all numbers as JSON here")
    p.add_argument("--md", default="", help="write the markdown table here")
    p.add_argument("--profile", type=int, default=0, help="only print a kernel breakdown of ours at this T")
    p.add_argument("--sweep", type=int, default=0, help="only time tile configurations at this T")
    p.add_argument("--sweep-parts", default=",".join(SWEEP_PARTS),
                   help=f"comma-separated parts of --sweep to time (of {', '.join(SWEEP_PARTS)})")
    p.add_argument("--ncu", type=int, default=0,
                   help="only run 3 warm-up fwd+bwd per mode at this T, then one between cudaProfilerStart and "
                        "Stop (for `ncu --profile-from-start off`; gpu_session.sh's ncu step)")
    p.add_argument("--cpu-profile", type=int, default=0, help="only profile the host time of ours at this T")
    p.add_argument("--ab", default="", help="only measure each recent change alone at these T (e.g. 8192,65536)")
    p.add_argument("--ab-only", default="", help="with --ab: only these variants (comma list) beside 'all changes'")
    p.add_argument("--variant", default="", choices=("",) + AB_VARIANTS[1:], metavar="NAME",
                   help="with --profile, --sweep, --cpu-profile or --ncu: run under this --ab variant "
                        "(e.g. 'unpaired forward')")
    p.add_argument("--topk-select", default="groups", choices=("groups", "full"),
                   help="how our topk assignment finds the W-th score (triton_ops.TOPK_SELECT)")
    args = p.parse_args(argv)
    from routeformer.ops.routing import triton_ops as TO

    TO.TOPK_SELECT = args.topk_select
    if not torch.cuda.is_available():
        sys.exit("benchmarks/attention.py needs a CUDA device")
    if args.ab:
        rows = ab([int(t) for t in args.ab.split(",")], tuple(x for x in args.ab_only.split(",") if x))
        if args.out:
            with open(args.out, "w") as fh:
                json.dump({"device": torch.cuda.get_device_name(), "ab": rows}, fh, indent=1)
        return
    profiling = args.ncu or args.profile or args.sweep or args.cpu_profile
    if args.variant and not profiling:
        sys.exit("--variant: only with --profile, --sweep, --cpu-profile or --ncu (the table has no variants)")
    if profiling:
        with _variant(args.variant) if args.variant else contextlib.nullcontext():
            _profiles(args)
        return
    _table(args)


def _profiles(args):
    if args.ncu:
        ncu_target(args.ncu)
        return
    if args.profile or args.sweep or args.cpu_profile:
        if args.cpu_profile:
            profile(args.cpu_profile, host=True)
        if args.profile:
            profile(args.profile)
        if args.sweep:
            parts = tuple(x for x in args.sweep_parts.split(",") if x)
            unknown = set(parts) - set(SWEEP_PARTS)
            if unknown:
                sys.exit(f"--sweep-parts: unknown {sorted(unknown)}; choose from {', '.join(SWEEP_PARTS)}")
            sweep(args.sweep, parts)


def _table(args):
    Ts = [int(t) for t in args.T.split(",")]
    keep = [s for s in args.rows.split(",") if s]
    rows, kernels = [], []
    for T in Ts:
        for name, make in ROWS:
            if keep and not any(s in name for s in keep):
                continue
            r = _measure(name, make, T)
            print(json.dumps(r), flush=True)
            rows.append(r)
        if not keep or any("graph" in s for s in keep):
            for r in _graph_rows(T):
                print(json.dumps(r), flush=True)
                rows.append(r)
        try:
            kernels += _kernel_rows(T)
            print(json.dumps(kernels[-2:]), flush=True)
        except Exception:
            traceback.print_exc(limit=2)
    head = (f"{torch.cuda.get_device_name()}, torch {torch.__version__}, topk select {args.topk_select}, "
            f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; B={B} H={H} D={D} "
            f"window={WINDOW} bf16 causal shared-QK; local block={BLOCK} flange={FLANGE}")
    md = head + "\n\n" + table(rows, kernels)
    print(md)
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"device": head, "rows": rows, "kernels": kernels}, fh, indent=1)
    if args.md:
        with open(args.md, "w") as fh:
            fh.write(md + "\n")


if __name__ == "__main__":
    main()
