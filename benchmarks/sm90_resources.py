"""Compile every Triton kernel of the benchmark setting for sm_90 (H100 / H200) on this machine, no GPU
needed, and report each one's registers, stack frame and spill instructions (STL / LDL in the SASS:
ptxas spills to the stack, and LOCAL stays 0), shared memory, and the size of each loop in SASS
instructions (with the spill instructions inside loops).

    TRITON_INTERPRET=0 PYTHONPATH=src python benchmarks/sm90_resources.py [--T 65536] [--json FILE]
        [--sass DIR] [--only NAME]

Loop sizes are the per-tile cost of a kernel's inner loops: session 11 (NOTES_routing.md) found its
mask and addressing changes by counting them (576 -> 379 instructions per unmasked forward tile).
The device's Triton may compile differently, so the GPU's timings decide. To compile with the
device's own Triton version (3.6 on the H200 image; session 21 found a kernel that 3.9 built and 3.6's
pipeliner rejected), put that wheel first on the path:
    python -m pip install --no-deps --target /tmp/t36 triton==3.6.0
    TRITON_INTERPRET=0 PYTHONPATH=/tmp/t36:src python benchmarks/sm90_resources.py --only _fwd_kernel

--sass writes each kernel's SASS to DIR for reading; --only keeps the kernels whose name contains NAME.

The launchers run for real on meta tensors (shapes and dtypes, no data; ops._checks.gpu_plan makes
them choose GPU tiles, warps and precisions for meta tensors), with every Triton kernel replaced by a
recorder, so the recorded launches carry exactly the arguments, tile sizes, warps and stages a CUDA
launch would get: routing topk and nearest (shared and separate keys)
forward and backward, and local attention with and without Shaw tables (bf16, B=1, H=8, D=64,
window 512; local block 256, flange 256), and the score kernel at head dim 128 in bf16 and float32
(its shared memory grows with both). Each distinct launch is then compiled ahead of time with the
installed Triton's own compiler and ptxas for sm_90a, and `cuobjdump --dump-resource-usage` reads
the cubin (and the SASS, for Hopper's warpgroup MMA HGMMA against the older HMMA). A compile error
here is a compile error on the GPU (for this Triton version; the GPU image
may carry another). What this cannot say is how fast anything runs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

B, H, D, WINDOW, BLOCK, FLANGE = 1, 8, 64, 512, 256, 256
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
                 torch.int32: "i32", torch.int64: "i64", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


class _Recorder:
    """Stands in for a @triton.jit kernel: `kernel[grid](*args, **kwargs)` records the launch."""

    def __init__(self, fn, log: list):
        self.fn, self.log = fn, log

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.fn, args, kwargs))
        return launch


def _kernel_slots():
    """(module, attribute) of every kernel object a launcher looks up at call time."""
    from routeformer.ops.local import triton_ops as L
    from routeformer.ops.routing import _kernels as K
    from routeformer.ops.routing import _perm_kernels as PK
    from routeformer.ops.routing import _select_kernels as SK
    from routeformer.ops.routing import _score_kernels as S

    routing = [(K, n) for n in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_combine_kernel",
                                "_topk_compact_kernel", "_gather_groups_kernel",
                                "_count_below_kernel", "_slot_bounds_kernel", "_tile_entry_ranges_kernel",
                                "_nearest_slots_kernel")]
    routing += [(SK, n) for n in ("_select_rows_kernel", "_threshold_select_kernel")]
    routing += [(PK, n) for n in ("_membership_kernel", "_entry_counts_kernel", "_entry_perm_kernel")]
    local = [(L, n) for n in ("_fwd_kernel", "_fwd_bands_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel")]
    return routing + [(S, "_scores_kernel"), (S, "_centroid_pieces_kernel")] + local


@contextlib.contextmanager
def recording(log: list):
    """Kernels replaced by recorders; the fused score kernel taken as on CUDA; separate keys told
    apart by identity (meta tensors share data_ptr 0)."""
    from routeformer.ops.routing import scores
    from routeformer.ops.routing import triton_ops as TO

    saved = [(m, n, getattr(m, n)) for m, n in _kernel_slots()]
    kernels = len(saved)
    saved += [(scores, "use_fused", scores.use_fused), (TO, "_skip_empty", TO._skip_empty)]
    try:
        for m, n, fn in saved[:kernels]:
            setattr(m, n, _Recorder(fn, log))
        scores.use_fused = lambda x: True
        TO._skip_empty = lambda q, k, direct: direct and k is not q
        yield
    finally:
        for m, n, fn in saved:
            setattr(m, n, fn)


def record_launches(T: int) -> list:
    from routeformer.ops.local import triton_ops as L
    from routeformer.ops.routing import triton_ops as TO

    log: list = []
    with recording(log):
        mk = lambda *s, dtype=torch.bfloat16: torch.empty(*s, dtype=dtype, device="meta")  # noqa: E731
        q, k, v, dout = (mk(B, H, T, D) for _ in range(4))
        centroids = mk(H, max(1, T // WINDOW), D, dtype=torch.float32)
        scale = D ** -0.5
        for assign in ("topk", "nearest"):
            for keys in (q, k):
                shared = keys is q
                idx = TO.routing_indices(q, keys, centroids, WINDOW, True, assign)
                direct = assign == "nearest"
                run = 0 if direct else idx[0].shape[1] // centroids.shape[1]  # as routing_attention_triton
                saved = TO._routing_fwd.impl(q, keys, v, *idx, scale, direct, shared, 0, run)
                TO._routing_bwd.impl(dout, q, keys, v, saved[0], saved[1], saved[2], saved[3], *idx,
                                     saved[4], saved[5], scale, direct, shared, 0, run)
                if run:  # the sorted per-token index too (run 0: torch.sort and _count_below_kernel)
                    TO._routing_fwd.impl(q, keys, v, *idx, scale, direct, shared)
        # The tf32x3 score kernel (bf16 inputs take the bf16-split one by default) compiles too.
        from routeformer.ops.routing import _score_kernels as SK

        split, SK.BF16_SPLIT_SCORES = SK.BF16_SPLIT_SCORES, False
        try:
            for assign in ("topk", "nearest"):
                TO.routing_indices(q, q, centroids, WINDOW, True, assign)
        finally:
            SK.BF16_SPLIT_SCORES = split
        rel = mk(2 * 513 + 1, D)
        for rk, rv in ((None, None), (rel, rel)):
            out, lse = L.local_attn_fwd.impl(q, k, v, rk, rv, BLOCK, FLANGE, True, scale)
            # With tables: the dq kernel that also stores P and dS by distance (the table grads).
            L.local_attn_bwd.impl(dout, q, k, v, out, lse, rk, rv, BLOCK, FLANGE, True, scale, rk is not None)
        # The score kernel at head dim 128 (argmax with counts, and a scoring pass), in bf16 and float32:
        # its shared memory grows with the head dim and the input's width, and an argmax tile that fit
        # at 64 asked for 256 KiB at 96 and 128 on the H200 (NOTES_routing.md, session 7).
        from routeformer.ops._ints import next_pow2

        for dt in (torch.bfloat16, torch.float32):
            wide = mk(B, H, T, 128, dtype=dt)
            wide_c = mk(H, max(1, T // WINDOW), 128, dtype=torch.float32)
            SK._launch(wide, wide_c, write=False, argmax=True, count_bins=next_pow2(wide_c.shape[1]))
            SK._launch(wide, wide_c, write=True, argmax=False)
        # The Shaw forward and backward on precomputed rel-logit bands (triton_ops.SHAW_BANDS).
        bands, L.SHAW_BANDS = L.SHAW_BANDS, {"fwd": True, "bwd": True}
        try:
            L.local_attn_fwd.impl(q, k, v, rel, rel, BLOCK, FLANGE, True, scale)
            L.local_attn_bwd.impl(dout, q, k, v, out, lse, rel, rel, BLOCK, FLANGE, True, scale, True)
        finally:
            L.SHAW_BANDS = bands
    return log


def _signature(fn, args, kwargs):
    """The JIT's view of one launch: (signature, constexprs, attrs, options)."""
    names = fn.arg_names
    const_idx = set(fn.constexprs)
    runtime = [n for i, n in enumerate(names) if i not in const_idx]
    if len(args) > len(runtime):
        raise ValueError(f"{fn.__name__}: constexprs passed by position are not supported here")
    values = dict(zip(runtime, args))
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if i in const_idx:
            signature[name] = "constexpr"
            constexprs[name] = kwargs[name]
            continue
        value = values[name]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch's allocations are aligned
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}.{name}: cannot type {type(value).__name__}")
    options = {"num_warps": kwargs.get("num_warps", 4), "num_stages": kwargs.get("num_stages", 3)}
    if kwargs.get("maxnreg") is not None:  # a register budget per thread (ptx .maxnreg)
        options["maxnreg"] = kwargs["maxnreg"]
    return signature, constexprs, attrs, options


