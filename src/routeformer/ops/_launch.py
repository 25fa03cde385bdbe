"""Triton launches with less host time: after the first launch of a specialization, call the compiled
kernel's own launcher instead of going through the JIT again.

Why: below ~32k tokens our eager steps are host-bound. On the H200 host of 2026-12-02
(benchmarks/host_time.py, benchmarks/RESULTS.md run I) a kernel that does nothing, with a dq-like
argument list (13 tensors, 26 ints, 8 constexprs), cost 29 us to launch through the JIT, against 8 us
through `compiled.run`. Our real kernels cost 34-107 us each through the JIT, and a nearest fwd+bwd
makes 6 launches, topk 11.

What the JIT does on every call and this skips: binding and specialising every argument, building
its cache key, checking the kernel's globals, and the launch-metadata hooks. The cache key here is
built to cover everything the JIT specialises on, so a cached kernel never runs arguments it was not
compiled for:
- tensors by dtype and by the pointer's offset within 16 bytes (the JIT: 16-byte aligned or not);
- ints by value (the JIT: equal to 1, divisible by 16, and their width);
- everything else (floats, bools, None, strings) by type and value;
- the constexprs and launch options by value, and the current device.
Keying ints by value costs one entry per distinct set of shapes and strides, each filled by one JIT
launch (which finds the kernel in the JIT's own cache), but keeps the key cheap: it is built on every
launch, and classifying each int cost ~0.5 us of Python per argument.

The JIT still runs where this cannot help or must not:
- when the first argument is not a CUDA tensor (the interpreter's CPU tensors;
  benchmarks/sm90_resources.py records launches on meta tensors), or the JIT returned no compiled
  kernel (the interpreter);
- when a launch hook was set at a kernel's first launch (profilers such as proton read them). Reading
  the hooks costs ~16 us (Triton's knobs), so later launches do not look again: set FAST_LAUNCH =
  False before profiling with hooks installed mid-run;
- when a kernel parameter is left to its default;
- when the compiled kernel lacks the launcher API this was written against (Triton 3.6 on the GPU
  machine); that case also turns the cache off for the process.
FAST_LAUNCH = False turns it off (benchmarks/attention.py --ab variant "jit launches").
"""
from __future__ import annotations

import torch

FAST_LAUNCH = True
# Entries are per distinct integer arguments (shapes, strides), so a run over many sequence lengths
# (cached decoding) would grow the cache without end; past this many it starts again.
MAX_ENTRIES = 1024
_cache: dict = {}
_broken = False  # set when the compiled kernel's launcher does not take our call


def _key(args) -> tuple:
    """What a cached kernel must match (see the module docstring), built in one pass because it runs on
    every launch: ints by value (finer than the JIT's classes, so always safe), tensors by dtype and
    pointer offset within 16 bytes, anything else by type and value."""
    return tuple([a if a.__class__ is int else (a.dtype, a.data_ptr() & 15) if isinstance(a, torch.Tensor)
                  else (a.__class__, a) for a in args])  # a list first: ~25% faster than a generator


_runtime_knobs = None


def _hooks_active() -> bool:
    global _runtime_knobs
    if _runtime_knobs is None:
        from triton import knobs

        _runtime_knobs = knobs.runtime
    for hook in (_runtime_knobs.launch_enter_hook, _runtime_knobs.launch_exit_hook):
        if hook is not None and (not hasattr(hook, "calls") or hook.calls):
            return True
    return False


def _usable(compiled) -> bool:
    return all(hasattr(compiled, name) for name in ("run", "function", "packed_metadata"))


def _on_cuda(t) -> bool:
    return getattr(t, "is_cuda", False)


def _device_and_stream():
    device = torch.cuda.current_device()
    return device, torch._C._cuda_getCurrentRawStream(device)


def launch(kernel, grid: tuple, *args, **kwargs) -> None:
    """kernel[grid](*args, **kwargs), where kernel is a @triton.jit function, args its leading
    parameters by position and kwargs its remaining parameters (constexprs) and launch options."""
    global _broken
    if not FAST_LAUNCH or _broken or not _on_cuda(args[0]):
        kernel[grid](*args, **kwargs)
        return
    device, stream = _device_and_stream()
    key = (kernel, device, _key(args), tuple(kwargs.items()))  # constexprs and options by value
    try:
        entry = _cache.get(key)
    except TypeError:  # an unhashable argument: only the JIT can tell what it means
        kernel[grid](*args, **kwargs)
        return
    if entry is None:
        compiled = kernel[grid](*args, **kwargs)  # compiles (or finds) and launches
        rest = kernel.arg_names[len(args):]
        if (not callable(grid) and _usable(compiled) and all(name in kwargs for name in rest)
                and not _hooks_active()):
            if len(_cache) >= MAX_ENTRIES:
                _cache.clear()
            _cache[key] = (compiled, tuple(kwargs[name] for name in rest))
        return
    compiled, constexprs = entry
    g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
    try:
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *constexprs)
    except TypeError:  # this Triton's launcher takes other arguments: launch through the JIT from now on
        _broken = True
        _cache.clear()
        kernel[grid](*args, **kwargs)
