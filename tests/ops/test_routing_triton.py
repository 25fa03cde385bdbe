"""Triton routing attention against the reference op: outputs and gradients, both assignment modes.

On CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py) on tiny awkward shapes; tests
marked gpu repeat them at real sizes on CUDA. The float64 reference is evaluated on the assignment
computed from the original inputs, so both sides attend exactly the same pairs.
"""
from __future__ import annotations

import weakref

import pytest
import torch

from routeformer.ops import routing_attention
from routeformer.ops.kmeans import routing_scores
from routeformer.ops.routing import assign_nearest, assign_topk
from routeformer.ops.routing import triton_ops as TO
from routeformer.ops.routing.assignment import topk_positions
from routeformer.ops.routing.reference import nearest_attention, topk_attention

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def poison():
    TO.POISON = True
    yield
    TO.POISON = False


def _inputs(B, H, T, D, Dv, C, shared, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    q = mk(B, H, T, D).requires_grad_()
    k = q if shared else mk(B, H, T, D).requires_grad_()
    v = mk(B, H, T, Dv).requires_grad_()
    centroids = torch.randn(H, C, D, generator=g).to(device)
    return q, k, v, centroids


def _reference64(q, k, v, centroids, window, causal, assign):
    """Float64 reference on the assignment of the original (low-precision) inputs."""
    with torch.no_grad():
        a = (assign_topk if assign == "topk" else assign_nearest)(q, k, centroids, window)
    q64 = q.detach().double().requires_grad_()
    k64 = q64 if k is q else k.detach().double().requires_grad_()
    v64 = v.detach().double().requires_grad_()
    scale = q.shape[-1] ** -0.5
    if assign == "topk":
        out = topk_attention(q64, k64, v64, a, causal=causal, scale=scale)
    else:
        out = nearest_attention(q64, k64, v64, a, window=window, scale=scale)
    return out, (q64, k64, v64), a


def _allowed(a, assign, causal, T, window):
    """Dense (B, H, C', T, T) masks of the pairs each cluster lets attend (C' = 1 for nearest)."""
    if assign == "topk":
        qi, ki = a.query_index, a.key_index
        B, H, C, W = qi.shape
        qm = torch.zeros(B, H, C, T, dtype=torch.bool, device=qi.device).scatter_(3, qi, True)
        km = torch.zeros(B, H, C, T, dtype=torch.bool, device=qi.device).scatter_(3, ki, True)
        m = qm[..., :, None] & km[..., None, :]
        if causal:
            m = m & torch.ones(T, T, dtype=torch.bool, device=qi.device).tril()
        return m
    B, H, _ = a.key_order.shape
    slot_of = torch.empty_like(a.key_order).scatter_(2, a.key_order, torch.arange(T, device=a.key_order.device)
                                                      .expand(B, H, T).contiguous())
    s = slot_of[..., None, :]
    return ((s >= a.key_start[..., :, None]) & (s < a.key_end[..., :, None]))[:, :, None]


def _plain_lowp(q, k, v, mask):
    """Plain PyTorch routing attention in the input dtype (the error yardstick for the kernels)."""
    logits = torch.einsum("bhid,bhjd->bhij", q, k)[:, :, None] * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~mask, float("-inf"))
    has = mask.any(-1, keepdim=True)
    p = torch.softmax(logits.float(), dim=-1).nan_to_num(0.0).to(q.dtype) * has
    out_c = torch.einsum("bhcij,bhjd->bhcid", p, v)
    n = has.sum(2).clamp_min(1)
    return (out_c.sum(2) / n).to(q.dtype)


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _check(B, H, T, D, Dv, C, window, assign, causal, shared, dtype, device, seed=0):
    q, k, v, centroids = _inputs(B, H, T, D, Dv, C, shared, dtype, device, seed)
    out = routing_attention(q, k, v, centroids, window=window, causal=causal, assign=assign, backend="triton")
    assert out.dtype == dtype and out.shape == (B, H, T, Dv)
    ref, ref_in, a = _reference64(q, k, v, centroids, window, causal, assign)
    dout = torch.randn_like(ref)
    wrt = (q, v) if shared else (q, k, v)
    grads = torch.autograd.grad(out, wrt, dout.to(dtype))
    ref_grads = torch.autograd.grad(ref, (ref_in[0], ref_in[2]) if shared else ref_in, dout)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    if dtype == torch.float32:
        assert _rel(out, ref) < 1e-5
        for g, rg in zip(grads, ref_grads):
            assert _rel(g, rg) < 1e-5
        return
    # Low precision: at most twice the error of plain PyTorch in the same dtype (plus a rounding floor).
    mask = _allowed(a, assign, causal, T, window)
    ql, vl = q.detach().requires_grad_(), v.detach().requires_grad_()
    kl = ql if shared else k.detach().requires_grad_()
    base = _plain_lowp(ql, kl, vl, mask)
    base_grads = torch.autograd.grad(base, (ql, vl) if shared else (ql, kl, vl), dout.to(dtype))
    floor = 2 * torch.finfo(dtype).eps
    assert _rel(out, ref) <= 2 * _rel(base, ref) + floor
    for g, bg, rg in zip(grads, base_grads, ref_grads):
        assert _rel(g, rg) <= 2 * _rel(bg, rg) + floor


# (T, D, Dv, C, window, assign, causal, shared): T and windows that do not divide, D not powers of 2.
CPU_CASES = [
    (37, 16, 16, 4, 10, "topk", True, False),
    (100, 24, 40, 5, 24, "topk", True, True),
    (100, 64, 64, 3, 40, "topk", False, False),
    (37, 16, 24, 4, 8, "nearest", True, False),
    (100, 24, 24, 6, 24, "nearest", True, True),
]


@pytest.mark.parametrize("T,D,Dv,C,window,assign,causal,shared", CPU_CASES)
def test_matches_reference_fp32(T, D, Dv, C, window, assign, causal, shared):
    _check(2, 2, T, D, Dv, C, window, assign, causal, shared, torch.float32, "cpu")


