"""topk's threshold select (_select_kernels._threshold_select_kernel) against the stable sort.

Rows are built directly as (B, H, C', T) float32 scores with their group maxima, so each case controls
whether a row fits the kernel's candidate buffers (random scores) or is flagged and finished by the
two-stage select (heavy ties), and the tests check that both paths ran. The kernels run under
TRITON_INTERPRET=1 on CPU (tests/conftest.py); the gpu test repeats the benchmark's size on CUDA.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from routeformer.ops.routing import triton_ops as TO

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def poison():
    TO.POISON = True  # unwritten scratch or output reads as -1
    yield
    TO.POISON = False


def _group_max(s_t: torch.Tensor, group: int) -> torch.Tensor:
    T = s_t.shape[-1]
    G = -(-T // group)
    return F.pad(s_t, (0, G * group - T), value=float("-inf")).unflatten(-1, (G, group)).amax(-1).contiguous()


def _stable_top(s_t: torch.Tensor, w: int) -> torch.Tensor:
    # + 0.0 folds -0.0 onto +0.0, as the kernels' keys do; the stable sort breaks ties to the lower position.
    return torch.sort(s_t + 0.0, dim=-1, descending=True, stable=True).indices[..., :w].sort(-1).values


def _select(s_t, w, group, c0=0, c_out=None, monkeypatch=None):
    """Run one pass's threshold select into a poisoned (B, H, c_out, w) output; returns it and the
    flags the fallback launches saw."""
    B, H, Cp, _ = s_t.shape
    out = torch.full((B, H, c_out or Cp, w), -1, dtype=torch.int32, device=s_t.device)
    seen = []
    launch = TO._launch_select
    monkeypatch.setattr(TO, "_launch_select", lambda *a, **k: (seen.append(k.get("flag")), launch(*a, **k)))
    TO._launch_threshold_select(s_t, _group_max(s_t, group), out, w, c0, group)
    monkeypatch.setattr(TO, "_launch_select", launch)
    flags = [f for f in seen if f is not None]
    return out, (flags[0].clone() if flags else None)


@pytest.mark.parametrize("T,w,group", [(300, 9, 4), (1001, 12, 4), (257, 20, 4), (613, 7, 8)])
def test_threshold_select_equals_stable_sort(monkeypatch, T, w, group):
    """Random rows fit (flag 0); tied rows are flagged and finished by the two-stage select; signed
    zeros, a row of one value, few distinct values and a T that is no multiple of the group."""
    assert TO.threshold_plan(T, w, group) is not None
    g = torch.Generator().manual_seed(T + w)
    s_t = torch.randn(2, 1, 6, T, generator=g)
    s_t[0, 0, 1, ::3] = s_t[0, 0, 1, 5]  # a third of the row tied at one random value
    s_t[0, 0, 2] = torch.where(torch.rand(T, generator=g) < 0.5, 0.0, -0.0)  # only signed zeros
    s_t[0, 0, 3] = s_t[0, 0, 3].round()  # few distinct values
    s_t[1, 0, 4, : T // 2] = 2.0  # ties at the top, more than the buffers hold
    s_t[1, 0, 5, -w:] += 10.0  # the top w at the row's end (the last, partial group)
    out, flag = _select(s_t, w, group, monkeypatch=monkeypatch)
    assert torch.equal(out.long(), _stable_top(s_t, w))
    flag = flag.view(2, 6)
    assert flag[0, 0] == 0 and flag[1, 5] == 0  # random rows: the threshold kernel alone
    assert flag[0, 2] == 1 and flag[1, 4] == 1  # all tied / half tied: the fallback
    assert set(flag.unique().tolist()) <= {0, 1}


@pytest.mark.parametrize("slack", [0, 1 << 20, 1 << 31])
def test_threshold_select_is_exact_whatever_its_first_bound_slack(monkeypatch, slack):
    """The first bound may stop below the W-th maximum (THRESHOLD_L1_SLACK): 0 is the exact maximum,
    2**20 keys keeps many more candidates, 2**31 leaves the bound at the row's lowest maximum (rows
    then overflow the buffers and the fallback finishes them). The selection is the same."""
    monkeypatch.setattr(TO, "THRESHOLD_L1_SLACK", slack)
    g = torch.Generator().manual_seed(slack % 97)
    s_t = torch.randn(2, 1, 4, 700, generator=g)
    s_t[0, 0, 1, ::3] = s_t[0, 0, 1, 5]  # ties at a random value
    s_t[1, 0, 2] = s_t[1, 0, 2].round()  # few distinct values
    out, flag = _select(s_t, 10, 4, monkeypatch=monkeypatch)
    assert torch.equal(out.long(), _stable_top(s_t, 10)), slack
    if slack == 0:
        assert flag.view(2, 4)[0, 0] == 0  # a random row fits


def test_threshold_select_writes_its_slice_of_a_wider_output(monkeypatch):
    """A scoring pass over clusters c0 .. c0 + C' writes only those rows of the (B, H, C, w) output."""
    g = torch.Generator().manual_seed(2)
    s_t = torch.randn(2, 2, 3, 500, generator=g)
    s_t[1, 1, 2, 100:400] = 1.5  # one flagged row inside the slice
    out, flag = _select(s_t, 11, 4, c0=2, c_out=7, monkeypatch=monkeypatch)
    assert torch.equal(out[:, :, 2:5].long(), _stable_top(s_t, 11))
    assert (out[:, :, :2] == -1).all() and (out[:, :, 5:] == -1).all()
    assert flag.sum() == 1


