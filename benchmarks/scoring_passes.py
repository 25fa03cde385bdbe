"""topk's scoring passes planned three ways, side by side: blocks of heads against all clusters
(triton_ops.scoring_passes' default, HEAD_PASSES), smaller head blocks (ROWS_PER_PASS), and chunks of
clusters against all heads (HEAD_PASSES False, before session 17). For each: the assignment alone
(topk_index, the scoring passes and their selects) and topk's whole fwd+bwd, both as CUDA-graph
replays, and the forward's peak memory above the inputs; all plans must select the same positions.

    PYTHONPATH=src python benchmarks/scoring_passes.py [--T 65536,131072] [--out scoring_passes.json]

Setting as benchmarks/attention.py: bf16, B=1, H=8, D=64, window 512, causal, shared QK, C = T / 512.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location("attention_bench", Path(__file__).with_name("attention.py"))
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@contextlib.contextmanager
def _plan(head_passes: bool, rows: int | None):
    """rows: that many heads per pass against all clusters (ROWS_PER_PASS, with a cluster chunk past C)."""
    from routeformer.ops.routing import triton_ops as TO

    saved = TO.HEAD_PASSES, TO.ROWS_PER_PASS, TO.CLUSTER_CHUNK
    TO.HEAD_PASSES, TO.ROWS_PER_PASS = head_passes, rows
    if rows is not None:
        TO.CLUSTER_CHUNK = 1 << 30
    try:
        yield
    finally:
        TO.HEAD_PASSES, TO.ROWS_PER_PASS, TO.CLUSTER_CHUNK = saved


def _graph_fwdbwd(q, v, dout, centroids) -> float:
    """topk's fwd+bwd replayed from a CUDA graph, captured as attention.py's _graph_rows does (gradients
    None before the capture, so the replay writes them rather than accumulating)."""
    from routeformer.ops import routing_attention

    def step():
        routing_attention(q, q, v, centroids, window=bench.WINDOW, causal=True, assign="topk",
                          backend="triton").backward(dout)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    q.grad = v.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    ms = bench._bench(graph.replay)
    q.grad = v.grad = None
    return ms


def measure(T: int) -> list[dict]:
    from routeformer.ops import routing_attention
    from routeformer.ops.routing import triton_ops as TO

    q, _, v, dout, centroids = bench._inputs(T)
    C = T // bench.WINDOW
    x = q.detach()
    default_rows = TO.scoring_passes(x, C)[0]
    plans = [("heads x all clusters (default)", True, None)]
    if default_rows is not None and default_rows > 1:
        plans.append((f"{default_rows // 2} heads x all clusters", True, default_rows // 2))
    plans.append(("clusters chunks x all heads (HEAD_PASSES False)", False, None))
    want = None
    rows = []
    for name, head_passes, n in plans:
        with _plan(head_passes, n):
            plan = TO.scoring_passes(x, C)
            got = TO.topk_index(x, centroids, bench.WINDOW)
            want = got if want is None else want
            same = bool(torch.equal(got, want))
            with torch.no_grad():
                index_ms = bench._bench_graph(lambda: TO.topk_index(x, centroids, bench.WINDOW))

            fwdbwd_ms = _graph_fwdbwd(q, v, dout, centroids)
            with torch.no_grad():
                fwd_mib = bench._peak_mib(lambda: routing_attention(q, q, v, centroids, window=bench.WINDOW,
                                                                    causal=True, assign="topk", backend="triton"))
        rows.append({"T": T, "plan": name, "passes (heads, clusters)": str(plan), "same positions": same,
                     "topk_index ms": index_ms, "graph fwd+bwd ms": fwdbwd_ms, "fwd MiB": fwd_mib})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--T", default="65536,131072", help="comma list of sequence lengths")
    p.add_argument("--out", default=None, help="JSON file for the rows")
    a = p.parse_args()
    rows = [r for T in a.T.split(",") for r in measure(int(T))]
    if a.out:
        Path(a.out).write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": rows}, indent=1))
    print("| T | plan | passes (heads, clusters) | same | topk_index ms | graph fwd+bwd ms | fwd MiB |")
    print("|---:|---|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['T']} | {r['plan']} | {r['passes (heads, clusters)']} | {r['same positions']} "
              f"| {r['topk_index ms']:.3f} | {r['graph fwd+bwd ms']:.3f} | {r['fwd MiB']:.0f} |")
    if not all(r["same positions"] for r in rows):
        raise SystemExit("the plans selected different positions")


if __name__ == "__main__":
    main()