def _cuobjdump() -> str:
    import triton

    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


_ADDRESS = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", re.M)
_SPILL = re.compile(r"\b(?:STL|LDL)(?:\.|\s)")


def sass_loops(sass: str) -> list[dict]:
    """Each loop of a kernel's SASS: a branch back to an earlier address closes one. -> [{"start", "end",
    "instructions", "spills"}] in address order (an outer loop's count includes its inner loops)."""
    ins = [(int(a, 16), text) for a, text in _ADDRESS.findall(sass)]
    loops = []
    for addr, text in ins:
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            lo = int(target.group(1), 16)
            body = [t for a, t in ins if lo <= a <= addr]
            loops.append({"start": lo, "end": addr, "instructions": len(body),
                          "spills": sum(1 for t in body if _SPILL.search(t))})
    return sorted(loops, key=lambda r: r["start"])


def compile_launch(fn, args, kwargs, sass_dir: str = "") -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs, options = _signature(fn, args, kwargs)
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    seconds = time.perf_counter() - start
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        dump = lambda *flags: subprocess.run([_cuobjdump(), *flags, f.name], capture_output=True,  # noqa: E731
                                             text=True, check=True).stdout
        usage, sass = dump("--dump-resource-usage"), dump("-sass")
    res = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", usage))
    # Hopper's warpgroup MMA (HGMMA) vs the older per-warp mma.sync (HMMA): HOPPER.md's first check.
    mma = {op: len(re.findall(rf"\b{op}\.", sass)) for op in ("HGMMA", "HMMA")}
    # Register spills go to the per-thread stack frame (STACK; LOCAL stays 0): count its stores and loads.
    spills = {"STL": len(re.findall(r"\bSTL(?:\.|\s)", sass)), "LDL": len(re.findall(r"\bLDL(?:\.|\s)", sass))}
    loops = sass_loops(sass)
    flags = {k: v for k, v in constexprs.items() if not k.startswith("BLOCK") and k not in ("BM", "BN", "BD", "BDV")}
    tiles = {k: v for k, v in constexprs.items() if k not in flags}
    if sass_dir:
        name = "_".join([fn.fn.__module__.rsplit(".", 2)[-2], fn.__name__] +
                        [f"{k}{v}" for k, v in {**flags, **tiles}.items()] + [f"w{options['num_warps']}"])
        Path(sass_dir, re.sub(r"[^A-Za-z0-9_.-]", "", name) + ".sass").write_text(sass)
    return {"kernel": fn.__name__, "module": fn.fn.__module__.rsplit(".", 2)[-2], "flags": flags, "tiles": tiles,
            "loops": [r["instructions"] for r in loops], "loop_spills": sum(r["spills"] for r in loops),
            **options, "regs": int(res.get("REG", -1)), "local_bytes": int(res.get("LOCAL", 0)),
            "stack_bytes": int(res.get("STACK", 0)), "shared_bytes": kernel.metadata.shared, **mma, **spills,
            "compile_s": round(seconds, 2)}


