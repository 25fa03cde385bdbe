"""Where the host time of one eager forward+backward goes, without a profiler's own overhead.

At T = 8k the GPU work of ours takes ~0.2 ms (CUDA-graph rows), but the eager rows measure ~1.5-2 ms:
the GPU waits for Python. This splits the host time of a fwd+bwd step into
  - the step itself (perf_counter per step, mean of N, synchronised at the end of each step),
  - the same step with every launch through Triton's JIT (ops._launch.FAST_LAUNCH off),
  - each Triton kernel's launch through the JIT (JITFunction.run timed around every call),
  - everything else: the same step with every Triton launch replaced by a no-op (garbage outputs, but
    only torch ops run on them),
  - the floor: launching Triton kernels that do nothing, with our kernels' kinds of arguments, through
    the JIT and through the compiled kernel's own launcher (a launch cache's cost).

    PYTHONPATH=src python benchmarks/host_time.py [--T 8192] [--steps 200]
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import time

import torch
import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

from attention import _inputs, _ours  # noqa: E402  (benchmarks/ is the script's directory)


@triton.jit
def _empty1(X):
    pass


@triton.jit
def _empty40(X, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
             a21, a22, a23, a24, a25, a26, a27, a28, a29, a30, a31, a32, a33, a34, a35, a36, a37, a38, a39,
             B: tl.constexpr):
    pass


@triton.jit
def _empty13(t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12):
    pass


@triton.jit
def _empty13_26_8(t0, t1, t2, t3, t4, t5, t6, t7, t8, t9, t10, t11, t12,
                  a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15, a16, a17, a18, a19, a20,
                  a21, a22, a23, a24, a25, a26,
                  C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr, C4: tl.constexpr, C5: tl.constexpr,
                  C6: tl.constexpr, C7: tl.constexpr, C8: tl.constexpr):
    pass


def _launch_floor(n):
    """Host time of launching kernels that do nothing: through the JIT (what every launch of ours pays),
    and through the compiled kernel's own launcher (what a launch cache could pay instead)."""
    x = torch.empty(16, device="cuda")
    ts = [torch.empty(64, device="cuda") for _ in range(13)]
    ints = list(range(1, 27))
    consts = dict(C1=64, C2=64, C3=64, C4=64, C5=True, C6=False, C7="tf32", C8=True)
    rows = [("JIT, 1 tensor", lambda: _empty1[(1,)](x)),
            ("JIT, 1 tensor + 39 ints + 1 constexpr", lambda: _empty40[(1,)](x, *range(1, 40), B=4)),
            ("JIT, 13 tensors", lambda: _empty13[(1,)](*ts)),
            ("JIT, 13 tensors + 26 ints + 8 constexprs (like dq)", lambda: _empty13_26_8[(1,)](*ts, *ints, **consts))]
    try:
        compiled = _empty13_26_8[(1,)](*ts, *ints, **consts)
        stream = torch.cuda.current_stream().cuda_stream
        args = (*ts, *ints, *consts.values())
        runner = compiled[(1, 1, 1)]
        ptrs = [t.data_ptr() for t in ts]
        rows += [("compiled[grid](...), same args", lambda: runner(*args, stream=stream)),
                 ("compiled.run(...), same args", lambda: compiled.run(1, 1, 1, stream, compiled.function,
                                                                       compiled.packed_metadata, None, None, None,
                                                                       *args)),
                 ("compiled.run(...), pointers as ints", lambda: compiled.run(1, 1, 1, stream, compiled.function,
                                                                              compiled.packed_metadata, None, None,
                                                                              None, *ptrs, *ints, *consts.values()))]
    except Exception as e:  # the compiled-kernel API differs between Triton versions
        print(f"direct launch unavailable: {type(e).__name__}: {e}")
    for name, launch in rows:
        try:
            print(f"{name:56s} {_step_us(launch, n):6.1f} us per launch")
        except Exception as e:
            print(f"{name:56s} failed: {type(e).__name__}: {str(e)[:100]}")
    for name, op in (("torch.empty((8, 8192), int32)", lambda: torch.empty((8, 8192), dtype=torch.int32, device="cuda")),
                     ("t.data_ptr()", lambda: x.data_ptr()), ("torch.cuda.current_stream()", torch.cuda.current_stream)):
        print(f"{name:56s} {_step_us(op, n * 10):6.1f} us per call")