@pytest.mark.parametrize("assign,shared", [("topk", False), ("nearest", True)])
def test_matches_reference_bf16(assign, shared):
    _check(1, 2, 100, 24, 24, 4, 32, assign, True, shared, torch.bfloat16, "cpu", seed=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,D,C,window", [(150, 24, 6, 20), (97, 20, 9, 16), (70, 16, 1, 32)])
def test_cluster_tiles_match_reference(monkeypatch, T, D, C, window, dtype):
    """Shared-QK nearest on the counting sort, whose entry and slot tiles are cut per cluster
    (CLUSTER_TILES): outputs and gradients against the reference, partial tiles of every size, a
    single cluster, and empty tiles at the end of each row (their programs must store nothing).
    Head dims stay small: random shared q = k attend almost only to themselves once D grows (the
    diagonal scores |q|^2 / sqrt(D) = sqrt(D)), where dq's bf16 error, like FlashAttention's, grows
    past twice plain PyTorch's (delta = rowsum(dO * O) is taken from the rounded output;
    benchmarks/NOTES_routing.md, session 12)."""
    from routeformer.ops.routing import scores

    monkeypatch.setattr(scores, "use_fused", lambda x: True)
    assert TO.CLUSTER_TILES
    _check(1, 2, T, D, D, C, window, "nearest", True, True, dtype, "cpu", seed=T)


def test_default_tiles_take_the_cluster_tiles():
    """The default CONFIG's forward and dq entry tiles and dk/dv's slot tiles are the cluster tile's size
    on both device kinds, so that all three kernels run on the cluster tiles (a kernel of another tile
    size falls back to fixed tiles, correct but without the gain)."""
    for device in ("cpu", "meta"):  # meta: the GPU's plan (ops._checks.gpu_plan)
        t = torch.empty(1, device=device)
        tiles = torch.zeros(1, 1, 2, dtype=torch.int32)
        fwd, dq, dkdv = (TO._cfg(t, name) for name in ("fwd", "dq", "dkdv"))
        assert TO._tiled(tiles, t, fwd[0]) and TO._tiled(tiles, t, dq[0]) and TO._tiled(tiles, t, dkdv[1]), device
        assert not TO._tiled(tiles, t, 2 * fwd[0]) and not TO._tiled(tiles[:0], t, fwd[0])


def _check_cluster_tiles(x, centroids):
    """The tiles of each row cover every slot once, in order, each inside one cluster and at most
    cluster_tile(x) long, with every cluster's tiles full but its last; the rest are empty [T, T)."""
    from routeformer.ops.routing import scores

    B, H, T, _ = x.shape
    C = centroids.shape[1]
    qpos, lo, hi, kpos, tiles = TO.routing_indices(x, x, centroids, 8, True, "nearest")
    bm = TO.cluster_tile(x)
    assert tiles.shape == (B * H, -(-T // bm) + C, 2)
    cluster = scores.nearest_clusters(x, centroids).reshape(B * H, T)
    for r in range(B * H):
        sorted_cluster = cluster[r][qpos[r].long()]  # the cluster of each slot
        n = int(((tiles[r, :, 1] - tiles[r, :, 0]) > 0).sum())
        starts, ends = tiles[r, :n, 0].long(), tiles[r, :n, 1].long()
        assert starts[0] == 0 and ends[-1] == T and torch.equal(starts[1:], ends[:-1]), (T, C, r)
        assert ((ends - starts) <= bm).all()
        assert torch.equal(sorted_cluster[starts], sorted_cluster[ends - 1])  # one cluster per tile
        short = (ends - starts) < bm  # only a cluster's last tile may be short
        last_of_cluster = (ends == T) | (sorted_cluster[ends.clamp(max=T - 1)] != sorted_cluster[starts])
        assert not (short & ~last_of_cluster).any()
        assert (tiles[r, n:] == T).all()


def test_cluster_tiles_partition_each_cluster(monkeypatch):
    from routeformer.ops.routing import scores

    monkeypatch.setattr(scores, "use_fused", lambda x: True)
    g = torch.Generator().manual_seed(14)
    for T, C in ((150, 6), (300, 40), (64, 1), (65, 256), (33, 7)):
        x = torch.randn(2, 2, T, 24, generator=g).to(torch.bfloat16)
        centroids = torch.randn(2, C, 24, generator=g)
        centroids[:, C // 2:] *= 0.05  # some clusters empty or nearly so
        _check_cluster_tiles(x, centroids)


@gpu
@needs_cuda
def test_cluster_tiles_partition_each_cluster_gpu():
    x = torch.randn(1, 4, 20000, 64, device="cuda", dtype=torch.bfloat16)
    centroids = torch.nn.functional.normalize(torch.randn(4, 40, 64, device="cuda"), dim=-1)
    centroids[:, 20:] *= 0.05
    _check_cluster_tiles(x, centroids)


def test_topk_index_exact_with_ties():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 2, 97, 24, generator=g)
    # Repeated rows score identically: ties at the cut-off must go to the lower positions.
    x[:, :, 50:90] = x[:, :, 10:11]
    x[:, 1, ::3] = x[:, 1, 5:6]
    centroids = torch.randn(2, 7, 24, generator=g)
    for window in (1, 13, 40, 97, 200):
        expected = topk_positions(routing_scores(x, centroids), window)
        got = TO.topk_index(x, centroids, window)
        assert torch.equal(got.long(), expected), window


def test_window_at_least_t_and_single_cluster_is_dense_causal():
    q, k, v, centroids = _inputs(1, 2, 33, 16, 16, 1, False, torch.float32, "cpu", 4)
    out = routing_attention(q, k, v, centroids, window=64, causal=True, backend="triton")
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_compiles_without_graph_breaks(assign):
    q, k, v, centroids = _inputs(1, 2, 40, 16, 16, 3, True, torch.float32, "cpu", 5)

    def f(q, v):
        return routing_attention(q, q, v, centroids, window=16, causal=True, assign=assign, backend="triton").sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    got = torch.autograd.grad(compiled(q, v), (q, v))
    expected = torch.autograd.grad(f(q, v), (q, v))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_unsupported_inputs_raise_clear_errors():
    q, k, v, centroids = _inputs(1, 1, 8, 16, 16, 2, False, torch.float64, "cpu", 6)
    with pytest.raises(TypeError, match="backend='reference'"):
        routing_attention(q, k, v, centroids, window=4, backend="triton")
    q, k, v, centroids = _inputs(1, 1, 8, 160, 16, 2, False, torch.float32, "cpu", 6)
    with pytest.raises(ValueError, match="head dims up to 128"):
        routing_attention(q, k, v, centroids, window=4, backend="triton")


GPU_CASES = [
    (4096, 64, 8, 512, "topk", True, True, torch.bfloat16),
    (4096, 64, 8, 512, "topk", True, False, torch.float16),
    (3000, 128, 6, 500, "topk", False, False, torch.bfloat16),
    (4096, 32, 8, 512, "nearest", True, True, torch.bfloat16),
    (3000, 96, 6, 500, "nearest", True, False, torch.float16),
    (2048, 64, 4, 512, "topk", True, False, torch.float32),
    (2048, 64, 4, 512, "nearest", True, True, torch.float32),
]


@gpu
@needs_cuda
@pytest.mark.parametrize("T,D,C,window,assign,causal,shared,dtype", GPU_CASES)
def test_matches_reference_gpu(T, D, C, window, assign, causal, shared, dtype):
    _check(1, 2, T, D, D, C, window, assign, causal, shared, dtype, "cuda")


@gpu
@needs_cuda
def test_compiles_with_inductor_gpu():
    q, k, v, centroids = _inputs(1, 4, 2048, 64, 64, 4, True, torch.bfloat16, "cuda", 7)

    def f(q, v):
        return routing_attention(q, q, v, centroids, window=512, causal=True, backend="triton")

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, v), f(q, v))
    dout = torch.randn_like(q)
    got = torch.autograd.grad(compiled(q, v), (q, v), dout)
    expected = torch.autograd.grad(f(q, v), (q, v), dout)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("group", [2, 4, 16])
def test_topk_index_both_selectors_with_signed_zeros(monkeypatch, group):
    """The two-stage group select and the whole-row select equal the reference's stable sort, with
    -0.0 tied to +0.0, duplicated rows, and groups small enough that the first stage runs."""
    from routeformer.ops.routing import scores

    monkeypatch.setattr(scores, "GROUP", group)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1, 2, 61, 16, generator=g)
    x[:, :, 30:45] = x[:, :, 3:4]
    centroids = torch.randn(2, 5, 16, generator=g)
    centroids[:, 0] = 0.0  # a cluster whose scores are all (signed) zeros: pure tie-breaking
    for window in (1, 3, 7, 20, 61):
        expected = topk_positions(routing_scores(x, centroids), window)
        for mode in ("groups", "full"):
            monkeypatch.setattr(TO, "TOPK_SELECT", mode)
            assert torch.equal(TO.topk_index(x, centroids, window).long(), expected), (mode, window)


