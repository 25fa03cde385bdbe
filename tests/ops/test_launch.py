"""ops._launch: the launch cache must run a compiled kernel only for arguments it was compiled for.

On CPU the cache is driven with a stand-in kernel (the interpreter has no compiled kernels); on a GPU
the real kernels run with the cache on and off and must give the same bits.
"""
from __future__ import annotations

import pytest
import torch

from routeformer.ops import _launch

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA, so that launch() takes its cached path."""

    @property
    def is_cuda(self):
        return True


class _Compiled:
    def __init__(self, log, fail=False):
        self.log, self.fail = log, fail
        self.function, self.packed_metadata = "fn", "meta"

    def run(self, *args):
        if self.fail:
            raise TypeError("launcher takes other arguments")
        self.log.append(("run", args))


class _Kernel:
    """Stands in for a @triton.jit function: kernel[grid](...) is a JIT launch returning a compiled kernel."""

    arg_names = ["X", "n", "BLOCK", "FLAG"]

    def __init__(self, fail=False, compiles=True):
        self.log, self.fail, self.compiles = [], fail, compiles

    def __getitem__(self, grid):
        def jit(*args, **kwargs):
            self.log.append(("jit", grid, args, kwargs))
            return _Compiled(self.log, self.fail) if self.compiles else None  # the interpreter returns None
        return jit

    def kinds(self):
        return [entry[0] for entry in self.log]


@pytest.fixture
def fresh(monkeypatch):
    monkeypatch.setattr(_launch, "_cache", {})
    monkeypatch.setattr(_launch, "_broken", False)
    monkeypatch.setattr(_launch, "FAST_LAUNCH", True)
    monkeypatch.setattr(_launch, "_device_and_stream", lambda: (0, 77))
    monkeypatch.setattr(_launch, "_hooks_active", lambda: False)


def _x(n=64, dtype=torch.float32, offset=0):
    base = torch.zeros(n + 8, dtype=dtype)
    return base[offset:offset + n].as_subclass(_OnCuda)


def test_second_launch_runs_the_compiled_kernel_with_every_parameter_in_order(fresh):
    k, x = _Kernel(), _x()
    _launch.launch(k, (3, 2), x, 32, BLOCK=16, FLAG=True, num_warps=4)
    y = _x()  # another tensor of the same dtype and alignment
    _launch.launch(k, (5,), y, 32, BLOCK=16, FLAG=True, num_warps=4)
    assert k.kinds() == ["jit", "run"]
    args = k.log[1][1]
    assert args[:9] == (5, 1, 1, 77, "fn", "meta", None, None, None)
    assert args[9] is y and args[10:] == (32, 16, True)


def test_the_cache_is_bounded(fresh, monkeypatch):
    monkeypatch.setattr(_launch, "MAX_ENTRIES", 3)
    k, x = _Kernel(), _x()
    for n in range(10):
        _launch.launch(k, (1,), x, n, BLOCK=16, FLAG=True)
        assert len(_launch._cache) <= 3
    _launch.launch(k, (1,), x, 9, BLOCK=16, FLAG=True)
    assert k.kinds() == ["jit"] * 10 + ["run"]


@pytest.mark.parametrize("change", ["int 1", "int not /16", "int multiple of 16", "int64", "misaligned", "dtype",
                                    "constexpr", "option", "device"])
def test_what_the_jit_specialises_on_misses_the_cache(fresh, monkeypatch, change):
    k = _Kernel()
    x, n, kw = _x(), 32, dict(BLOCK=16, FLAG=True, num_warps=4)
    _launch.launch(k, (1,), x, n, **kw)
    if change == "int 1":
        n = 1
    elif change == "int not /16":
        n = 33
    elif change == "int multiple of 16":  # the JIT would reuse its kernel; the cache keys ints by value
        n = 48
    elif change == "int64":
        n = 2**32
    elif change == "misaligned":
        x = _x(offset=1)  # 4 bytes past a 16-byte boundary
        assert x.data_ptr() % 16 != 0
    elif change == "dtype":
        x = _x(dtype=torch.float16)
    elif change == "constexpr":
        kw["BLOCK"] = 32
    elif change == "option":
        kw["num_warps"] = 8
    else:
        monkeypatch.setattr(_launch, "_device_and_stream", lambda: (1, 77))
    _launch.launch(k, (1,), x, n, **kw)
    assert k.kinds() == ["jit", "jit"], change


@pytest.mark.parametrize("case", ["switched off", "cpu tensor", "parameter left to its default",
                                  "interpreter", "hook set", "grid callable", "unhashable argument"])
def test_the_jit_runs_where_the_cache_must_not(fresh, monkeypatch, case):
    k = _Kernel()
    x, kw, grid = _x(), dict(BLOCK=16, FLAG=True), (1,)
    if case == "switched off":
        monkeypatch.setattr(_launch, "FAST_LAUNCH", False)
    elif case == "cpu tensor":
        x = torch.zeros(64)
    elif case == "parameter left to its default":
        del kw["FLAG"]
    elif case == "interpreter":
        k = _Kernel(compiles=False)
    elif case == "hook set":
        monkeypatch.setattr(_launch, "_hooks_active", lambda: True)
    elif case == "unhashable argument":
        kw["FLAG"] = [1]
    else:
        grid = lambda meta: (1,)  # noqa: E731
    for _ in range(3):
        _launch.launch(k, grid, x, 32, **kw)
    assert k.kinds() == ["jit"] * 3, case


def test_a_launcher_that_refuses_the_call_turns_the_cache_off(fresh):
    k, x = _Kernel(fail=True), _x()
    for _ in range(3):
        _launch.launch(k, (1,), x, 32, BLOCK=16, FLAG=True)
    assert k.kinds() == ["jit", "jit", "jit"]  # the refused run() launched through the JIT instead
    assert _launch._broken and not _launch._cache


@gpu
@needs_cuda
@pytest.mark.parametrize("assign", ["topk", "nearest", "local"])
def test_cached_launches_give_the_jit_bits_gpu(monkeypatch, assign):
    """Real kernels, eager, twice each: through the JIT, then from the cache, with an aligned and a
    misaligned (offset) q, k, v; outputs and gradients bit for bit."""
    from routeformer.ops import local_attention, routing_attention

    g = torch.Generator(device="cuda").manual_seed(3)
    B, H, T, D = 1, 2, 1000, 40
    centroids = torch.nn.functional.normalize(torch.randn(H, 4, D, device="cuda", generator=g), dim=-1)

    def run(offset):
        flat = torch.randn(3 * B * H * T * D + offset, device="cuda", generator=g, dtype=torch.bfloat16)
        q, k, v = (flat[offset:].view(3, B, H, T, D)[i].detach().requires_grad_() for i in range(3))
        dout = torch.randn(B, H, T, D, device="cuda", generator=g, dtype=torch.bfloat16)
        results = []
        for fast in (False, True, True):
            monkeypatch.setattr(_launch, "FAST_LAUNCH", fast)
            for t in (q, k, v):
                t.grad = None
            if assign == "local":
                out = local_attention(q, k, v, block=64, flange=64, causal=True, backend="triton")
            else:
                out = routing_attention(q, q if assign == "nearest" else k, v, centroids, window=200, causal=True,
                                        assign=assign, backend="triton")
            out.backward(dout)
            results.append([out.detach().clone()] + [t.grad.clone() for t in (q, k, v) if t.grad is not None])
        for got in results[1:]:
            assert all(torch.equal(a, b) for a, b in zip(got, results[0])), (assign, offset)

    run(0)
    run(3)  # 6 bytes past a 16-byte boundary: another specialisation of every pointer
