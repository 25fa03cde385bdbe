"""Host time of one call through a torch.library custom op against our eager path (ops/_dispatch.py).

Runs on the CPU (no GPU needed: this is dispatcher time, not kernel time):

    PYTHONPATH=src python benchmarks/dispatch_overhead.py

Times a trivial op (two small outputs, float and bool arguments, like the routing launchers) called
(a) through its custom op, (b) through DualOp / AutogradDualOp eagerly, (c) as the plain function or
a hand-written autograd.Function, median of 7 runs of 5,000 calls. Then counts how many such calls
one routing forward+backward makes on the CUDA code path (run under the Triton interpreter at tiny
shapes; the count depends on T only through the clusters' scoring passes, triton_ops.cluster_chunk).
"""
from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from routeformer.ops import _dispatch  # noqa: E402


def _impl(x: torch.Tensor, y: torch.Tensor, s: float, b: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return x.new_empty(x.shape), y.new_empty(0)


def _fake(x, y, s, b):
    return x.new_empty(x.shape), y.new_empty(0)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _backward(ctx, a, b):
    return a, None, None, None


class _Plain(torch.autograd.Function):
    @staticmethod
    def forward(x, y, s, b):
        return _impl(x, y, s, b)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _setup(ctx, inputs, output)

    @staticmethod
    def backward(ctx, a, b):
        return _backward(ctx, a, b)


def _per_call_us(fn, *args, n=5000, runs=7):
    for _ in range(200):
        fn(*args)
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        for _ in range(n):
            fn(*args)
        times.append((time.perf_counter() - t) / n * 1e6)
    return statistics.median(times)


def dispatch_table():
    dual = _dispatch.custom_op("routeformer_bench::nop")(_impl)
    dual.op.register_fake(_fake)
    dual_ad = _dispatch.with_autograd(_dispatch.custom_op("routeformer_bench::nop_ad")(_impl), _backward, _setup)
    dual_ad.op.register_fake(_fake)
    x, y = torch.randn(4, 4), torch.randn(4)
    xg = x.clone().requires_grad_()
    rows = [
        ("no autograd", "custom op", _per_call_us(dual.op, x, y, 1.0, True)),
        ("no autograd", "DualOp (eager)", _per_call_us(dual, x, y, 1.0, True)),
        ("no autograd", "plain function", _per_call_us(_impl, x, y, 1.0, True)),
        ("autograd", "custom op", _per_call_us(dual_ad.op, xg, y, 1.0, True)),
        ("autograd", "AutogradDualOp (eager)", _per_call_us(dual_ad, xg, y, 1.0, True)),
        ("autograd", "autograd.Function", _per_call_us(_Plain.apply, xg, y, 1.0, True)),
    ]
    return rows


def count_calls():
    """DualOp calls in one routing forward+backward per mode, on the CUDA code path (fused scores,
    two-stage top-k) run under the interpreter at T = 256, C = 4, W = 16, one scoring pass."""
    from routeformer.ops import routing_attention
    from routeformer.ops.routing import scores

    counts = {}
    plain_call, ad_call, use_fused, group = (_dispatch.DualOp.__call__, _dispatch.AutogradDualOp.__call__,
                                             scores.use_fused, scores.GROUP)

    def counting(real):
        def call(self, *args):
            counts[mode] = counts.get(mode, 0) + 1
            return real(self, *args)
        return call

    _dispatch.DualOp.__call__ = counting(plain_call)
    _dispatch.AutogradDualOp.__call__ = counting(ad_call)
    scores.use_fused, scores.GROUP = (lambda x: True), 4
    try:
        g = torch.Generator().manual_seed(0)
        q, v = (torch.randn(1, 2, 256, 16, generator=g, requires_grad=True) for _ in range(2))
        centroids = torch.randn(2, 4, 16, generator=g)
        for mode in ("topk", "nearest"):
            out = routing_attention(q, q, v, centroids, window=16, assign=mode, backend="triton")
            out.sum().backward()
    finally:
        _dispatch.DualOp.__call__, _dispatch.AutogradDualOp.__call__ = plain_call, ad_call
        scores.use_fused, scores.GROUP = use_fused, group
    return counts


def main():
    rows = dispatch_table()
    counts = count_calls()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; host time per call (us, median of 7 x 5000)")
    print("| autograd | path | us per call |")
    print("|---|---|---:|")
    for grad, path, us in rows:
        print(f"| {grad} | {path} | {us:.1f} |")
    saved = (rows[0][2] - rows[1][2], rows[3][2] - rows[4][2])
    print(f"\nsaved per call: {saved[0]:.1f} us (no autograd), {saved[1]:.1f} us (autograd)")
    for mode, n in counts.items():
        extra = " (each further scoring pass adds 4)" if mode == "topk" else ""
        print(f"routing {mode}: {n} custom-op calls per forward+backward{extra}")


if __name__ == "__main__":
    main()
