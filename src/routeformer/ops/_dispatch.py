"""Custom ops while tracing, their plain implementations when running eagerly.

The Triton paths register `torch.library.custom_op`s so that torch.compile (and any fake-tensor
tracing) sees each kernel launcher as one opaque call with a known output: no graph break. In eager
mode the dispatcher adds host time to every call (benchmarks/dispatch_overhead.py: 13 -> 3 us, 27 -> 9
us with autograd, on the CPU machine), and a routing forward+backward makes 3 (nearest) to 6 + 4 per
extra scoring pass (topk) such calls, so eager calls go straight to the same implementation, and
autograd through an equivalent `torch.autograd.Function`.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode


def tracing() -> bool:
    """True under torch.compile / export, any dispatch mode (fake tensors, make_fx) and torch.jit.trace:
    whatever records ops must see the custom op, since it cannot see a Triton launch."""
    return (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
            or torch.jit.is_tracing())


class DualOp:
    """Calls `op` (the registered custom op) while tracing and `impl` (its implementation) otherwise.

    `op` is what torch.library.opcheck and torch.compile see; calls take positional arguments.
    """

    def __init__(self, op, impl: Callable):
        self.op = op
        self.impl = impl

    def __call__(self, *args):
        return self.op(*args) if tracing() else self.impl(*args)


class AutogradDualOp(DualOp):
    """A DualOp with a backward, made by `with_autograd`: the op carries it for tracing, and an
    equivalent torch.autograd.Function runs it for eager calls."""

    def __init__(self, dual: DualOp, backward: Callable, setup_context: Callable):
        super().__init__(dual.op, dual.impl)

        def setup(ctx, inputs, output):
            # Gradients of outputs nobody used arrive as None, not as materialised zeros (for
            # per-entry buffers those would be full-size allocations in every backward).
            ctx.set_materialize_grads(False)
            setup_context(ctx, inputs, output)

        def forward(ctx, *args):
            output = dual.impl(*args)
            setup(ctx, args, output)
            return output

        self.op.register_autograd(backward, setup_context=setup)
        # forward(ctx, ...) rather than a separate setup_context staticmethod: the latter style cost
        # 26 us of host time per call against 8.5 us (torch 2.13, CPU).
        self.function = type(f"{dual.impl.__name__}_function", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "backward": staticmethod(backward),
        })

    def __call__(self, *args):
        return self.op(*args) if tracing() else self.function.apply(*args)


def custom_op(name: str) -> Callable[[Callable], DualOp]:
    """Decorator: register `impl` as the custom op `name` (no mutated arguments) and return a DualOp.
    Register its fake function with `@result.op.register_fake`."""

    def wrap(impl: Callable) -> DualOp:
        return DualOp(torch.library.custom_op(name, impl, mutates_args=()), impl)

    return wrap


def with_autograd(dual: DualOp, backward: Callable, setup_context: Callable) -> AutogradDualOp:
    """`dual` made differentiable; `setup_context(ctx, inputs, output)` and `backward(ctx, *grads)`
    follow torch.library's register_autograd convention."""
    return AutogradDualOp(dual, backward, setup_context)
