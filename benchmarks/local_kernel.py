"""Local attention on one GPU: the Triton kernels against FlexAttention and dense SDPA.

    PYTHONPATH=src python benchmarks/local_kernel.py [--out DIR] [--sweep] [--smoke] [--profile T]

Shape: B=1, H=8, D=64, bf16, block 256, flange 256, causal, T in {4k .. 64k}. Variants: ours
without and with Shaw tables (M = 513, the model's default; the Shaw terms gathered in the kernels or read
from precomputed bands, triton_ops.SHAW_BANDS), FlexAttention (flex_window.py:
compiled per length, with a sliding-window block mask built once, outside the timing), and dense causal
SDPA (flash) for scale. Correctness first: each variant against the reference at T = 4096.
Times are medians in ms; 'fwd+bwd' includes the forward. Two clocks: triton.testing.do_bench
(eager calls, so Python and launch overhead count where the GPU work is short) and
do_bench_cudagraph (GPU time of a replayed CUDA graph).
--sweep times a few tile settings for our kernels at T = 16384 (--sweep-T) before the main table.
--smoke runs tiny sizes on the CPU interpreter to check the script itself.
--profile T prints the GPU time per kernel of our forward+backward at T, without and with Shaw tables.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch


def flops(T: int, block: int, flange: int, causal: bool, B: int, H: int, D: int) -> float:
    """Forward matmul FLOPs over the (i, j) pairs the mask allows (4 per pair and dim: QK and PV)."""
    i = torch.arange(T, dtype=torch.float64)
    first = ((i // block) * block - flange).clamp_min(0)
    last = (i + 1) if causal else ((i // block + 1) * block + flange).clamp_max(T)
    return float((last - first).sum()) * 4 * B * H * D


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--sweep-T", type=int, default=16384, help="the length --sweep times at (GPU)")
    ap.add_argument("--sweep-only", default="", help="comma list of plain-fwd, plain-bwd, shaw-fwd, shaw-bwd, "
                    "bands-fwd, bands-bwd: "
                    "sweep only these, then stop (no table)")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--profile", type=int, default=0,
                    help="only the GPU kernels of our fwd+bwd (without and with Shaw tables) at this T")
    ap.add_argument("--dist-caps", default="",
                    help="only time ours+shaw fwd+bwd at the largest T and its peak memory for each of these "
                         "triton_ops.DIST_BUFFER_BYTES values, in MiB (e.g. 1024,256,128)")
    args = ap.parse_args()
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    import triton
    from routeformer.ops import local_attention
    from routeformer.ops.local import triton_ops
    from routeformer.ops.local.reference import local_attention_reference

    dev = "cpu" if args.smoke else "cuda"
    B, H, D, L, F, M = (1, 2, 16, 16, 16, 20) if args.smoke else (1, 8, 64, 256, 256, 513)
    Ts = [64, 128] if args.smoke else [4096, 8192, 16384, 32768, 65536]
    dtype = torch.float32 if args.smoke else torch.bfloat16
    print(f"torch {torch.__version__} triton {triton.__version__} "
          f"{torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}", flush=True)

    def inputs(T, rel, seed=0):
        g = torch.Generator(device=dev).manual_seed(seed)
        t = [torch.randn(B, H, T, D, device=dev, generator=g, dtype=dtype) for _ in range(3)]
        if rel:
            t += [0.5 * torch.randn(2 * M + 1, D, device=dev, generator=g, dtype=dtype) for _ in range(2)]
        return [x.requires_grad_() for x in t]

    def ours(rel):
        def f(q, k, v, *tables):
            rk, rv = tables if rel else (None, None)
            return local_attention(q, k, v, block=L, flange=F, causal=True, rel_k=rk, rel_v=rv, backend="triton")
        return f

    def reference_shaw(q, k, v, rk, rv):
        return local_attention(q, k, v, block=L, flange=F, causal=True, rel_k=rk, rel_v=rv, backend="reference")

    # The Shaw rows differ only in triton_ops.SHAW_BANDS (read when the forward and the backward run, so
    # it is set around the whole measurement of a row): "ours+shaw" the rel terms gathered inside the
    # kernels, "shaw-bands" on precomputed rel-logit bands in both passes, "shaw-bands-bwd" in the
    # backward only (the two passes are independent).
    bands_of = {"ours+shaw": (False, False), "shaw-bands": (True, True), "shaw-bands-bwd": (False, True)}
    variants = {"ours": ours(False), **{name: ours(True) for name in bands_of}, "ref+shaw": reference_shaw}
    rel_of = {"ours": False, **{name: True for name in bands_of}, "ref+shaw": True, "flex": False,
              "sdpa-dense": False}

    @contextlib.contextmanager
    def switches(name):
        saved = dict(triton_ops.SHAW_BANDS)
        fwd, bwd = bands_of.get(name, (saved["fwd"], saved["bwd"]))
        triton_ops.SHAW_BANDS.update(fwd=fwd, bwd=bwd)
        try:
            yield
        finally:
            triton_ops.SHAW_BANDS.update(saved)
    flex_mask = {}
    if dev == "cuda":
        from flex_window import sliding_window_flex

        def flex_fn(q, k, v):
            T = q.shape[2]
            if T not in flex_mask:
                flex_mask[T] = sliding_window_flex(T, L, F)
            return flex_mask[T](q, k, v)

        variants["flex"] = flex_fn
        variants["sdpa-dense"] = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)

    def bench(fn, t, bwd, graph=False):
        g = torch.randn_like(t[0])
        if bwd:
            def step():
                fn(*t).backward(g)
        else:
            def step():
                with torch.no_grad():
                    fn(*t)
        if dev == "cpu":
            step()
            return float("nan")
        if graph:
            # GPU time alone: replaying a CUDA graph removes the Python/launch overhead.
            try:
                return triton.testing.do_bench_cudagraph(step, rep=50, grad_to_none=t, return_mode="median")
            except Exception as exc:
                print(f"cudagraph timing failed ({type(exc).__name__}: {exc}); no graph number", flush=True)
                return float("nan")
        return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median", grad_to_none=t)

    if args.profile:
        profile_kernels(args.profile, variants, inputs, dev)
        return
    if args.dist_caps:
        dist_caps(args.dist_caps, Ts[-1], variants["ours+shaw"], inputs, bench, dev, args.out)
        return

    results = {"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "checks": {}, "sweep": [], "table": []}

    # Correctness at the first size, against the float64 reference, outputs and gradients.
    T = Ts[0]
    for name, fn in variants.items():
        if name in ("sdpa-dense", "ref+shaw"):
            continue
        rel = rel_of[name]
        t = inputs(T, rel, seed=1)
        g = torch.randn(B, H, T, D, device=dev, dtype=dtype)
        with switches(name):
            out = fn(*t)
            got = [out] + list(torch.autograd.grad(out, t, g))
        ex = [x.detach().double().requires_grad_() for x in t]
        kw = dict(rel_k=ex[3], rel_v=ex[4]) if rel else {}
        ref = local_attention_reference(*ex[:3], block=L, flange=F, causal=True, scale=D ** -0.5, **kw)
        want = [ref] + list(torch.autograd.grad(ref, ex, g.double()))
        errs = [((a.double() - b).norm() / b.norm()).item() for a, b in zip(got, want)]
        results["checks"][name] = errs
        print(f"check {name:10s} T={T} rel-err out/grads: " + " ".join(f"{e:.2e}" for e in errs), flush=True)
        assert all(e < 2e-2 for e in errs), f"{name} disagrees with the reference"

    if args.sweep:
        # Each setting is checked against the default tiles (themselves checked above) before timing;
        # the fastest valid one per (rel, kernel) is kept for the table below.
        T = args.sweep_T if dev == "cuda" else 64
        fwd_cfgs = [dict(BM=128, BN=64, num_warps=4, num_stages=3), dict(BM=128, BN=128, num_warps=8, num_stages=3),
                    dict(BM=64, BN=64, num_warps=4, num_stages=3), dict(BM=128, BN=64, num_warps=8, num_stages=2),
                    dict(BM=32, BN=32, num_warps=4, num_stages=2)]
        # The default first (and again last, in the lines below): the first settings of a sweep have
        # read high (call 5 of 2026-12-02: the default 0.918 ms there, 0.644 in run E's sweep).
        bwd_default = (dict(BM=128, BN=32, num_warps=4, num_stages=3), dict(BM=32, BN=128, num_warps=4, num_stages=3))
        bwd_cfgs = [bwd_default,
                    (dict(BM=64, BN=64, num_warps=4, num_stages=2), dict(BM=64, BN=64, num_warps=4, num_stages=2)),
                    (dict(BM=128, BN=64, num_warps=8, num_stages=2), dict(BM=64, BN=128, num_warps=8, num_stages=2)),
                    (dict(BM=64, BN=64, num_warps=4, num_stages=3), dict(BM=64, BN=64, num_warps=4, num_stages=3)),
                    (dict(BM=128, BN=64, num_warps=8, num_stages=3), dict(BM=64, BN=128, num_warps=8, num_stages=3))]
        # dk/dv sits at the 255-register cap (2 programs per SM) on the defaults; budgets of 128 fit 4
        # (the routing dk/dv kernel gained 70-80 us at 64k that way: NOTES_routing.md, 2026-12-02).
        dq_default = dict(BM=128, BN=32, num_warps=4, num_stages=3)
        bwd_cfgs += [(dq_default, dict(BM=32, BN=64, num_warps=4, num_stages=1, maxnreg=128)),
                     (dq_default, dict(BM=32, BN=64, num_warps=4, num_stages=3, maxnreg=128)),
                     (dq_default, dict(BM=32, BN=128, num_warps=4, num_stages=1)),
                     (dq_default, dict(BM=32, BN=64, num_warps=4, num_stages=2, maxnreg=168)),
                     (dq_default, dict(BM=64, BN=64, num_warps=4, num_stages=1, maxnreg=168)), bwd_default]
        # With Shaw tables the default backward tiles (64 x 64, 4 warps) spill heavily on sm_90 (dq: ~630
        # spill stores, 1.4 KB of stack per thread; benchmarks/sm90_resources.py). These compile with no
        # spills: dq 32 x 32 on 8 warps, dk/dv 32 x 64 on 8 warps or 32 x 32 on 4.
        shaw_bwd_cfgs = [(dict(BM=32, BN=32, num_warps=8, num_stages=2), dict(BM=32, BN=64, num_warps=8, num_stages=2)),
                         (dict(BM=32, BN=32, num_warps=8, num_stages=2), dict(BM=32, BN=32, num_warps=4, num_stages=2)),
                         (dict(BM=64, BN=64, num_warps=8, num_stages=2), dict(BM=64, BN=64, num_warps=8, num_stages=2))]
        shaw_fwd_cfgs = [dict(BM=32, BN=32, num_warps=8, num_stages=2), dict(BM=32, BN=32, num_warps=4, num_stages=1)]
        # The Shaw dq kernel also stores P and dS by distance (the table grads): other tiles may suit it.
        d32 = dict(BM=32, BN=32, num_warps=4, num_stages=2)
        shaw_bwd_cfgs += [(dict(BM=32, BN=32, num_warps=4, num_stages=2), d32),
                          (dict(BM=32, BN=64, num_warps=4, num_stages=2), d32),
                          (dict(BM=32, BN=64, num_warps=8, num_stages=2), d32),
                          (dict(BM=64, BN=32, num_warps=8, num_stages=2), d32),
                          (dict(BM=16, BN=64, num_warps=4, num_stages=2), d32)]
        # The Shaw kernels on precomputed bands (triton_ops.SHAW_BANDS) have no band products, so larger
        # tiles may pay off; the defaults come first (they compile with no or few spills on sm_90).
        bands_bwd_cfgs = [(dict(BM=64, BN=32, num_warps=4, num_stages=2), dict(BM=32, BN=64, num_warps=4, num_stages=2)),
                          (d32, d32),
                          (dict(BM=64, BN=64, num_warps=4, num_stages=2), dict(BM=64, BN=64, num_warps=4, num_stages=2)),
                          (dict(BM=64, BN=32, num_warps=4, num_stages=3), dict(BM=32, BN=64, num_warps=4, num_stages=3)),
                          (dict(BM=128, BN=32, num_warps=8, num_stages=2), dict(BM=32, BN=128, num_warps=8, num_stages=2)),
                          (dict(BM=64, BN=32, num_warps=4, num_stages=2), dict(BM=64, BN=64, num_warps=4, num_stages=3))]
        bands_fwd_cfgs = [dict(BM=64, BN=64, num_warps=4, num_stages=2), dict(BM=64, BN=32, num_warps=4, num_stages=2),
                          dict(BM=64, BN=64, num_warps=4, num_stages=3), dict(BM=128, BN=64, num_warps=8, num_stages=2),
                          dict(BM=128, BN=32, num_warps=4, num_stages=3)]
        only = {x for x in args.sweep_only.split(",") if x}
        chosen = {}
        for mode, rel in (("plain", False), ("shaw", True), ("bands", True)):
            kinds = {"plain": (("fwd", fwd_cfgs), ("bwd", bwd_cfgs)),
                     "shaw": (("fwd", fwd_cfgs + shaw_fwd_cfgs), ("bwd", bwd_cfgs + shaw_bwd_cfgs)),
                     "bands": (("fwd", bands_fwd_cfgs), ("bwd", bands_bwd_cfgs))}[mode]
            kinds = [(kind, cfgs) for kind, cfgs in kinds if not only or f"{mode}-{kind}" in only]
            if not kinds:
                continue
            name = {"plain": "ours", "shaw": "ours+shaw", "bands": "shaw-bands"}[mode]
            t = inputs(T, rel)
            fn = variants[name]
            g = torch.randn_like(t[0])
            triton_ops.TILE_OVERRIDES.clear()
            with switches(name):
                out0 = fn(*t)
                grads0 = torch.autograd.grad(out0, t, g)
            best = {}
            for kind, cfgs in kinds:
                # The backward's time is fwd+bwd less the forward, both on the chosen forward tiles (the
                # forward loop above leaves its last setting in TILE_OVERRIDES: a base taken there was
                # 0.38 ms too high at 64k on the H200, so the first 64k sweep's bwd column reads low).
                triton_ops.TILE_OVERRIDES.clear()
                triton_ops.TILE_OVERRIDES.update({k: v for k, v in best.items() if not k.startswith("_")})
                # Inside switches: a base taken outside them timed the gathered Shaw forward on the bands
                # forward's tiles (2026-12-02 call 1: the bands backward read 2.7 ms; the table's
                # fwd+bwd less fwd gives 4.8).
                with switches(name):
                    base = bench(fn, t, False) if kind == "bwd" else 0.0
                for cfg in cfgs:
                    triton_ops.TILE_OVERRIDES.clear()
                    triton_ops.TILE_OVERRIDES.update({k: v for k, v in best.items() if not k.startswith("_")})
                    if kind == "fwd":
                        triton_ops.TILE_OVERRIDES["fwd"] = cfg
                    else:
                        triton_ops.TILE_OVERRIDES.update(dq=cfg[0], dkdv=cfg[1])
                    try:
                        with switches(name):
                            out = fn(*t)
                            grads = torch.autograd.grad(out, t, g)
                            err = max(((a.float() - b.float()).norm() / b.float().norm()).item()
                                      for a, b in zip([out, *grads], [out0, *grads0]))
                            ms = bench(fn, t, kind == "bwd") - base if err < 1e-2 else float("nan")
                    except Exception as exc:  # a tile setting may not fit in shared memory
                        err, ms = float("nan"), float("nan")
                        print(f"sweep {mode} {kind} {cfg}: {type(exc).__name__}", flush=True)
                    results["sweep"].append(dict(mode=mode, rel=rel, kernel=kind, cfg=cfg, ms=ms, err_vs_default=err))
                    print(f"sweep {mode} {kind} {cfg} {ms:.3f} ms (diff vs default tiles {err:.1e})", flush=True)
                    if ms == ms and ms < best.get("_" + kind, float("inf")):
                        best["_" + kind] = ms
                        if kind == "fwd":
                            best["fwd"] = cfg
                        else:
                            best["dq"], best["dkdv"] = cfg
            chosen[mode] = {k: v for k, v in best.items() if not k.startswith("_")}
            print(f"chosen {mode}: {chosen[mode]}", flush=True)
        results["chosen"] = {str(k): v for k, v in chosen.items()}
        triton_ops.TILE_OVERRIDES.clear()
        if only:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "local_sweep.json"), "w") as fh:
                json.dump(results, fh, indent=1)
            return
    else:
        chosen = {}

    for T in Ts:
        fl = flops(T, L, F, True, B, H, D)
        for name, fn in variants.items():
            if name == "ref+shaw" and T > 16384:
                continue
            t = inputs(T, rel_of[name])
            triton_ops.TILE_OVERRIDES.clear()
            mode = {"ours": "plain", "ours+shaw": "shaw", "shaw-bands": "bands", "shaw-bands-bwd": "bands"}.get(name)
            triton_ops.TILE_OVERRIDES.update(chosen.get(mode, {}))
            try:
                with switches(name):
                    fwd, both = bench(fn, t, False), bench(fn, t, True)
                    gfwd, gboth = bench(fn, t, False, graph=True), bench(fn, t, True, graph=True)
                    mib = peak_mib(fn, t, dev)
            except torch.OutOfMemoryError:
                fwd = both = gfwd = gboth = mib = float("nan")
            row = dict(T=T, variant=name, fwd_ms=fwd, fwd_bwd_ms=both, graph_fwd_ms=gfwd, graph_fwd_bwd_ms=gboth,
                       graph_fwd_tflops=fl / gfwd / 1e9, fwd_bwd_mib=mib)
            results["table"].append(row)
            print(f"T={T:6d} {name:10s} fwd {fwd:8.3f} ms  fwd+bwd {both:8.3f} ms | "
                  f"graph fwd {gfwd:8.3f} ms  fwd+bwd {gboth:8.3f} ms | fwd+bwd peak {mib:.0f} MiB", flush=True)
            del t
        flex_mask.clear()

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "local_bench.json"), "w") as fh:
        json.dump(results, fh, indent=1)
    print("\n| T | variant | fwd ms | fwd+bwd ms | graph fwd ms | graph fwd+bwd ms | graph fwd TFLOP/s | fwd+bwd MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["table"]:
        print(f"| {r['T']} | {r['variant']} | {r['fwd_ms']:.3f} | {r['fwd_bwd_ms']:.3f} | "
              f"{r['graph_fwd_ms']:.3f} | {r['graph_fwd_bwd_ms']:.3f} | {r['graph_fwd_tflops']:.0f} | "
              f"{r['fwd_bwd_mib']:.0f} |")


def dist_caps(caps_mib: str, T: int, fn, inputs, bench, dev, out_dir) -> None:
    """The Shaw backward's by-distance buffers against their cap (triton_ops.DIST_BUFFER_BYTES): a lower
    cap does the (batch, head) rows in more chunks, one dq launch and two matmuls each (with
    SHAW_BANDS also two band matmuls and a dk/dv launch each)."""
    from routeformer.ops.local import triton_ops

    default, default_bands = triton_ops.DIST_BUFFER_BYTES, dict(triton_ops.SHAW_BANDS)
    t = inputs(T, True)
    rows = []
    try:
        for bands in (False, True):  # the gathered rel terms, then the precomputed bands (4 buffers)
            triton_ops.SHAW_BANDS.update(fwd=bands, bwd=bands)
            name = "shaw-bands" if bands else "ours+shaw"
            for cap in (int(c) for c in caps_mib.split(",") if c):
                triton_ops.DIST_BUFFER_BYTES = cap << 20
                row = dict(T=T, variant=name, cap_mib=cap, graph_fwd_bwd_ms=bench(fn, t, True, graph=True),
                           fwd_bwd_ms=bench(fn, t, True), fwd_bwd_mib=peak_mib(fn, t, dev))
                rows.append(row)
                print(f"T={T} {name} cap {cap:5d} MiB: graph fwd+bwd {row['graph_fwd_bwd_ms']:.3f} ms, "
                      f"eager {row['fwd_bwd_ms']:.3f} ms, peak {row['fwd_bwd_mib']:.0f} MiB", flush=True)
    finally:
        triton_ops.DIST_BUFFER_BYTES = default
        triton_ops.SHAW_BANDS.update(default_bands)
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "local_dist_caps.json"), "w") as fh:
        json.dump(rows, fh, indent=1)


def peak_mib(fn, t, dev) -> float:
    """Peak memory of one forward+backward above what is allocated before it (inputs, grads of earlier
    steps dropped), MiB; NaN off CUDA. The Shaw backward's by-distance buffers count here."""
    if dev != "cuda":
        return float("nan")
    for x in t:
        x.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn(*t).backward(torch.randn_like(t[0]))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for x in t:
        x.grad = None
    return peak / 2 ** 20


