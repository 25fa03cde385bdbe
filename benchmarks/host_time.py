"""Where the host time of one eager forward+backward goes, without a profiler's own overhead.

At T = 8k the GPU work of ours takes ~0.2 ms (CUDA-graph rows), but the eager rows measure ~1.5-2 ms:
the GPU waits for Python. This splits the host time of a fwd+bwd step into
  - the step itself (perf_counter per step, mean of N, synchronised at the end of each step),
  - each Triton kernel's launch (JITFunction.run timed around every call; mean per call and per step),
  - everything else: the same step with every Triton launch replaced by a no-op (garbage outputs, but
    only torch ops run on them),
  - the floor: launching an empty Triton kernel with 1 and with 40 arguments.

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
    x = torch.empty(16, device="cuda")
    for name, launch in (("empty kernel, 1 arg", lambda: _empty1[(1,)](x)),
                         ("empty kernel, 40 args", lambda: _empty40[(1,)](x, *range(1, 40), B=4))):
        print(f"{name}: {_step_us(launch, n):.1f} us per launch")
    lines = []
    for assign in ("topk", "nearest"):
        f = _ours(assign)(T, centroids)

        def step():
            q.grad = k.grad = v.grad = None
            f(q, k, v).backward(dout)

        def fwd():
            with torch.no_grad():
                f(q, k, v)

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

        with _patched_run(timed):
            timed_step = _step_us(step, n)
        with _patched_run(lambda original: (lambda self, *a, **kw: None)):
            rest = _step_us(step, n)
            rest_fwd = _step_us(fwd, n)
        steps = n + 5
        launch_total = sum(per_kernel.values()) / steps * 1e6
        lines.append(f"== {assign} T={T}: fwd+bwd {whole:.0f} us of host time per step (fwd alone {whole_fwd:.0f}); "
                     f"with each launch timed {timed_step:.0f}")
        lines.append(f"   Triton launches: {sum(calls.values()) / steps:.0f} per step, {launch_total:.0f} us per step")
        for name, t in sorted(per_kernel.items(), key=lambda kv: -kv[1]):
            lines.append(f"     {name:32s} {calls[name] / steps:4.1f} calls/step  {t / calls[name] * 1e6:6.1f} us/call")
        lines.append(f"   everything but the Triton launches: fwd+bwd {rest:.0f} us, fwd {rest_fwd:.0f} us")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