def test_threshold_plan_keeps_about_two_w_first_stage_maxima():
    assert TO.threshold_plan(65536, 512, 16) == (4, 1024, 1024)
    assert TO.threshold_plan(131072, 512, 16) == (8, 1024, 1024)
    assert TO.threshold_plan(20000, 500, 16) == (1, 1250, 1024)
    assert TO.threshold_plan(8192, 512, 16) is None  # 512 groups: the whole-row select
    assert TO.threshold_plan(1 << 20, 2048, 16) is None  # wider than THRESHOLD_MAX_W


@gpu
@needs_cuda
def test_threshold_select_equals_stable_sort_gpu(monkeypatch):
    """T = 64k, W = 512 (the benchmark's pass: 64 clusters, 8 heads) and T = 20000, W = 500."""
    for T, w, C in ((65536, 512, 64), (20000, 500, 40)):
        s_t = torch.randn(1, 8, C, T, device="cuda")
        s_t[0, 0, 0, ::7] = 3.0  # ties past the buffers: flagged
        s_t[0, 1, 1, 1000:1600] = s_t[0, 1, 1, 5]  # a block of ties at a random value
        out, flag = _select(s_t, w, 16, monkeypatch=monkeypatch)
        assert torch.equal(out.long(), _stable_top(s_t, w)), T
        assert flag.view(8, C)[0, 0] == 1 and flag.view(8, C)[2:].sum() == 0, T


@pytest.mark.parametrize("C,W,T", [(5, 7, 40), (40, 3, 61), (70, 4, 100)])
def test_membership_inverse_equals_stable_sort(C, W, T):
    """topk's per-token index from cluster membership bits (one word and several per token: C up to
    70) equals the stable sort's permutation and its CSR row pointers; tokens in no cluster included."""
    g = torch.Generator().manual_seed(C)
    pos = torch.stack([torch.randperm(T, generator=g)[:W].sort().values for _ in range(2 * C)])
    pos = pos.view(2, C * W).to(torch.int32).contiguous()
    pos[1, :W] = torch.arange(T - W, T, dtype=torch.int32)  # a cluster at the row's end
    want_perm, want_rowptr = TO._inverse(pos, T)
    got_perm, got_rowptr = TO._inverse(pos, T, W)
    assert torch.equal(got_rowptr, want_rowptr) and got_rowptr.dtype == torch.int32
    assert torch.equal(got_perm, want_perm) and got_perm.dtype == torch.int32
    assert (want_rowptr[:, 1:] == want_rowptr[:, :-1]).any()  # some tokens have no entry


@gpu
@needs_cuda
def test_membership_inverse_equals_stable_sort_gpu():
    """The benchmark's shape: 8 heads, C = 128 clusters of 512 out of T = 64k (four words per token)."""
    T, C, W = 65536, 128, 512
    pos = torch.rand(8 * C, T, device="cuda").topk(W, dim=-1).indices.sort(-1).values
    pos = pos.view(8, C * W).to(torch.int32).contiguous()
    want = TO._inverse(pos, T)
    got = TO._inverse(pos, T, W)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