def profile_kernels(T, variants, inputs, dev) -> None:
    """GPU time per kernel of 5 forward+backward passes (torch.profiler), ours without and with Shaw
    (and with Shaw through the precomputed bands, triton_ops.SHAW_BANDS)."""
    from torch.profiler import ProfilerActivity, profile

    from routeformer.ops.local import triton_ops

    saved = dict(triton_ops.SHAW_BANDS)
    for name, rel in (("ours", False), ("ours+shaw", True), ("shaw-bands", True)):
        t = inputs(T, rel)
        g = torch.randn_like(t[0])
        triton_ops.SHAW_BANDS.update(fwd=name == "shaw-bands", bwd=name == "shaw-bands")

        def run(n):
            for _ in range(n):
                for x in t:
                    x.grad = None
                variants[name](*t).backward(g)
            if dev == "cuda":
                torch.cuda.synchronize()

        run(3)
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev == "cuda" else [])
        with profile(activities=acts) as p:
            run(5)
        print(f"== kernel profile {name} T={T} (5 fwd+bwd; times are totals over the 5)", flush=True)
        sort = "cuda_time_total" if dev == "cuda" else "cpu_time_total"
        print(p.key_averages().table(sort_by=sort, row_limit=14, max_name_column_width=60), flush=True)
    triton_ops.SHAW_BANDS.update(saved)


if __name__ == "__main__":
    sys.exit(main())
