"""Where topk's threshold select spends its time: one scoring pass's rows (at T = 64k, W = 512, H = 8:
64 clusters x 8 heads under the inference budget of 2, all 128 clusters under TRAINING_SCORE_BUDGET's 4),
real scores of random bf16 rows against unit centroids.

    PYTHONPATH=src python benchmarks/select_phases.py [--T 65536,131072] [--budgets 2,4] [--out phases.json]

Rows: the two-stage select (top-W groups, then their positions: the default before session 13), the
threshold select as topk_index runs it (the kernel and the two fallback launches, which return at once
on unflagged rows), and the kernel stopped after each of its phases (_threshold_select_kernel's
PHASES): 1 the first bisection (L1), 2 the kept groups, 3 the kept positions. Also the per-row counts
of kept groups and positions (against the buffers' CAP) and a check that both selects agree. Times are
medians of CUDA-event timings of CUDA-graph replays (benchmarks/attention.py's _bench_graph).
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


def measure(T: int, budget: int = 2) -> list[dict]:
    from routeformer.ops.routing import scores
    from routeformer.ops.routing import triton_ops as TO
    from routeformer.ops.routing._score_kernels import fused_scores

    H, D, W = 8, 64, 512
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(1, H, T, D, device="cuda", dtype=torch.bfloat16, generator=g)
    centroids = torch.nn.functional.normalize(torch.randn(H, T // W, D, device="cuda", generator=g), dim=-1)
    chunk = TO.cluster_chunk(x, T // W, budget)
    s_t, gmax = fused_scores(x, centroids, 0, chunk)
    group = scores.GROUP
    out = torch.empty((1, H, chunk, W), dtype=torch.int32, device="cuda")
    sg, nb, cap = TO.threshold_plan(T, W, group)
    rows = []

    def two_stage():
        TO._launch_select(s_t, out, W, 0, groups=TO.select_top(gmax, W), group=group)

    two_stage()
    want = out.clone()
    flag = TO._launch_threshold_select(s_t, gmax, out, W, 0, group)
    agree = torch.equal(out, want)
    stats = {p: TO._launch_threshold_select(s_t, gmax, out, W, 0, group, phases=p).float() for p in (2, 3)}
    base = {"T": T, "budget": budget, "rows": H * chunk, "SG": sg, "NB": nb, "CAP": cap}
    rows.append({**base, "name": "two-stage select", "ms": bench._bench_graph(two_stage)})
    rows.append({**base, "name": "threshold select", "ms": bench._bench_graph(
        lambda: TO._launch_threshold_select(s_t, gmax, out, W, 0, group)), "agrees": agree,
        "flagged": int(flag.sum()), "kept groups mean/max": [stats[2].mean().item(), stats[2].max().item()],
        "kept positions mean/max": [stats[3].mean().item(), stats[3].max().item()]})
    for p in (1, 2, 3):
        rows.append({**base, "name": f"threshold kernel, phases 1..{p}", "ms": bench._bench_graph(
            lambda p=p: TO._launch_threshold_select(s_t, gmax, out, W, 0, group, phases=p))})
    # The first bound's slack (THRESHOLD_L1_SLACK): the default against the exact search, phase 1 and
    # all of it, with the kept positions it leaves.
    slack = TO.THRESHOLD_L1_SLACK
    for value in (0, slack):
        TO.THRESHOLD_L1_SLACK = value
        kept = TO._launch_threshold_select(s_t, gmax, out, W, 0, group, phases=3).float()
        TO._launch_threshold_select(s_t, gmax, out, W, 0, group)
        rows.append({**base, "name": f"slack {value}: phase 1", "ms": bench._bench_graph(
            lambda: TO._launch_threshold_select(s_t, gmax, out, W, 0, group, phases=1))})
        rows.append({**base, "name": f"slack {value}: threshold select", "ms": bench._bench_graph(
            lambda: TO._launch_threshold_select(s_t, gmax, out, W, 0, group)), "agrees": torch.equal(out, want),
            "kept positions mean/max": [kept.mean().item(), kept.max().item()]})
    TO.THRESHOLD_L1_SLACK = slack
    default = TO.THRESHOLD_TILES["cuda"]
    for cfg in TILES:  # (CHUNK_G, warps, stages) of the kept-positions loop
        TO.THRESHOLD_TILES["cuda"] = cfg
        try:
            ms = bench._bench_graph(lambda: TO._launch_threshold_select(s_t, gmax, out, W, 0, group))
            rows.append({**base, "name": f"threshold select {cfg}", "ms": ms, "agrees": torch.equal(out, want)})
        except Exception as e:  # a setting that does not compile is a row, not the end of the run
            rows.append({**base, "name": f"threshold select {cfg}", "ms": float("nan"), "error": str(e)[:80]})
    TO.THRESHOLD_TILES["cuda"] = default
    return rows


# Settings timed after the phases, the default first and last.
# Session 17 added one- and two-warp rows: a row's searches are chains of block-wide sums, which on one
# warp need no barrier or shared memory.
# Session 19 added two-warp rows for the training pass's 1024 rows at 64k (more than one wave of 4-warp programs: 5-6 per SM fit, ~660-790).
TILES = [(64, 2, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2), (64, 4, 3), (64, 4, 1), (128, 2, 2), (128, 2, 3),
         (64, 2, 2), (32, 2, 3), (64, 1, 2), (64, 1, 3), (32, 1, 2), (32, 1, 3), (16, 1, 3), (64, 2, 3)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", default="65536,131072")
    ap.add_argument("--budgets", default="2,4", help="scoring budgets (cluster_chunk) whose pass to select")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    rows = [r for T in map(int, args.T.split(",")) for b in map(int, args.budgets.split(",")) for r in measure(T, b)]
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"{'T':>7} {'rows':>5} {'select':34s} {'us':>7}  notes")
    for r in rows:
        notes = {k: v for k, v in r.items() if k not in ("T", "budget", "name", "ms", "rows", "SG", "NB", "CAP")}
        print(f"{r['T']:7d} {r['rows']:5d} {r['name']:34s} {r['ms'] * 1e3:7.1f}  {notes or ''}")
    print(f"(SG {rows[0]['SG']}, NB {rows[0]['NB']}, CAP {rows[0]['CAP']} at T = {rows[0]['T']})")


if __name__ == "__main__":
    main()