@gpu
@needs_cuda
def test_group_select_equals_full_sort_gpu():
    """At real sizes the first stage runs (T / 16 groups > W): same positions as the stable sort."""
    from routeformer.ops.routing.scores import assignment_scores

    x = torch.randn(2, 4, 20000, 64, device="cuda", dtype=torch.bfloat16)
    x[:, :, 9000:9700] = x[:, :, 11:12]  # a block of exact ties straddling the cut-off
    centroids = torch.randn(4, 40, 64, device="cuda")
    expected = topk_positions(assignment_scores(x, centroids).transpose(2, 3), 500)
    assert torch.equal(TO.topk_index(x, centroids, 500).long(), expected)


def test_cluster_passes_equal_one_pass(monkeypatch):
    """Scoring the clusters in passes (fused kernel, interpreter) selects what one pass selects."""
    from routeformer.ops.routing import scores
    from routeformer.ops.routing._score_kernels import fused_scores, tiles

    monkeypatch.setattr(scores, "use_fused", lambda x: True)
    monkeypatch.setattr(scores, "GROUP", 4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 2, 150, 24, generator=g).to(torch.bfloat16)
    x[:, :, 90:110] = x[:, :, 7:8]  # exact ties
    centroids = torch.randn(2, 40, 24, generator=g)
    block_c = tiles(x)[1]
    assert TO.cluster_chunk(x, 40) == block_c  # 24 * 2 / 2 = 24 clusters, rounded down to one tile
    whole_scores = fused_scores(x, centroids)[0]
    for c0 in range(0, 40, block_c):
        part = fused_scores(x, centroids, c0, min(block_c, 40 - c0))[0]
        assert torch.equal(part, whole_scores[:, :, c0:c0 + block_c])
    expected = topk_positions(whole_scores.transpose(2, 3), 9)
    got = TO.topk_index(x, centroids, 9)
    monkeypatch.setattr(TO, "CLUSTER_CHUNK", 64)
    assert TO.cluster_chunk(x, 40) == 40
    assert torch.equal(got, TO.topk_index(x, centroids, 9))
    assert torch.equal(got.long(), expected)
    with pytest.raises(ValueError, match="clusters"):
        fused_scores(x, centroids, 40, 1)


def test_batch_head_passes_equal_one_pass(monkeypatch):
    """Scoring blocks of batch-heads against all clusters (fused kernel, interpreter), alone and with
    cluster chunks, blocks crossing a batch boundary and a short last block: the same bits of scores
    as the whole launch, and the same positions selected."""
    from routeformer.ops.routing import _score_kernels as SK
    from routeformer.ops.routing import scores

    monkeypatch.setattr(scores, "use_fused", lambda x: True)
    monkeypatch.setattr(scores, "GROUP", 4)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 3, 150, 24, generator=g).to(torch.bfloat16)  # 6 batch-heads
    x[:, :, 90:110] = x[:, :, 7:8]  # exact ties
    centroids = torch.randn(3, 40, 24, generator=g)
    whole_scores, whole_gmax = SK._launch(x, centroids, write=True, argmax=False)[:2]
    for r0, n in ((0, 6), (2, 3), (5, 1)):  # (2, 3) spans batch 0's last head and batch 1's first two
        part, gmax = SK._launch(x, centroids, write=True, argmax=False, bh_begin=r0, bh_count=n)[:2]
        lead = (2, 3) if n == 6 else (1, n)  # the whole range keeps x's (B, H)
        assert part.shape == (*lead, 40, 150) and gmax.shape[:3] == (*lead, 40)
        assert torch.equal(part.flatten(0, 1), whole_scores.flatten(0, 1)[r0:r0 + n])
        assert torch.equal(gmax.flatten(0, 1), whole_gmax.flatten(0, 1)[r0:r0 + n])
    want = TO.topk_index(x, centroids, 9)
    assert torch.equal(want.long(), topk_positions(whole_scores.transpose(2, 3), 9))
    for rows, chunk in ((4, None), (1, None), (4, 16)):  # a short last block; blocks with cluster chunks
        monkeypatch.setattr(TO, "ROWS_PER_PASS", rows)
        monkeypatch.setattr(TO, "CLUSTER_CHUNK", chunk)
        assert TO.scoring_passes(x, 40) == (rows, TO.cluster_chunk(x, 40))
        assert torch.equal(TO.topk_index(x, centroids, 9), want), (rows, chunk)
    with pytest.raises(ValueError, match="batch-heads"):
        SK._launch(x, centroids, write=True, argmax=False, bh_begin=5, bh_count=2)
    with pytest.raises(ValueError, match="batch-heads"):
        SK._launch(x, centroids, write=False, argmax=True, bh_begin=1, bh_count=2)


def test_scoring_passes_plan():
    """Blocks of batch-heads against all clusters wherever cluster_chunk's budget holds one batch-head's
    scores for all clusters, never more scores per pass than the cluster passes; else cluster passes."""
    x = torch.empty(1, 8, 65536, 64, dtype=torch.bfloat16)
    block_c = TO.cluster_chunk(x, 1)  # a budget never goes below one cluster tile
    assert TO.cluster_chunk(x, 128) == 64  # the budget: 64 clusters of all 8 heads
    assert TO.scoring_passes(x, 128) == (4, 128)  # = 4 heads of all 128 clusters
    assert TO.scoring_passes(x, 256) == (2, 256)
    assert TO.scoring_passes(x, 64) == (None, 64)  # everything in one pass
    assert TO.scoring_passes(x[:, :1], 128) == (None, 64)  # one head: only cluster chunks shrink a pass
    assert TO.scoring_passes(x, 8 * 64 * 2) == (None, 64)  # < 1 head per pass
    for C in (40, 100, 128, 300, 1000):
        for budget in (2, 4):
            rows, chunk = TO.scoring_passes(x, C, budget)
            per_pass = (8 if rows is None else rows) * chunk
            assert per_pass <= 8 * TO.cluster_chunk(x, C, budget) and chunk >= min(C, block_c), (C, budget)
    # A call that will run a backward (TRAINING_SCORE_BUDGET = 4): scores up to 4x the size of x per pass.
    assert TO.cluster_chunk(x, 256, 4) == 128
    assert TO.scoring_passes(x, 128, 4) == (None, 128)  # T = 64k: one pass
    assert TO.scoring_passes(x, 256, 4) == (4, 256)  # T = 128k: two passes of 4 heads


def test_score_budget_follows_the_backward(monkeypatch):
    """topk scores in passes of TRAINING_SCORE_BUDGET where the call will run a backward (grad mode on and
    an input that requires grad), else of 2x the size of x."""
    budgets = []
    indices = TO.routing_indices
    monkeypatch.setattr(TO, "routing_indices", lambda *a: budgets.append(a[-1]) or indices(*a))
    q, _, v, centroids = _inputs(1, 2, 40, 16, 16, 3, True, torch.float32, "cpu", 21)
    attend = lambda q, v: routing_attention(q, q, v, centroids, window=16, assign="topk",  # noqa: E731
                                            backend="triton")
    attend(q, v)
    with torch.no_grad():
        attend(q, v)
    attend(q.detach(), v.detach())
    assert budgets == [TO.TRAINING_SCORE_BUDGET, 2, 2] and TO.TRAINING_SCORE_BUDGET == 4