@contextlib.contextmanager
def _patched_run(wrap):
    original = JITFunction.run
    JITFunction.run = wrap(original)
    try:
        yield
    finally:
        JITFunction.run = original


def _step_us(step, n):
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    total = 0.0
    for _ in range(n):
        t0 = time.perf_counter()
        step()
        total += time.perf_counter() - t0
        torch.cuda.synchronize()  # outside the clock: the next step starts on an idle queue
    return total / n * 1e6


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, default=8192)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    T, n = args.T, args.steps
    q, k, v, dout, centroids = _inputs(T)
    _launch_floor(n)
    lines = []
    for assign in ("topk", "nearest"):
        f = _ours(assign)(T, centroids)

        def step():
            q.grad = k.grad = v.grad = None
            f(q, k, v).backward(dout)

        def fwd():
            with torch.no_grad():
                f(q, k, v)

        from routeformer.ops import _launch

        _launch.FAST_LAUNCH = False  # Triton's JIT for every launch (as before ops/_launch.py)
        jit_whole, jit_fwd = _step_us(step, n), _step_us(fwd, n)
        _launch.FAST_LAUNCH = True
        whole, whole_fwd = _step_us(step, n), _step_us(fwd, n)
        per_kernel = collections.defaultdict(float)
        calls = collections.Counter()

        def timed(original):
            def run(self, *a, **kw):
                t0 = time.perf_counter()
                out = original(self, *a, **kw)
                per_kernel[self.__name__] += time.perf_counter() - t0
                calls[self.__name__] += 1
                return out
            return run

        # Per launch and "everything else" through the JIT, which these patches see (cached launches
        # bypass JITFunction.run); the cached launches' share is the whole step less "everything else".
        _launch.FAST_LAUNCH = False
        with _patched_run(timed):
            timed_step = _step_us(step, n)
        with _patched_run(lambda original: (lambda self, *a, **kw: None)):
            rest = _step_us(step, n)
            rest_fwd = _step_us(fwd, n)
        _launch.FAST_LAUNCH = True
        steps = n + 5
        launch_total = sum(per_kernel.values()) / steps * 1e6
        lines.append(f"== {assign} T={T}: fwd+bwd {whole:.0f} us of host time per step (fwd alone {whole_fwd:.0f}) "
                     f"with the launch cache, {jit_whole:.0f} ({jit_fwd:.0f}) through the JIT; "
                     f"with each launch timed {timed_step:.0f}")
        lines.append(f"   Triton launches: {sum(calls.values()) / steps:.0f} per step, {launch_total:.0f} us per step")
        for name, t in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
            lines.append(f"     {name:32s} {calls[name] / steps:4.1f} calls/step  {t / calls[name] * 1e6:6.1f} us/call")
        lines.append(f"   everything but the Triton launches: fwd+bwd {rest:.0f} us, fwd {rest_fwd:.0f} us; so the "
                     f"cached launches take {whole - rest:.0f} us per step (the JIT's {jit_whole - rest:.0f})")
    # One launcher alone in a loop (is the first launch of a forward or backward dearer than the same
    # launch repeated?): the nearest forward's attention kernel with its two allocations.
    from routeformer.ops.routing import triton_ops as TO

    with torch.no_grad():
        idx = TO.routing_indices(q, q, centroids, 512, True, "nearest")
        alone = _step_us(lambda: TO.attention_fwd(q, q, v, *idx, 0.125, True), n)
    lines.append(f"== nearest attention_fwd alone, repeated: {alone:.0f} us per call (one launch, two allocations)")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
