"""Host-time budget of an eager routing fwd+bwd on the GPU path: how many torch ops and Triton launches it
makes. Below T = 32k an eager step is host-bound (benchmarks/RESULTS.md: ~1.5 ms of host time against
0.3 ms of GPU time at 8k), and every op or launch costs tens of microseconds there, so a change that
adds some should show up here and be a deliberate choice.

Counted on meta tensors with the GPU's plan (the kernels are recorded, not run: see
benchmarks/sm90_resources.py), so this runs on a CPU machine.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from routeformer.ops import _dispatch, routing_attention

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("sm90_resources", ROOT / "benchmarks" / "sm90_resources.py")
sm90 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sm90)

# Ops that only allocate or re-view storage: no kernel, next to no host time.
_FREE = {"empty", "empty_strided", "empty_permuted", "new_empty", "new_empty_strided", "empty_like", "detach",
         "alias", "lift_fresh", "_unsafe_view"}


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in _FREE and not func.is_view:
            self.ops.append(name)
        return func(*args, **(kwargs or {}))


# (torch ops, Triton launches) per fwd+bwd, shared QK, causal, window 512 (the benchmark setting).
# 87ca498 at 8k: topk (2, 12), nearest (2, 8); at 64k topk (13, 17): two scoring passes, each with a
# candidate gather and five torch ops mapping candidates to positions, and a concatenation. Now the
# dk/dv kernel's entry ranges take one launch, not two, each pass's second select gathers its
# candidates and writes positions into the one output itself, and nearest's slots come from a counting
# sort (a cumsum and one kernel) instead of a radix sort (one torch op, but ~6 cub kernels), a cast, a
# boundary search and the bounds kernel (NOTES_routing.md v8). Session 12 added one launch to each:
# the centroids' bf16 pieces, made once per call (for all of topk's scoring passes) instead of in every
# program of the score kernel (20 us of GPU time at 64k); nearest's cluster tiles are written by the
# slot kernel, not a launch of their own. Session 13 added one to each of topk's scoring passes at 64k:
# the threshold select, then the two-stage select's two kernels, which only finish the rows it flags
# (they return at once on the others: no host sync decides whether they run).
BUDGET = {("topk", 8192): (2, 14), ("nearest", 8192): (1, 7), ("topk", 65536): (2, 20), ("nearest", 65536): (1, 7)}


@pytest.mark.parametrize("assign,T", list(BUDGET))
def test_eager_fwd_bwd_op_and_launch_count(monkeypatch, assign, T):
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")  # lets backend="triton" take meta tensors
    # A dispatch mode counts as tracing, which would route every call through the custom ops; the
    # eager path is what is measured here.
    monkeypatch.setattr(_dispatch, "tracing", lambda: False)
    q = torch.empty(1, 8, T, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    v = torch.empty(1, 8, T, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    centroids = torch.empty(8, T // 512, 64, device="meta")
    launches: list = []
    with sm90.recording(launches), _CountOps() as counter:
        out = routing_attention(q, q, v, centroids, window=512, assign=assign, backend="triton")
        torch.autograd.grad(out, (q, v), torch.empty_like(out))
    kernels = [fn.__name__ for fn, _, _ in launches]
    max_ops, max_launches = BUDGET[assign, T]
    assert len(counter.ops) <= max_ops, counter.ops
    assert len(kernels) <= max_launches, kernels
    assert "_fwd_kernel" in kernels and "_bwd_dkdv_kernel" in kernels  # the count is of a real run