@pytest.mark.parametrize("one_kernel", [True, False])
def test_select_top_equals_stable_sort(monkeypatch, one_kernel):
    """Both row selectors (one kernel per row; torch.topk + scan) on ties, signed zeros, -inf and odd L."""
    monkeypatch.setattr(TO, "SELECT_ROWS_MAX", 8192 if one_kernel else 0)
    g = torch.Generator().manual_seed(11)
    for L, w in ((37, 1), (37, 36), (100, 37), (130, 64), (5, 5)):
        rows = torch.randn(2, 1, 3, L, generator=g)
        rows[0, 0, 0, ::3] = 0.5  # many exact ties around the cut-off
        rows[0, 0, 1] = torch.where(torch.rand(L, generator=g) < 0.5, 0.0, -0.0)  # only signed zeros
        rows[1, 0, 2, L // 2:] = float("-inf")  # candidate padding past T
        rows[1, 0, 0] = rows[1, 0, 0].round()  # few distinct values
        # The ends of the float range, denormals and infinities (the kernel's integer keys span them all).
        big = torch.finfo(torch.float32)
        extremes = torch.tensor([float("inf"), big.max, big.tiny, big.tiny / 4, -big.tiny / 4, -big.max,
                                 float("-inf"), 0.0, -0.0])
        rows[1, 0, 1] = extremes[torch.randint(0, len(extremes), (L,), generator=g)]
        rows[0, 0, 2] = float("-inf")  # a row of padding only: the first w positions
        expected = torch.sort(rows, dim=-1, descending=True, stable=True).indices[..., :w].sort(-1).values
        assert torch.equal(TO.select_top(rows, w).long(), expected), (L, w)


@gpu
@needs_cuda
def test_scoring_passes_select_what_one_pass_selects_gpu(monkeypatch):
    """T = 64k, C = 128, bf16 D = 64: two passes of 4 heads, or two of 64 clusters, whose scores must be
    the bits of the whole launch (the one the reference backend takes), so all select the same positions."""
    x = torch.randn(1, 8, 65536, 64, device="cuda", dtype=torch.bfloat16)
    centroids = torch.nn.functional.normalize(torch.randn(8, 128, 64, device="cuda"), dim=-1)
    assert TO.cluster_chunk(x, 128) == 64 and TO.scoring_passes(x, 128) == (4, 128)
    passes = TO.topk_index(x, centroids, 512)  # two passes of 4 heads
    monkeypatch.setattr(TO, "HEAD_PASSES", False)
    assert TO.scoring_passes(x, 128) == (None, 64)
    assert torch.equal(passes, TO.topk_index(x, centroids, 512))  # two passes of 64 clusters
    monkeypatch.setattr(TO, "CLUSTER_CHUNK", 1 << 20)
    assert torch.equal(passes, TO.topk_index(x, centroids, 512))


@gpu
@needs_cuda
@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_fwd_bwd_peak_memory_at_most_dense_sdpa_gpu(assign):
    """The issue's memory target for forward+backward at the benchmark setting (T = 64k): the peak
    allocated above the inputs, ours against F.scaled_dot_product_attention(is_causal=True)."""
    T = 65536
    q, v, dout = (torch.randn(1, 8, T, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q.requires_grad_(), v.requires_grad_()
    centroids = torch.nn.functional.normalize(torch.randn(8, T // 512, 64, device="cuda"), dim=-1)

    def peak(fn):
        fn()  # compile and warm up
        q.grad = v.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        q.grad = v.grad = None
        return torch.cuda.max_memory_allocated() - base

    ours = peak(lambda: routing_attention(q, q, v, centroids, window=512, assign=assign,
                                          backend="triton").backward(dout))
    dense = peak(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, v, is_causal=True).backward(dout))
    assert ours <= dense, (ours / 2**20, dense / 2**20)


@gpu
@needs_cuda
def test_topk_forward_peak_holds_one_scoring_pass_gpu():
    """topk's forward at T = 64k scores its clusters in passes so that one pass's float32 scores are
    alive at a time (cluster_chunk): its peak above the inputs stays under 1.5 passes' scores (two
    passes alive at once, as a loop over a generator of passes once held, is 2x)."""
    T, H = 65536, 8
    q, v = (torch.randn(1, H, T, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    centroids = torch.nn.functional.normalize(torch.randn(H, T // 512, 64, device="cuda"), dim=-1)
    one_pass = TO.cluster_chunk(q, T // 512) * T * H * 4
    assert TO.cluster_chunk(q, T // 512) < T // 512  # several passes
    with torch.no_grad():
        routing_attention(q, q, v, centroids, window=512, assign="topk", backend="triton")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = routing_attention(q, q, v, centroids, window=512, assign="topk", backend="triton")
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 1.5 * one_pass, (peak / 2**20, one_pass / 2**20)
    del out


@pytest.mark.parametrize("C", [5, 300, 40000])  # uint8, int16 and int32 cluster ids
def test_nearest_shared_indices_equal_assign_nearest(C):
    """Shared QK, nearest: the launcher's own derivation (stable sort of the cluster ids alone) gives
    the slots, starts and ends of the specification, assignment.assign_nearest."""
    g = torch.Generator().manual_seed(C)
    B, H, T, W = 2, 2, 97, 10
    x = torch.randn(B, H, T, 8, generator=g)
    centroids = torch.randn(H, C, 8, generator=g)
    centroids[:, 3:] *= 0.01  # tokens crowd into 3 clusters, so that the window binds for every C
    flat = lambda t: t.reshape(B * H, T).to(torch.int32)  # noqa: E731
    a = assign_nearest(x, x, centroids, W)
    expected = (a.key_order, a.key_start.gather(2, a.key_order), a.key_end.gather(2, a.key_order), a.key_order)
    got = TO._nearest_indices(x, x, centroids, W)
    for name, e, r in zip(("qpos", "lo", "hi", "kpos"), got, expected):
        assert torch.equal(e, flat(r)), name


def test_topk_slot_bounds():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 61, 8, generator=g)
    centroids = torch.randn(2, 4, 8, generator=g)
    starts = (torch.arange(4, dtype=torch.int32) * 20).repeat_interleave(20).expand(4, 80)
    qpos, lo, hi, kpos, _ = TO._topk_indices(x, x, centroids, 20, causal=True)
    ends = torch.searchsorted(kpos.view(4, 4, 20), qpos.view(4, 4, 20), right=True, out_int32=True)
    assert torch.equal(lo, starts)
    assert torch.equal(hi, (lo.view(4, 4, 20) + ends).view_as(hi))
    for keys in (x, torch.randn(2, 2, 61, 8, generator=g)):  # no causal mask: the whole cluster
        qpos, lo, hi, kpos, _ = TO._topk_indices(x, keys, centroids, 20, causal=False)
        assert torch.equal(lo, starts) and torch.equal(hi, starts + 20)


@pytest.mark.parametrize("right", [False, True])
def test_count_below_equals_searchsorted(right):
    """The one-kernel boundary search equals torch.searchsorted for an arithmetic run of queries:
    duplicates, empty and full counts, N not a power of two, queries past both ends, the clamp."""
    g = torch.Generator().manual_seed(4)
    for R, N, m, step, offset, limit in ((3, 1, 5, 1, 0, 3), (2, 37, 40, 1, 0, 36), (4, 100, 9, 13, 13, 100),
                                         (2, 64, 7, 10, -5, 1000), (1, 257, 300, 1, 0, 299)):
        x = torch.randint(-3, max(4, N // 2), (R, N), generator=g).sort(dim=-1).values.to(torch.int32)
        v = torch.clamp(torch.arange(m) * step + offset, max=limit).to(torch.int32).expand(R, m).contiguous()
        expected = torch.searchsorted(x, v, right=right, out_int32=True)
        assert torch.equal(TO.count_below(x, m, step, offset, limit, right), expected), (N, m, step)


def test_tile_entry_ranges_equal_their_definition():
    """For each key tile: [qlo, qhi) are the entries that see one of its slots, [flo, fhi) those that
    see all of them (checked pair by pair on random non-decreasing bounds, with empty ranges, a
    partial last tile and entries no slot of a tile concerns)."""
    g = torch.Generator().manual_seed(6)
    for R, N, S, bn in ((2, 50, 50, 16), (3, 77, 61, 8), (1, 300, 300, 32)):
        lo = torch.randint(0, S, (R, N), generator=g).sort(dim=-1).values
        hi = torch.maximum(lo + torch.randint(-3, 40, (R, N), generator=g), lo).clamp(max=S)
        hi = torch.cummax(hi, dim=-1).values  # non-decreasing, as the index builders give
        lo, hi = lo.to(torch.int32).contiguous(), hi.to(torch.int32).contiguous()
        nt = -(-S // bn)
        qlo, qhi, flo, fhi = TO.tile_entry_ranges(lo, hi, nt, bn, S)
        s = torch.arange(S)
        sees = (s[None, None, :] >= lo[..., None]) & (s[None, None, :] < hi[..., None])  # (R, N, S)
        for i in range(nt):
            tile = sees[..., i * bn:min(i * bn + bn, S)]
            some, every = tile.any(-1), tile.all(-1)
            e = torch.arange(N)
            for r in range(R):
                assert torch.equal(some[r], (e >= qlo[r, i]) & (e < qhi[r, i])), (R, N, i)
                assert torch.equal(every[r], (e >= flo[r, i]) & (e < fhi[r, i])), (R, N, i)


def test_nearest_tile_entry_ranges_equal_the_searches():
    """Shared-QK nearest slots, and shared-QK causal topk slots: the window-bounded searches
    (nearest_window) give the whole-row searches' ranges; crowded and sparse clusters, windows below and
    above the cluster sizes and T, partial last tiles."""
    g = torch.Generator().manual_seed(13)
    for T, C, W, bn in ((150, 6, 20, 16), (300, 3, 64, 32), (97, 40, 5, 8), (64, 1, 200, 16), (33, 7, 1, 16)):
        x = torch.randn(2, 2, T, 24, generator=g)
        centroids = torch.randn(2, C, 24, generator=g)
        _, lo, hi, _, _ = TO._nearest_indices_shared(x, centroids, W)
        nt = -(-T // bn)
        want = TO.tile_entry_ranges(lo, hi, nt, bn, T)
        got = TO.tile_entry_ranges(lo, hi, nt, bn, T, nearest_window=W)
        for name, a, b in zip(("qlo", "qhi", "flo", "fhi"), got, want):
            assert torch.equal(a, b), (T, C, W, name)
        # Shared-QK causal topk slots: clusters of min(W, T) entries, each seeing its cluster's prefix.
        w = min(W, T)
        lo, hi = TO.topk_slot_bounds(x, 4, C * w, w, True)
        nt = -(-(C * w) // bn)
        want = TO.tile_entry_ranges(lo, hi, nt, bn, C * w)
        got = TO.tile_entry_ranges(lo, hi, nt, bn, C * w, nearest_window=W)
        for name, a, b in zip(("qlo", "qhi", "flo", "fhi"), got, want):
            assert torch.equal(a, b), ("topk", T, C, W, name)


@pytest.mark.parametrize("block_t,count_t", [(64, 64), (128, 64), (128, 32)])
def test_counting_sort_slots_equal_the_sorted_slots(monkeypatch, block_t, count_t):
    """Shared-QK nearest slots from the counting sort (per-tile cluster counts from the score kernel, a
    cumsum, one kernel) equal those of the stable sort of the cluster ids: several tiles and a partial
    last one, a cluster count that is not a power of two, crowded clusters (the window binds), C = 1
    and C = 256 (the largest the counting sort takes; 257 takes the sort)."""
    from routeformer.ops.routing import scores

    from routeformer.ops.routing import _score_kernels as SK

    monkeypatch.setattr(scores, "use_fused", lambda x: True)
    # The score kernel counts clusters per count tile (the slot kernel ranks within one): one or
    # several count tiles per score tile (the GPU's 128 and 64), each over several score tiles.
    monkeypatch.setitem(SK.ARGMAX_TILES, "cpu", (block_t, 16, 4))
    monkeypatch.setattr(SK, "COUNT_TILE", count_t)
    g = torch.Generator().manual_seed(12)
    for T, C, W in ((150, 6, 20), (300, 40, 32), (64, 1, 16), (65, 256, 5), (70, 257, 8), (400, 7, 64)):
        x = torch.randn(2, 2, T, 24, generator=g).to(torch.bfloat16)
        centroids = torch.randn(2, C, 24, generator=g)
        centroids[:, C // 2:] *= 0.05
        got = TO._nearest_indices_shared(x, centroids, W)
        monkeypatch.setattr(TO, "COUNTING_SORT", False)
        want = TO._nearest_indices_shared(x, centroids, W)
        monkeypatch.setattr(TO, "COUNTING_SORT", True)
        for name, a, b in zip(("qpos", "lo", "hi", "kpos"), got, want):
            assert a.dtype == b.dtype and torch.equal(a, b), (T, C, name)


def _split_modes_agree(assign, split, q, v, centroids, window, tile):
    """The op under SPLIT_TILES = `split` in every kernel against every tile masked: the same outputs
    and gradients, bit for bit (both paths compute p from the same FMA; the mask only selects)."""
    results = []
    default = dict(TO.SPLIT_TILES)
    dout = torch.randn(v.shape, generator=torch.Generator().manual_seed(3)).to(v)
    for mode in (getattr(TO, split), TO.ALL_MASKED):
        TO.SPLIT_TILES = dict.fromkeys(default, mode)
        try:
            out = routing_attention(q, q, v, centroids, window=window, causal=True, assign=assign, backend="triton")
            results.append((out, *torch.autograd.grad(out, (q, v), dout)))
        finally:
            TO.SPLIT_TILES = default
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with torch.no_grad():  # the case has whole tiles to run unmasked, else the test shows nothing
        qpos, lo, hi, kpos, _ = TO.routing_indices(q, q, centroids, window, True, assign)
        qlo, qhi, flo, fhi = TO.tile_entry_ranges(lo, hi, -(-kpos.shape[1] // tile), tile, kpos.shape[1])
        assert ((fhi - flo) >= 2 * tile).any()


@pytest.mark.parametrize("split", ["THREE_LOOPS", "TILE_BRANCH"])
@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_unmasked_tiles_give_what_masked_tiles_give(assign, split):
    """The tiles every row sees whole run without masks (SPLIT_TILES: in loops of their own, or
    branching around the mask in one loop). Window 56 over 16-wide tiles: most tiles are whole, and
    rows of a cluster tail or a short cluster still need masked ones."""
    q, _, v, centroids = _inputs(2, 2, 150, 24, 24, 3, True, torch.float32, "cpu", 8)
    _split_modes_agree(assign, split, q, v, centroids, 56, 16)


@gpu
@needs_cuda
@pytest.mark.parametrize("split", ["THREE_LOOPS", "TILE_BRANCH"])
@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_unmasked_tiles_give_what_masked_tiles_give_gpu(assign, split):
    """As above on the GPU's tiles (64 wide), bf16, window 500 over T = 5000 (nothing a multiple)."""
    q, _, v, centroids = _inputs(1, 2, 5000, 64, 64, 10, True, torch.bfloat16, "cuda", 9)
    _split_modes_agree(assign, split, q, v, centroids, 500, 64)


def _switch_agrees(q, v, centroids, window, assign, monkeypatch, name, settings):
    """The op under each of `settings` of TO.<name> gives the same bits, in the default loops and with
    every tile masked."""
    dout = torch.randn(v.shape, generator=torch.Generator().manual_seed(5)).to(v)
    for split in (dict(TO.SPLIT_TILES), dict.fromkeys(TO.SPLIT_TILES, TO.ALL_MASKED)):
        monkeypatch.setattr(TO, "SPLIT_TILES", split)
        results = []
        for setting in settings:
            monkeypatch.setattr(TO, name, setting)
            out = routing_attention(q, q, v, centroids, window=window, causal=True, assign=assign, backend="triton")
            results.append((out, *torch.autograd.grad(out, (q, v), dout)))
        for r in results[1:]:
            for a, b in zip(results[0], r):
                torch.testing.assert_close(a, b, atol=0, rtol=0)


def _kernel_switches():
    """Kernel settings that must not change a bit: each kernel reading the next tile's gather indices
    a step ahead (PREFETCH) or in the step that uses them; the forward's and dq's slot band read at
    the tile's ends or reduced over it (SCALAR_BAND); the forward running one entry tile per
    program or two (PAIRED_FORWARD)."""
    return [("PREFETCH", [dict.fromkeys(TO.PREFETCH, True), dict.fromkeys(TO.PREFETCH, False)]),
            ("SCALAR_BAND", [True, False]),
            ("PAIRED_FORWARD", [True, False])]


@pytest.mark.parametrize("switch", [0, 1, 2])
@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_kernel_switches_change_no_bit(assign, switch, monkeypatch):
    """Window 40 over 16-wide tiles (T = 110): loops of several tiles, a partial last tile, clusters
    shorter than a tile (nearest's cluster tiles, some empty)."""
    q, _, v, centroids = _inputs(1, 2, 110, 24, 24, 4, True, torch.float32, "cpu", 12)
    _switch_agrees(q, v, centroids, 40, assign, monkeypatch, *_kernel_switches()[switch])


@pytest.mark.parametrize("T, clusters", [(110, 5), (120, 7)])
def test_paired_tiles_with_an_odd_and_an_even_tile_count(T, clusters, monkeypatch):
    """PAIRED_FORWARD where one program's partner is itself (odd tile counts: topk's 5 x 40 entries are
    13 tiles of 16, nearest's 110 are 7; the middle tile runs once) and where every program runs two
    (topk's 7 x 40 = 280 entries, 18 tiles with a partial last one; nearest's 120, 8 tiles)."""
    q, _, v, centroids = _inputs(1, 2, T, 24, 24, clusters, True, torch.float32, "cpu", 14)
    for assign in ("topk", "nearest"):
        _switch_agrees(q, v, centroids, 40, assign, monkeypatch, *_kernel_switches()[2])


@gpu
@needs_cuda
@pytest.mark.parametrize("switch", [0, 1, 2])
@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_kernel_switches_change_no_bit_gpu(assign, switch, monkeypatch):
    q, _, v, centroids = _inputs(1, 2, 5000, 64, 64, 10, True, torch.bfloat16, "cuda", 13)
    _switch_agrees(q, v, centroids, 500, assign, monkeypatch, *_kernel_switches()[switch])


def _spread_norms(t, seed, decades):
    """t with each row scaled by 10**u, u uniform in [-decades / 2, decades / 2]."""
    g = torch.Generator().manual_seed(seed)
    u = (torch.rand(*t.shape[:-1], 1, generator=g) - 0.5) * decades
    return (t.detach() * 10.0 ** u.to(t)).requires_grad_()


def _wide_logits_check(T, D, C, window, assign, shared, dtype, device, seed, decades, tol):
    q, k, v, centroids = _inputs(1, 2, T, D, D, C, shared, dtype, device, seed)
    q = _spread_norms(q, seed + 1, decades)
    k = q if shared else _spread_norms(k, seed + 2, decades)
    ref, ref_in, _ = _reference64(q, k, v, centroids, window, True, assign)
    dout = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (ref_in[0], ref_in[2]) if shared else ref_in, dout)
    out = routing_attention(q, k, v, centroids, window=window, causal=True, assign=assign, backend="triton")
    grads = torch.autograd.grad(out, (q, v) if shared else (q, k, v), dout.to(dtype))
    for x, r in zip((out, *grads), (ref, *ref_grads)):
        assert torch.isfinite(x).all()
        assert _rel(x, r) < tol


@pytest.mark.parametrize("assign,shared", [("topk", True), ("topk", False), ("nearest", True), ("nearest", False)])
def test_matches_reference_on_logits_over_many_orders_of_magnitude(assign, shared):
    """Row norms over four decades: logits up to ~7e4 log2 units (shared QK), so a row's running
    maximum can jump by more than float32's exponent range between slot tiles (the online softmax's
    rescale exp2(m_old - m_new) underflows to 0), and 72% of rows' own logit is not their maximum.
    Window 40 over 16-wide tiles. Such logits make the grads ill-conditioned: float32 reaches ~1e-4 of
    the float64 reference on them, whence the tolerance."""
    _wide_logits_check(131, 24, 3, 40, assign, shared, torch.float32, "cpu", 21, 4.0, 1e-3)


@pytest.mark.parametrize("shared", [True, False])
def test_mean_in_lse_gives_what_the_1_over_n_multiplies_give(shared, monkeypatch):
    """topk's scatter-mean weight folded into the log-sum-exp that dk/dv reads (MEAN_IN_LSE) against
    dk/dv multiplying by 1/n: the same forward and dq bits (separate keys: dq holds no dk), dk and dv
    equal up to float32 rounding. Window 30 of T = 61 with 6 clusters: tokens in up to 6 clusters."""
    q, k, v, centroids = _inputs(1, 2, 61, 24, 20, 6, shared, torch.float32, "cpu", 15)
    dout = torch.randn(v.shape, generator=torch.Generator().manual_seed(7)).to(v)
    results = []
    for setting in (True, False):
        monkeypatch.setattr(TO, "MEAN_IN_LSE", setting)
        out = routing_attention(q, k, v, centroids, window=30, causal=True, assign="topk", backend="triton")
        results.append((out, *torch.autograd.grad(out, (q, v) if shared else (q, k, v), dout)))
    exact = 1 if shared else 2  # out, and dq with separate keys
    for i, (a, b) in enumerate(zip(*results)):
        tol = dict(atol=0, rtol=0) if i < exact else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, b, **tol, msg=f"output {i}")
    with torch.no_grad():
        idx = TO.routing_indices(q, k, centroids, 30, True, "topk")
        counts = torch.bincount(idx[0][0].long(), minlength=61)
    assert counts.max() > 2, counts  # weights 1/n below 1/2: the fold is not a no-op


@gpu
@needs_cuda
@pytest.mark.parametrize("shared", [True, False])
def test_mean_in_lse_gives_what_the_1_over_n_multiplies_give_gpu(shared, monkeypatch):
    """As above at a real size, bf16: window 500 over T = 5000, 20 clusters (tokens in several)."""
    q, k, v, centroids = _inputs(1, 2, 5000, 64, 64, 20, shared, torch.bfloat16, "cuda", 16)
    dout = torch.randn(v.shape, generator=torch.Generator().manual_seed(8)).to(v)
    results = []
    for setting in (True, False):
        monkeypatch.setattr(TO, "MEAN_IN_LSE", setting)
        out = routing_attention(q, k, v, centroids, window=500, causal=True, assign="topk", backend="triton")
        results.append((out, *torch.autograd.grad(out, (q, v) if shared else (q, k, v), dout)))
    exact = 1 if shared else 2
    for i, (a, b) in enumerate(zip(*results)):
        tol = dict(atol=0, rtol=0) if i < exact else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(a, b, **tol, msg=f"output {i}")


def _row_offsets_agree(q, v, centroids, window, assign, monkeypatch):
    dout = torch.randn(v.shape, generator=torch.Generator().manual_seed(4)).to(v)
    results = []
    for wide in (False, True):
        monkeypatch.setattr(TO, "_row64", lambda *ts, wide=wide: wide)
        out = routing_attention(q, q, v, centroids, window=window, causal=True, assign=assign, backend="triton")
        results.append((out, *torch.autograd.grad(out, (q, v), dout)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_int64_row_offsets_give_what_int32_offsets_give(assign, monkeypatch):
    """Rows are gathered with int32 offsets unless a tensor may pass 2**31 elements (_row64); the
    int64 path, which only such sizes take, gives the same bits on a small case."""
    q, _, v, centroids = _inputs(1, 2, 90, 24, 24, 3, True, torch.float32, "cpu", 10)
    assert not TO._row64(q, v)
    assert TO._row64(torch.empty(1, 1, 2**21, 1024, device="meta"))
    _row_offsets_agree(q, v, centroids, 24, assign, monkeypatch)


@gpu
@needs_cuda
@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_int64_row_offsets_give_what_int32_offsets_give_gpu(assign, monkeypatch):
    """As above, compiled for the GPU (the interpreter does not type-check the JIT's returns)."""
    q, _, v, centroids = _inputs(1, 2, 3000, 64, 64, 6, True, torch.bfloat16, "cuda", 11)
    _row_offsets_agree(q, v, centroids, 500, assign, monkeypatch)


def _release_cases(q, v, centroids, window, monkeypatch):
    """topk fwd+bwd with the entry outputs freed after the dq kernel and kept as before: the same bits, as
    the same kernels run in the same order."""
    dout = torch.randn(v.shape, generator=torch.Generator().manual_seed(5)).to(v)
    results = []
    for release in (False, True):
        monkeypatch.setattr(TO, "RELEASE_ENTRY_OUTPUTS", release)
        out = routing_attention(q, q, v, centroids, window=window, causal=True, assign="topk", backend="triton")
        results.append((out, *torch.autograd.grad(out, (q, v), dout)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_freeing_entry_outputs_changes_no_bit(monkeypatch):
    """Window 30 of T = 61, 6 clusters: tokens in up to 6 clusters, head dim 24 (not a power of 2)."""
    q, _, v, centroids = _inputs(1, 2, 61, 24, 24, 6, True, torch.float32, "cpu", 17)
    _release_cases(q, v, centroids, 30, monkeypatch)


def test_entry_outputs_survive_a_retained_graph(monkeypatch):
    """The backward frees topk's per-entry outputs right after its dq kernel only when the graph is not
    kept: with retain_graph=True they survive and a second backward gives the same gradients; the
    second (not retained) frees them."""
    q, _, v, centroids = _inputs(1, 2, 61, 24, 24, 6, True, torch.float32, "cpu", 18)
    freed, refs = [], []
    impl, entry_ranges = TO._routing_bwd_impl, TO.tile_entry_ranges

    def spy(*args):
        refs.append(weakref.ref(args[5][0]))  # entry_outputs = [o_e]
        return impl(*args)

    def ranges(*args, **kwargs):  # runs right after the dq kernel: o_e is gone by then, or kept
        freed.append(refs[-1]() is None)
        return entry_ranges(*args, **kwargs)

    monkeypatch.setattr(TO, "_routing_bwd_impl", spy)
    monkeypatch.setattr(TO, "tile_entry_ranges", ranges)
    out = routing_attention(q, q, v, centroids, window=30, causal=True, assign="topk", backend="triton")
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(6))
    first = torch.autograd.grad(out, (q, v), dout, retain_graph=True)
    second = torch.autograd.grad(out, (q, v), dout)
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert freed == [False, True]
    with pytest.raises(RuntimeError):  # freed (torch's own saved tensors too): no third backward
        torch.autograd.grad(out, (q, v), dout)


@pytest.mark.parametrize("hooks", ["checkpoint", "save_on_cpu"])
def test_saved_tensor_hooks_see_the_entry_outputs(hooks, monkeypatch):
    """Under saved-tensor hooks (activation checkpointing drops saved tensors and recomputes them, save_on_cpu
    moves them) o_e goes through save_for_backward, where the hooks see it, rather than the context's list:
    the same gradients as without hooks."""
    q, _, v, centroids = _inputs(1, 2, 61, 24, 24, 6, True, torch.float32, "cpu", 20)
    dout = torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
    saved_path = []  # backwards that took o_e from save_for_backward (through the backward op's impl)
    impl = TO._routing_bwd.impl
    monkeypatch.setattr(TO._routing_bwd, "impl", lambda *args: saved_path.append(1) or impl(*args))
    attend = lambda q, v: routing_attention(q, q, v, centroids, window=30, causal=True,  # noqa: E731
                                            assign="topk", backend="triton")
    want = torch.autograd.grad(attend(q, v), (q, v), dout)
    assert not saved_path  # no hooks: the context's list
    if hooks == "checkpoint":
        out = torch.utils.checkpoint.checkpoint(attend, q, v, use_reentrant=False)
    else:
        with torch.autograd.graph.save_on_cpu():
            out = attend(q, v)
    got = torch.autograd.grad(out, (q, v), dout)
    assert saved_path
    for a, b in zip(want, got):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@gpu
@needs_cuda
def test_freeing_entry_outputs_changes_no_bit_gpu(monkeypatch):
    q, _, v, centroids = _inputs(1, 2, 5000, 64, 64, 20, True, torch.bfloat16, "cuda", 19)
    _release_cases(q, v, centroids, 500, monkeypatch)


@gpu
@needs_cuda
def test_freeing_entry_outputs_lowers_the_backward_peak_gpu(monkeypatch):
    """At the benchmark setting (T = 64k, bf16, 8 heads, D = 64) the topk fwd+bwd peak drops by the
    per-entry outputs' size (64 MiB) when they are freed after the dq kernel. (Scoring passes of 2x the
    size of x, so that the peak is the backward's, not the forward's scores.)"""
    monkeypatch.setattr(TO, "TRAINING_SCORE_BUDGET", 2)
    T = 65536
    q, v, dout = (torch.randn(1, 8, T, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q.requires_grad_(), v.requires_grad_()
    centroids = torch.nn.functional.normalize(torch.randn(8, T // 512, 64, device="cuda"), dim=-1)
    size = q.numel() * q.element_size()  # o_e: one row per (cluster, rank) = T rows here
    peaks = {}
    for release in (False, True):
        monkeypatch.setattr(TO, "RELEASE_ENTRY_OUTPUTS", release)
        run = lambda: routing_attention(q, q, v, centroids, window=512, assign="topk",  # noqa: E731
                                        backend="triton").backward(dout)
        run()
        q.grad = v.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        q.grad = v.grad = None
        peaks[release] = torch.cuda.max_memory_allocated() - base
    assert peaks[True] <= peaks[False] - 0.95 * size, {k: p / 2**20 for k, p in peaks.items()}


def _combine_case(BH, T, E, Dx, dtype, device, seed):
    """Entries at random positions: some tokens with none, one token with many (the per-token loop runs
    that many steps for its whole tile), and entries without a key (HI <= LO), which the mean does not
    count."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    pos = torch.randint(0, T, (BH, E), generator=g, dtype=torch.int32)
    pos[:, : min(E // 3, 200)] = T // 2
    pos[:, -1] = T - 1
    lo = torch.randint(0, 5, (BH, E), generator=g, dtype=torch.int32)
    hi = lo + torch.randint(-1, 3, (BH, E), generator=g, dtype=torch.int32)
    x = torch.randn(1, BH, E, Dx, generator=g).to(dtype)
    return [t.to(device) for t in (x, pos, lo, hi)]


def _check_combine(BH, T, E, Dx, dtype, device):
    """_combine (topk's per-token sums) against the float64 sum by index_add; the mean counts only the
    entries that had a key."""
    x, pos, lo, hi = _combine_case(BH, T, E, Dx, dtype, device, seed=T)
    perm, rowptr = TO._inverse(pos, T)
    want = torch.zeros(BH, T, Dx, dtype=torch.float64, device=device)
    n = torch.zeros(BH, T, dtype=torch.float64, device=device)
    for r in range(BH):
        want[r].index_add_(0, pos[r].long(), x[0, r].double())
        n[r].index_add_(0, pos[r].long(), (hi[r] > lo[r]).double())
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    for mean in (False, True):
        y, inv = TO._combine(x, perm, rowptr, lo, hi, T, mean, dtype)
        expected = want / n.clamp_min(1)[..., None] if mean else want
        torch.testing.assert_close(y[0].double(), expected, **tol, msg=f"{mean=}")
        if mean:
            torch.testing.assert_close(inv.double(), 1 / n.clamp_min(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_equals_the_per_token_sum(dtype):
    _check_combine(3, 37, 90, 24, dtype, "cpu")  # T and head dim that are not multiples of the tiles


@pytest.mark.parametrize("ahead", [1, 4, 64])
def test_combine_gathers_any_number_of_entries_ahead(ahead, monkeypatch):
    """The entries gathered at once (AHEAD) and the loop over the rest give the same sums: fewer than the
    busiest token has (the loop runs), or more than any has (it does not)."""
    monkeypatch.setitem(TO.CONFIG["cpu"], "combine", (16, 4, ahead))
    _check_combine(2, 45, 70, 24, torch.float32, "cpu")


@gpu
@needs_cuda
def test_combine_equals_the_per_token_sum_gpu():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        _check_combine(4, 20001, 30000, 72, dtype, "cuda")


@gpu
@needs_cuda
@pytest.mark.parametrize("C", [40, 300])  # uint8 and int16 cluster ids
def test_index_structures_equal_the_specification_gpu(C):
    """At real sizes on CUDA: shared-QK nearest slots/starts/ends equal assign_nearest's, topk's slot
    bounds equal the searchsorted definition, and the row pointers equal torch.searchsorted."""
    x = torch.randn(2, 4, 20000, 64, device="cuda", dtype=torch.bfloat16)
    centroids = torch.nn.functional.normalize(torch.randn(4, C, 64, device="cuda"), dim=-1)
    flat = lambda t: t.reshape(8, 20000).to(torch.int32)  # noqa: E731
    a = assign_nearest(x, x, centroids, 500)
    expected = (a.key_order, a.key_start.gather(2, a.key_order), a.key_end.gather(2, a.key_order), a.key_order)
    for name, got, want in zip(("qpos", "lo", "hi", "kpos"), TO._nearest_indices(x, x, centroids, 500), expected):
        assert torch.equal(got, flat(want)), name
    qpos, lo, hi, kpos, _ = TO._topk_indices(x, x, centroids[:, :39], 512, causal=True)
    E = 39 * 512
    ends = torch.searchsorted(kpos.view(8, 39, 512), qpos.view(8, 39, 512), right=True, out_int32=True)
    starts = (torch.arange(39, device="cuda", dtype=torch.int32) * 512).repeat_interleave(512).expand(8, E)
    assert torch.equal(lo, starts) and torch.equal(hi, (lo.view(8, 39, 512) + ends).view(8, E))
    perm, rowptr = TO._inverse(qpos, 20000)
    bound = torch.arange(20001, device="cuda", dtype=torch.int32).expand(8, 20001).contiguous()
    assert torch.equal(rowptr, torch.searchsorted(qpos.sort(dim=-1).values, bound, out_int32=True))


def test_register_budget_only_where_it_was_measured():
    """The register budgets (MAXNREG) were timed for 16-bit inputs with head dims up to 64 on an H200;
    other inputs and the CPU interpreter launch without one."""
    meta = lambda D, dtype: torch.empty(1, 2, 8, D, dtype=dtype, device="meta")  # noqa: E731 (the GPU plan)
    assert TO._regs(meta(64, torch.bfloat16), "dkdv") == {"maxnreg": TO.MAXNREG["dkdv"]}
    assert TO._regs(meta(32, torch.float16), "dkdv") == {"maxnreg": TO.MAXNREG["dkdv"]}
    assert TO._regs(meta(128, torch.bfloat16), "dkdv") == {}
    assert TO._regs(meta(64, torch.float32), "dkdv") == {}
    assert TO._regs(meta(64, torch.bfloat16), "dkdv_direct") == {"maxnreg": TO.MAXNREG["dkdv_direct"]}
    assert TO._regs(meta(128, torch.float16), "dkdv_direct") == {}
    for name in ("fwd", "dq"):  # since session 11
        assert TO._regs(meta(64, torch.bfloat16), name) == {"maxnreg": 128}
        assert TO._regs(meta(96, torch.bfloat16), name) == {}
    assert TO._regs(torch.empty(1, 2, 8, 64, dtype=torch.bfloat16), "dkdv") == {}
