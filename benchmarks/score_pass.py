"""What one of topk's scoring passes is bound by: a pass of 64 clusters x 8 heads at T = 64k, W = 512
(float32 scores and group maxima; the cluster passes, triton_ops.HEAD_PASSES False), the same kernel
without the scores' stores (_scores_kernel's STORE_SCORES: the group maxima alone), the pass topk_index
runs by default (triton_ops.scoring_passes: 128 clusters x 4 heads, the same bytes), and the device's
write ceiling for the same bytes (a torch fill of a buffer the size of the scores; and a copy).

    PYTHONPATH=src python benchmarks/score_pass.py [--T 65536] [--out score_pass.json]

Times are medians of CUDA-event timings of CUDA-graph replays (benchmarks/attention.py's _bench_graph);
GB/s counts the scores' bytes only (the input rows, 1/16 of them, and the group maxima aside).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("attention_bench", Path(__file__).with_name("attention.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def measure(T: int) -> list[dict]:
    from routeformer.ops.routing import _score_kernels as SK
    from routeformer.ops.routing import triton_ops as TO

    H, D, W = 8, 64, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    centroids = torch.nn.functional.normalize(torch.randn(H, T // W, D, device="cuda", generator=g), dim=-1)
    chunk = TO.cluster_chunk(x, T // W)
    cent = centroids.float().contiguous()
    pieces = SK._centroid_pieces(x, cent, centred=False, argmax=False)
    s_ref, gmax_ref = SK._launch(x, cent, True, False, 0, chunk, pieces=pieces)[:2]
    gmax_only = SK._launch(x, cent, True, False, 0, chunk, pieces=pieces, store_scores=False)[1]
    if not torch.equal(gmax_only, gmax_ref):
        raise SystemExit("STORE_SCORES=False changed the group maxima: the timing would not be of the same work")
    rows_per_pass, head_chunk = TO.scoring_passes(x, T // W)
    n_rows = H if rows_per_pass is None else rows_per_pass
    head_pass = SK._launch(x, cent, True, False, 0, head_chunk, pieces=pieces, bh_count=n_rows)[0]
    nbytes = s_ref.numel() * s_ref.element_size()
    buf, other = torch.empty_like(s_ref), torch.empty_like(s_ref)
    rows = []
    for name, fn, moved in (
            (f"cluster pass: {chunk} clusters x {H} heads (scores + group maxima)",
             lambda: SK._launch(x, cent, True, False, 0, chunk, pieces=pieces), nbytes),
            ("the same, group maxima only",
             lambda: SK._launch(x, cent, True, False, 0, chunk, pieces=pieces, store_scores=False), 0),
            (f"default pass: {head_chunk} clusters x {n_rows} heads",
             lambda: SK._launch(x, cent, True, False, 0, head_chunk, pieces=pieces, bh_count=n_rows),
             head_pass.numel() * head_pass.element_size()),
            ("torch fill of the scores' bytes", lambda: buf.fill_(0.5), nbytes),
            ("torch copy of the scores' bytes (read + write)", lambda: other.copy_(buf), 2 * nbytes)):
        with torch.no_grad():
            ms = bench._bench_graph(fn)
        rows.append({"T": T, "what": name, "us": ms * 1e3, "GB/s": moved / ms / 1e6 if moved else None})
    # The default pass on other pipeline stages (PRESPLIT_STAGES: its loop runs four cluster tiles,
    # where the cluster passes ran two) and cluster tiles (TILES); stages must keep the bits.
    stages, tiles = SK.PRESPLIT_STAGES, dict(SK.TILES)
    for what, n_stages, tile in (("stages 1", 1, None), ("stages 3", 3, None), ("tile (128, 64, 4)", None, (128, 64, 4)),
                                 ("tile (128, 64, 8)", None, (128, 64, 8)), ("tile (64, 32, 4)", None, (64, 32, 4))):
        SK.PRESPLIT_STAGES = n_stages or stages
        SK.TILES["cuda"] = tile or tiles["cuda"]
        try:
            got = SK._launch(x, cent, True, False, 0, head_chunk, pieces=pieces, bh_count=n_rows)[0]
            with torch.no_grad():
                ms = bench._bench_graph(lambda: SK._launch(x, cent, True, False, 0, head_chunk, pieces=pieces,
                                                           bh_count=n_rows))
            rows.append({"T": T, "what": f"default pass, {what}", "us": ms * 1e3, "GB/s": None,
                         "same bits": bool(torch.equal(got, head_pass))})
        except Exception as e:  # a setting that does not fit is a row, not the end of the run
            rows.append({"T": T, "what": f"default pass, {what}: {type(e).__name__}", "us": float("nan"), "GB/s": None})
        finally:
            SK.PRESPLIT_STAGES = stages
            SK.TILES.clear()
            SK.TILES.update(tiles)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", default="65536", help="comma list of sequence lengths")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args()
    rows = [r for T in a.T.split(",") for r in measure(int(T))]
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print("| T | what | us | GB/s |\n|---:|---|---:|---:|")
    for r in rows:
        gbs = f"{r['GB/s']:.0f}" if r["GB/s"] else "-"
        same = "" if "same bits" not in r else f" (same bits: {r['same bits']})"
        print(f"| {r['T']} | {r['what']}{same} | {r['us']:.1f} | {gbs} |")


if __name__ == "__main__":
    main()
