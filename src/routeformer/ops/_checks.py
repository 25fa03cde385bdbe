"""Argument checks shared by the functional ops.

Every public op validates its inputs here so that a caller gets a ValueError/TypeError that names the
argument and the fix, never a shape error from deep inside an einsum.
"""
from __future__ import annotations

import functools
import math

import torch

BACKENDS = ("auto", "reference", "triton")
# What the Triton kernels take; backend="auto" sends anything else to the reference op.
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
TRITON_MAX_ROUTING_HEAD_DIM = 128  # the routing kernels keep a (rows x D) tile in registers


def gpu_plan(t: torch.Tensor) -> bool:
    """Whether a launcher picks GPU tiles, warps and precisions for t: on CUDA, and on the meta device,
    where nothing runs and benchmarks/sm90_resources.py records what a GPU launch would be."""
    return t.is_cuda or t.is_meta


# Device types torch.autocast knows; is_autocast_enabled raises for others (the meta tensors of
# benchmarks/sm90_resources.py).
_AUTOCAST_DEVICES = frozenset(("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla", "ipu", "privateuseone"))


def autocast_inputs(q, k, v):
    """(q, k, v) cast to the autocast dtype where autocast is on for q's device, as
    F.scaled_dot_product_attention's are, else unchanged.

    Why: under CUDA autocast F.layer_norm returns float32, so a model that LayerNorms q (qk_layernorm)
    but not v hands the op float32 q and bfloat16 v. k stays the same object as q when it was (shared
    QK). Anything that is not a floating tensor is left for check_qkv to reject."""
    if not isinstance(q, torch.Tensor) or q.device.type not in _AUTOCAST_DEVICES:
        return q, k, v
    if not torch.is_autocast_enabled(q.device.type):
        return q, k, v
    dtype = torch.get_autocast_dtype(q.device.type)

    def cast(t):  # what autocast itself casts: floating tensors other than float64
        eligible = isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    shared = k is q
    q = cast(q)
    return q, (q if shared else cast(k)), cast(v)


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """q, k: (B, H, T, D); v: (B, H, T, Dv). Same dtype (floating) and device."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (B, H, T, D), got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims (B, H, T, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"k must have the same shape as q {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"v must match q in (B, H, T) = {tuple(q.shape[:3])}, got {tuple(v.shape[:3])}"
        )
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} has dtype {t.dtype} but q has {q.dtype}: cast them to one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: move them to one device")
    if q.shape[2] == 0:
        raise ValueError("q has T = 0 tokens: pass at least one token")


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def check_nonnegative_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def resolve_scale(scale, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a positive finite float, got {scale}")
    return float(scale)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Reference ops compute in float32 at least (float64 stays float64) and cast back."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def autocast_off(fn):
    """Run fn with autocast disabled on its first argument's device.

    The reference ops and the routing scores fix their own precision (float32 math, compute_dtype);
    under torch.autocast their einsums would silently run in bf16/fp16, so the scores would select
    other tokens than the specification says and scatter_add would meet mixed dtypes.
    """

    @functools.wraps(fn)
    def wrapper(x, *args, **kwargs):
        device_type = x.device.type
        if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return wrapper
