"""benchmarks/attention.py --ab switches changes back one at a time; a switched-back variant must compute
the same thing, or its timing compares different work. Runs on CPU under the interpreter."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from routeformer.ops.routing import triton_ops as TO

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("attention_bench", ROOT / "benchmarks" / "attention.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("assign,causal", [("topk", True), ("topk", False), ("nearest", True)])
def test_torch_index_ops_variant_builds_the_same_indices(assign, causal):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 300, 16, generator=g)
    centroids = torch.randn(2, 6, 16, generator=g)
    centroids[:, 3:] *= 0.01  # crowded clusters: the nearest window binds
    with torch.no_grad():
        want = TO.routing_indices(x, x, centroids, 40, causal, assign)
        want_rowptr = TO._inverse(want[0], 300)[1]
        rows = want[2][:, ::7].contiguous()  # sorted rows (hi is non-decreasing)
        want_counts = [TO.count_below(rows, 9, 5, 3, 40, right) for right in (False, True)]
        with bench._variant("torch index ops"):
            assert TO.count_below is bench._torch_count_below
            got = TO.routing_indices(x, x, centroids, 40, causal, assign)
            got_rowptr = TO._inverse(want[0], 300)[1]
            got_counts = [TO.count_below(rows, 9, 5, 3, 40, right) for right in (False, True)]
    assert TO.count_below is not bench._torch_count_below  # restored
    for name, a, b in zip(("qpos", "lo", "hi", "kpos", "rowptr", "count", "count right"),
                          [*got, got_rowptr, *got_counts], [*want, want_rowptr, *want_counts]):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_candidate_gather_ops_variant_selects_the_same(monkeypatch):
    """'candidate gather ops' (topk's second stage as a gather kernel plus torch ops) against the
    one-launch select, on the fused score path (interpreter) with exact ties and several passes."""
    from routeformer.ops.routing import scores

    monkeypatch.setattr(scores, "use_fused", lambda x: True)
    monkeypatch.setattr(scores, "GROUP", 4)
    monkeypatch.setattr(TO, "CLUSTER_CHUNK", 16)  # three passes over 40 clusters
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 2, 150, 24, generator=g).to(torch.bfloat16)
    x[:, :, 90:110] = x[:, :, 7:8]  # exact ties
    centroids = torch.randn(2, 40, 24, generator=g)
    want = TO.topk_index(x, centroids, 9)
    with bench._variant("candidate gather ops"):
        assert not TO.FUSED_CANDIDATES
        got = TO.topk_index(x, centroids, 9)
    assert TO.FUSED_CANDIDATES  # restored
    assert got.dtype == want.dtype and torch.equal(got, want)


def test_switch_variants_flip_their_switch_and_restore_it():
    from routeformer.ops import _launch
    from routeformer.ops.routing import _score_kernels as SK

    default_split, default_tiles, default_argmax = dict(TO.SPLIT_TILES), dict(SK.TILES), dict(SK.ARGMAX_TILES)
    entry_ranges = TO.tile_entry_ranges
    default_prefetch, default_config = dict(TO.PREFETCH), {kind: dict(c) for kind, c in TO.CONFIG.items()}
    assert not all(default_prefetch.values()) and default_config["cuda"]["combine"][2] > 1
    assert SK.BF16_SPLIT_SCORES and TO.COUNTING_SORT and SK.CENTRED_ARGMAX and SK.PRESPLIT_CENTROIDS
    for name, check in (("tf32x3 scores", lambda: not SK.BF16_SPLIT_SCORES),
                        ("sorted cluster ids", lambda: not TO.COUNTING_SORT),
                        ("masked tiles", lambda: not any(TO.SPLIT_TILES.values())),
                        ("unmasked tiles everywhere", lambda: set(TO.SPLIT_TILES.values()) == {TO.THREE_LOOPS}),
                        ("split loops", lambda: TO.SPLIT_TILES == {"fwd": 0, "dq": 0, "dkdv": 1}),
                        ("one-loop dk/dv", lambda: TO.SPLIT_TILES["dkdv"] == TO.TILE_BRANCH),
                        ("head-dim masks", lambda: not TO.FOLD_EVEN_D),
                        ("argmax tiles 64x32", lambda: SK.ARGMAX_TILES["cuda"] == (64, 32, 4)),
                        ("score tiles 64x32", lambda: SK.TILES["cuda"] == (64, 32, 4)),
                        ("jit launches", lambda: not _launch.FAST_LAUNCH),
                        ("uncentred argmax", lambda: not SK.CENTRED_ARGMAX),
                        ("in-kernel centroid split", lambda: not SK.PRESPLIT_CENTROIDS),
                        ("fixed tiles", lambda: not TO.CLUSTER_TILES),
                        ("two-stage select", lambda: not TO.THRESHOLD_SELECT),
                        ("sorted inverse", lambda: not TO.COUNTING_INVERSE),
                        ("whole-row entry searches", lambda: TO.tile_entry_ranges is not entry_ranges),
                        ("prefetch everywhere", lambda: all(TO.PREFETCH.values())),
                        ("band reductions", lambda: not TO.SCALAR_BAND),
                        ("1/n multiplies", lambda: not TO.MEAN_IN_LSE),
                        ("cluster passes", lambda: not TO.HEAD_PASSES),
                        ("exact first bound", lambda: TO.THRESHOLD_L1_SLACK == 0),
                        ("keep entry outputs", lambda: not TO.RELEASE_ENTRY_OUTPUTS),
                        ("inference scoring passes", lambda: TO.TRAINING_SCORE_BUDGET == 2),
                        ("unpaired forward", lambda: not TO.PAIRED_FORWARD),
                        ("four-warp threshold select", lambda: TO.THRESHOLD_TILES["cuda"] == (128, 4, 2)),
                        ("combine one entry at a time", lambda: TO.CONFIG["cuda"]["combine"][2] == 1)):
        with bench._variant(name):
            assert check(), name
        assert SK.BF16_SPLIT_SCORES and TO.COUNTING_SORT and TO.SPLIT_TILES == default_split, name
        assert SK.TILES == default_tiles and SK.ARGMAX_TILES == default_argmax, name
        assert _launch.FAST_LAUNCH, name
        assert SK.CENTRED_ARGMAX and TO.tile_entry_ranges is entry_ranges and TO.FOLD_EVEN_D, name
        assert SK.PRESPLIT_CENTROIDS and TO.CLUSTER_TILES and TO.THRESHOLD_SELECT and TO.COUNTING_INVERSE, name
        assert TO.PREFETCH == default_prefetch and TO.CONFIG == default_config and TO.SCALAR_BAND, name
        assert TO.MEAN_IN_LSE and TO.HEAD_PASSES and TO.THRESHOLD_L1_SLACK > 0, name
        assert TO.RELEASE_ENTRY_OUTPUTS and TO.TRAINING_SCORE_BUDGET == 4, name
        assert TO.PAIRED_FORWARD and TO.THRESHOLD_TILES["cuda"] == (64, 2, 3), name


def test_table_shares_the_assignment_of_the_graph_forward():
    """The kernel table's 'assign % of fwd' divides GPU time by GPU time: the graph row's forward when
    the table has one, the eager row's otherwise."""
    rows = [{"name": "ours topk", "T": 8, "fwd_ms": 4.0, "fwdbwd_ms": 8.0, "fwd_mib": 1, "fwdbwd_mib": 2},
            {"name": "ours topk (CUDA graph)", "T": 8, "fwd_ms": 2.0, "fwdbwd_ms": 3.0},
            {"name": "ours nearest", "T": 8, "fwd_ms": 4.0, "fwdbwd_ms": 8.0, "fwd_mib": 1, "fwdbwd_mib": 2}]
    kernels = [{"name": "kernel topk", "T": 8, "assign_ms": 1.0, "kernel_ms": 0.5, "tflops": 100.0},
               {"name": "kernel nearest", "T": 8, "assign_ms": 1.0, "kernel_ms": 0.5, "tflops": 100.0}]
    md = bench.table(rows, kernels)
    assert "| 8 | topk | 0.500 | 100 | 1.000 | 50 |" in md  # 1.0 of the graph's 2.0
    assert "| 8 | nearest | 0.500 | 100 | 1.000 | 25 |" in md  # no graph row: the eager 4.0
