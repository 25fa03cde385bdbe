"""routeformer's sync-free Adafactor against torch.optim.Adafactor, its specification."""
from __future__ import annotations

import pytest
import torch

from routeformer.training.adafactor import Adafactor


def _params(seed: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (3, 4, 6), (9,), (1,), (5, 1), (2, 3)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(dtype)) for s in shapes]


def _grads(params, step: int):
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g).to(p.dtype) * 10 ** (i % 3 - 1) for i, p in enumerate(params)]


@pytest.mark.parametrize("kwargs", [
    {},
    {"weight_decay": 0.1, "lr": 0.05},
    {"maximize": True, "d": 2.0, "eps": (1e-20, 1e-2)},
    {"beta2_decay": -0.5, "lr": torch.tensor(0.02)},
    {"lr": 1.0},  # above 1/sqrt(t): the relative step min(lr, 1/sqrt(t)) is 1/sqrt(t)
])
def test_matches_torch_adafactor_step_by_step(kwargs):
    ours, theirs = _params(0), _params(0)
    opt_ours = Adafactor(ours, **kwargs)
    opt_theirs = torch.optim.Adafactor(theirs, **kwargs)
    for step in range(6):
        for group in (opt_ours.param_groups[0], opt_theirs.param_groups[0]):
            if not isinstance(group["lr"], torch.Tensor):
                group["lr"] = group["lr"] * 0.9  # a schedule between steps
        for i, (a, b, g) in enumerate(zip(ours, theirs, _grads(ours, step))):
            # The last parameter skips every other step: its step count falls behind the others'.
            a.grad = b.grad = None if (i == len(ours) - 1 and step % 2) else g.clone()
            if a.grad is not None:
                b.grad = g.clone()
        opt_ours.step()
        opt_theirs.step()
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(ours, theirs):
        sa, sb = opt_ours.state[a], opt_theirs.state[b]
        assert sa.keys() == sb.keys()
        for key in sa:
            torch.testing.assert_close(sa[key], sb[key], rtol=1e-5, atol=1e-7)


def test_state_dicts_load_into_each_other():
    ours, theirs = _params(1), _params(1)
    opt_ours, opt_theirs = Adafactor(ours, lr=0.03), torch.optim.Adafactor(theirs, lr=0.03)
    for step in range(2):
        for a, b, g in zip(ours, theirs, _grads(ours, step)):
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    moved = Adafactor(_params(1), lr=0.03)
    moved.load_state_dict(opt_theirs.state_dict())
    back = torch.optim.Adafactor(_params(1), lr=0.03)
    back.load_state_dict(opt_ours.state_dict())
    assert [s["step"].item() for s in moved.state.values()] == [2.0] * len(ours)
    assert [s["step"].item() for s in back.state.values()] == [2.0] * len(ours)


def test_bfloat16_parameters_step_like_torch():
    ours, theirs = _params(2, torch.bfloat16), _params(2, torch.bfloat16)
    opt_ours, opt_theirs = Adafactor(ours), torch.optim.Adafactor(theirs)
    for step in range(3):
        for a, b, g in zip(ours, theirs, _grads(ours, step)):
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2)


def test_rejects_complex_and_sparse_like_torch():
    p = torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))
    p.grad = torch.randn(3, dtype=torch.complex64)
    with pytest.raises(RuntimeError, match="complex"):
        Adafactor([p]).step()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_step_never_synchronises_the_host():
    params = [torch.nn.Parameter(p.detach().cuda()) for p in _params(3)]
    opt = Adafactor(params, weight_decay=0.01)
    for p, g in zip(params, _grads(params, 0)):
        p.grad = g.cuda()
    opt.step()  # first step: state allocation
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        opt.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_step_counters_have_torchs_dtype_under_a_float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        ours, theirs = _params(4, torch.float64), _params(4, torch.float64)
        opt_ours, opt_theirs = Adafactor(ours), torch.optim.Adafactor(theirs)
        for a, b, g in zip(ours, theirs, _grads(ours, 0)):
            a.grad, b.grad = g.clone(), g.clone()
        opt_ours.step()
        opt_theirs.step()
    finally:
        torch.set_default_dtype(previous)
    for a, b in zip(ours, theirs):
        assert opt_ours.state[a]["step"].dtype == opt_theirs.state[b]["step"].dtype == torch.float64
        torch.testing.assert_close(a, b)
