"""The fused routing-score kernel against the formula (kmeans.routing_scores), under the interpreter on CPU.

Both backends of routing_attention take their scores from the same path (scores.use_fused), so the
kernel only has to equal the formula within fp32 rounding; its group maxima and argmax must be exact
functions of its own scores.
"""
from __future__ import annotations

import pytest
import torch

from routeformer.ops.kmeans import routing_scores
from routeformer.ops.routing import scores
from routeformer.ops.routing._score_kernels import fused_argmax, fused_scores

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _inputs(B, H, T, D, C, dtype, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(B, H, T, D, generator=g) * 3 + 1).to(device=device, dtype=dtype)
    centroids = torch.randn(H, C, D, generator=g).to(device)
    return x, centroids


def _check(x, centroids, group):
    B, H, T, D = x.shape
    C = centroids.shape[1]
    s_t, gmax = fused_scores(x, centroids)
    expected = routing_scores(x, centroids).transpose(2, 3)
    torch.testing.assert_close(s_t, expected, atol=2e-5 * D ** 0.5, rtol=1e-5)
    G = -(-T // group)
    padded = torch.full((B, H, C, G * group), float("-inf"), device=x.device)
    padded[..., :T] = s_t
    assert torch.equal(gmax, padded.view(B, H, C, G, group).amax(-1))
    assert torch.equal(fused_argmax(x, centroids), s_t.argmax(dim=2)) or _near_ties_only(x, centroids, s_t)


def _near_ties_only(x, centroids, s_t):
    """The argmax variant is compiled separately and may round the other way on a near-tie only."""
    got = fused_argmax(x, centroids)
    best = s_t.amax(dim=2)
    chosen = s_t.gather(2, got[:, :, None]).squeeze(2)
    return bool(((best - chosen) <= 1e-5 * best.abs().clamp(min=1)).all())


@pytest.mark.parametrize("T,D,C,dtype", [(37, 24, 5, torch.float32), (100, 8, 20, torch.bfloat16),
                                         (70, 60, 33, torch.float16), (64, 16, 32, torch.bfloat16)])
def test_fused_scores_match_formula(monkeypatch, T, D, C, dtype):
    # C = 32: whole cluster tiles on the CPU's 16 (the kernel's EVEN_C drops the cluster mask)
    monkeypatch.setattr(scores, "GROUP", 4)
    x, centroids = _inputs(2, 2, T, D, C, dtype, "cpu")
    _check(x, centroids, 4)


@pytest.mark.parametrize("centred", [False, True])  # _score_kernels.CENTRED_ARGMAX
@pytest.mark.parametrize("offset", [1.0, 8.0])
def test_bf16_split_scores_match_formula(monkeypatch, offset, centred):
    """The bf16-split scores (LayerNorm folded out of three bf16 products) equal the formula within
    fp32 rounding, also with rows whose mean is several times their spread (the subtraction's
    cancellation grows with |mean| / std), and keep the group maxima and argmax exact."""
    from routeformer.ops.routing import _score_kernels as SK

    monkeypatch.setattr(SK, "BF16_SPLIT_SCORES", True)
    monkeypatch.setattr(SK, "CENTRED_ARGMAX", centred)
    monkeypatch.setattr(scores, "GROUP", 4)
    g = torch.Generator().manual_seed(4)
    for T, D, C in ((100, 24, 20), (37, 64, 5)):
        x = (torch.randn(2, 2, T, D, generator=g) + offset).to(torch.bfloat16)
        centroids = torch.nn.functional.normalize(torch.randn(2, C, D, generator=g), dim=-1) * 3
        assert SK._precision(x) == "bf16x3-upcast"
        _check(x, centroids, 4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: the centred argmax
def test_argmax_ties_go_to_the_lower_cluster(dtype):
    x, centroids = _inputs(1, 2, 40, 16, 20, torch.float32, "cpu", seed=1)
    x = x.to(dtype)
    centroids[:, 17] = centroids[:, 3]  # identical centroids in different C tiles (16 per tile on CPU)
    centroids[:, 5] = centroids[:, 3]
    got = fused_argmax(x, centroids)
    assert not (got == 17).any() and not (got == 5).any()
    assert torch.equal(got, routing_scores(x, centroids).argmax(-1))


def test_non_contiguous_input():
    x, centroids = _inputs(1, 3, 50, 16, 6, torch.float32, "cpu", seed=2)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)  # (B, H, T, D) view with T-major strides
    assert torch.equal(fused_scores(xt, centroids)[0], fused_scores(x, centroids)[0])


def test_paths_agree_off_cuda():
    """Off CUDA both backends use the formula: assignment_scores is the formula, transposed."""
    x, centroids = _inputs(1, 2, 30, 16, 4, torch.float32, "cpu", seed=3)
    assert not scores.use_fused(x)
    assert torch.equal(scores.assignment_scores(x, centroids), routing_scores(x, centroids).transpose(2, 3))
    assert torch.equal(scores.nearest_clusters(x, centroids), routing_scores(x, centroids).argmax(-1))


@gpu
@needs_cuda
@pytest.mark.parametrize("T,D,C,dtype", [(5000, 64, 10, torch.bfloat16), (4097, 128, 130, torch.float16),
                                         (3001, 256, 7, torch.float32), (1000, 40, 3, torch.bfloat16)])
def test_fused_scores_match_formula_gpu(T, D, C, dtype):
    x, centroids = _inputs(2, 3, T, D, C, dtype, "cuda")
    _check(x, centroids, scores.GROUP)


@gpu
@needs_cuda
@pytest.mark.parametrize("T,D,C", [(5000, 64, 10), (4097, 128, 130), (1000, 40, 3), (65536, 64, 128)])
@pytest.mark.parametrize("centred", [False, True])  # _score_kernels.CENTRED_ARGMAX
def test_bf16_split_scores_match_formula_gpu(monkeypatch, T, D, C, centred):
    """The bf16-split candidate (three bf16 tensor-core products, NOTES_routing.md v8) at real sizes."""
    from routeformer.ops.routing import _score_kernels as SK

    monkeypatch.setattr(SK, "BF16_SPLIT_SCORES", True)
    monkeypatch.setattr(SK, "CENTRED_ARGMAX", centred)
    x, centroids = _inputs(1, 2, T, D, C, torch.bfloat16, "cuda")
    assert SK._precision(x) == "bf16x3"
    _check(x, centroids, scores.GROUP)


def _presplit_against_in_kernel(monkeypatch, x, centroids, exact):
    """Scores, group maxima, argmax (centred and not) and counts with the centroid pieces made once per
    call (PRESPLIT_CENTROIDS) against the pieces made in every program. exact: the same bits (the
    interpreter reduces each row's sum in one order in both); on the GPU the two kernels may reduce
    sum(c) in different register layouts, so the scores agree within fp32 rounding and the argmax
    differs on near-ties only."""
    from routeformer.ops.routing import _score_kernels as SK

    monkeypatch.setattr(SK, "BF16_SPLIT_SCORES", True)
    block_c = SK.tiles(x)[1]
    results = {}
    for presplit in (True, False):
        monkeypatch.setattr(SK, "PRESPLIT_CENTROIDS", presplit)
        out = list(fused_scores(x, centroids))
        if centroids.shape[1] > block_c:  # a later scoring pass, as topk_index makes them
            out += list(fused_scores(x, centroids, block_c))
        for centred in (True, False):
            monkeypatch.setattr(SK, "CENTRED_ARGMAX", centred)
            out += [fused_argmax(x, centroids), *SK.fused_argmax_counts(x, centroids)]
        results[presplit] = out
    if exact:
        for got, expected in zip(results[True], results[False]):
            assert torch.equal(got, expected)
        return
    s_t, D = results[True][0], x.shape[-1]
    torch.testing.assert_close(s_t, results[False][0], atol=2e-5 * D ** 0.5, rtol=1e-5)
    best = s_t.amax(dim=2)
    for got in results[True][-6::3] + results[False][-6::3]:  # the argmax of each centred setting
        chosen = s_t.gather(2, got[:, :, None]).squeeze(2)
        assert ((best - chosen) <= 1e-5 * best.abs().clamp(min=1)).all()


@pytest.mark.parametrize("T,D,C", [(100, 24, 20), (37, 64, 35), (130, 60, 17)])
def test_presplit_centroids_same_bits(monkeypatch, T, D, C):
    g = torch.Generator().manual_seed(5)
    x = (torch.randn(2, 3, T, D, generator=g) + 2).to(torch.bfloat16)
    centroids = torch.randn(3, C, D, generator=g) * 2 + 0.5
    _presplit_against_in_kernel(monkeypatch, x, centroids, exact=True)


@gpu
@needs_cuda
@pytest.mark.parametrize("T,D,C", [(5000, 64, 10), (4097, 128, 130), (1000, 40, 3), (65536, 64, 128)])
def test_presplit_centroids_match_gpu(monkeypatch, T, D, C):
    x, centroids = _inputs(1, 2, T, D, C, torch.bfloat16, "cuda", seed=6)
    _presplit_against_in_kernel(monkeypatch, x, centroids + 0.5, exact=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scores_not_stored_leave_the_group_maxima(dtype, monkeypatch):
    """benchmarks/score_pass.py times the scoring pass without its score stores (STORE_SCORES False):
    that is only the same work if the group maxima come out the same bits, and the scores untouched."""
    from routeformer.ops.routing import _score_kernels as SK

    x, centroids = _inputs(1, 2, 150, 24, 40, dtype, "cpu", seed=9)
    s_t, gmax = SK._launch(x, centroids, write=True, argmax=False, c_begin=16, c_count=24)[:2]
    # _launch allocates the scores with torch.empty: hand it a poisoned buffer to see it left unwritten
    poison = torch.full_like(s_t, float("nan"))
    real_empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison if a and a[0] == tuple(s_t.shape)
                        else real_empty(*a, **k))
    s_none, gmax_none = SK._launch(x, centroids, write=True, argmax=False, c_begin=16, c_count=24,
                                   store_scores=False)[:2]
    monkeypatch.undo()
    assert s_none is poison and bool(torch.isnan(s_none).all())
    assert torch.equal(gmax_none, gmax)
    assert torch.isfinite(s_t).all()