def distinct(log: list) -> list:
    seen, out = set(), []
    for fn, args, kwargs in log:
        sig, consts, _, opts = _signature(fn, args, kwargs)
        key = (fn.__name__, fn.fn.__module__, tuple(sig.items()), tuple(sorted(consts.items())), tuple(opts.items()))
        if key not in seen:
            seen.add(key)
            out.append((fn, args, kwargs))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=65536, help="sequence length of the recorded launches")
    p.add_argument("--json", default="", help="write the rows here")
    p.add_argument("--sass", default="", help="write each kernel's SASS into this folder")
    p.add_argument("--only", default="", help="only the kernels whose name contains this")
    args = p.parse_args(argv)
    if args.sass:
        Path(args.sass).mkdir(parents=True, exist_ok=True)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        sys.exit("run with TRITON_INTERPRET=0: the interpreter's kernels cannot be compiled")
    launches = [x for x in distinct(record_launches(args.T)) if args.only in x[0].__name__]
    rows, failures = [], []
    for fn, a, kw in launches:
        try:
            rows.append(compile_launch(fn, a, kw, args.sass))
        except Exception as err:  # one kernel's failure is a row, and the exit code says so
            failures.append(f"{fn.fn.__module__}.{fn.__name__}: {type(err).__name__}: {str(err)[:300]}")
    import triton

    print(f"sm_90 resources, triton {triton.__version__}, T={args.T}, bf16 H={H} D={D} W={WINDOW}")
    print("| module | kernel | flags | tiles | warps | stages | regs | stack B | spill st / ld | shared KiB "
          "| HGMMA / HMMA | loop instructions (spills in loops) |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['module']} | {r['kernel']} | {r['flags']} | {r['tiles']} | {r['num_warps']} | {r['num_stages']} "
              f"| {r['regs']} | {r['stack_bytes']} | {r['STL']} / {r['LDL']} | {r['shared_bytes'] / 1024:.1f} "
              f"| {r['HGMMA']} / {r['HMMA']} | {', '.join(map(str, r['loops'])) or '-'} ({r['loop_spills']}) |")
    for f in failures:
        print("FAILED", f)
    if args.json:
        Path(args.json).write_text(json.dumps({"triton": triton.__version__, "T": args.T, "rows": rows,
                                               "failures": failures}, indent=1))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
