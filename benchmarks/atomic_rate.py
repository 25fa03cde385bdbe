"""Can topk's dq be summed with atomics inside the dk/dv kernel? The traffic that would need, alone.

A fused backward (dk/dv's program for slot tile j also computing dq = dS @ K for each entry tile i >= j
of its cluster) would add one fp32 [64, 64] tile per (entry tile, slot tile) pair into the token rows of
the tile's entries: at T = 64k, 8 heads, 128 clusters of 512, 64-row tiles, 36 pairs per cluster and
head, 151 M fp32 adds (604 MB). This script times that traffic in the same pattern (grid = slot tiles x
cluster-heads, each program looping over its entry tiles, rows through a sorted random sample of 512
token positions per cluster, the tile read from gathered bf16 rows so nothing folds away) as:
  store     tl.store of each tile (racy; the write ceiling of the pattern)
  relaxed   tl.atomic_add(..., sem="relaxed")
  acq_rel   tl.atomic_add with Triton's default semantics
  none      the gathers alone (no write)
and prints us per launch and the adds' rate. The dq kernel this would replace takes ~192 us and its
combine ~50 (NOTES_routing.md, session 24).

    PYTHONPATH=src python benchmarks/atomic_rate.py [--T 65536] [--out atomic_rate.json]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import re
from pathlib import Path

import torch
import triton
import triton.language as tl

_spec = importlib.util.spec_from_file_location("attention_bench", Path(__file__).with_name("attention.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@triton.jit
def _pairs_kernel(SRC, POS, DST, T, W: tl.constexpr, BLOCK: tl.constexpr, D: tl.constexpr,
                  MODE: tl.constexpr):
    j = tl.program_id(0)
    ch = tl.program_id(1).to(tl.int64)
    offs_d = tl.arange(0, D)
    acc = tl.zeros([BLOCK, D], dtype=tl.float32)
    h = ch // (T // W)
    for i in range(j, W // BLOCK):
        rows = tl.load(POS + ch * W + i * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)
        ptr_off = (h * T + rows)[:, None] * D + offs_d[None, :]
        tile = tl.load(SRC + ptr_off).to(tl.float32) + i
        if MODE == 0:
            tl.store(DST + ptr_off, tile)
        elif MODE == 1:
            tl.atomic_add(DST + ptr_off, tile, sem="relaxed")
        elif MODE == 2:
            tl.atomic_add(DST + ptr_off, tile)
        else:
            acc += tile
    if MODE == 3:
        tl.store(DST + (ch * BLOCK + tl.arange(0, BLOCK))[:, None] * D + offs_d[None, :], acc)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    T, H, D, W, BLOCK = args.T, 8, 64, 512, 64
    C = T // W
    g = torch.Generator(device="cuda").manual_seed(0)
    src = torch.randn(H * T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    scores = torch.rand(H * C, T, device="cuda", generator=g)
    pos = scores.topk(W, dim=1).indices.sort(dim=1).values.to(torch.int32).contiguous()
    dst = torch.zeros(H * T, D, device="cuda", dtype=torch.float32)
    pairs = H * C * (W // BLOCK) * (W // BLOCK + 1) // 2
    adds = pairs * BLOCK * D
    rows = []
    for name, mode in (("store", 0), ("relaxed", 1), ("acq_rel", 2), ("none", 3)):
        def launch(mode=mode):
            _pairs_kernel[(W // BLOCK, H * C)](src, pos, dst, T, W, BLOCK, D, mode, num_warps=4)
        ms = bench._bench_graph(launch)
        rows.append({"T": T, "mode": name, "us": ms * 1e3, "pairs": pairs,
                     "G adds/s": adds / ms / 1e6 if mode != 3 else None,
                     "GB/s of fp32 tiles": adds * 4 / ms / 1e6 if mode != 3 else None})
    # Correctness of the relaxed adds (the sum of every pair's tile), so the timing is of real work.
    dst.zero_()
    _pairs_kernel[(W // BLOCK, H * C)](src, pos, dst, T, W, BLOCK, D, 1, num_warps=4)
    want = torch.zeros_like(dst)
    n_tiles = W // BLOCK
    for i in range(n_tiles):
        r = (torch.arange(H * C, device="cuda")[:, None] // C * T + pos[:, i * BLOCK:(i + 1) * BLOCK]).long()
        tile = src[r.reshape(-1)].float() + i
        want.index_add_(0, r.reshape(-1), tile * (i + 1))  # slot tiles 0..i each add it once
    err = (dst - want).abs().max().item()
    print(f"relaxed adds against index_add_: max abs err {err:.3g}")
    for mode in (1, 2):  # are the adds vectorized (red.global.v4.f32) or one per element?
        k = _pairs_kernel[(W // BLOCK, H * C)](src, pos, dst, T, W, BLOCK, D, mode, num_warps=4)
        ops = sorted(set(re.findall(r"\b(?:red|atom)\.[\w.]+", k.asm["ptx"])))
        print(f"mode {mode} PTX atomics: {ops}")
    print(f"{'mode':<8} {'us':>9} {'G adds/s':>9} {'GB/s':>8}")
    for r in rows:
        rate = f"{r['G adds/s']:9.1f} {r['GB/s of fp32 tiles']:8.0f}" if r["G adds/s"] else f"{'':>9} {'':>8}"
        print(f"{r['mode']:<8} {r['us']:9.1f} {rate}")
    if args.out:
        Path(args.out).write_text(json.dumps({"rows": rows, "max_abs_err": err}, indent=1))


if __name__ == "__main__":
    main()
