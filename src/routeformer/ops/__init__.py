"""Parameter-free functional ops, (B, H, T, D) layout everywhere.

Each op has a pure-PyTorch reference (the specification) and Triton fast paths tested against it.
"""
from __future__ import annotations

import functools

from . import kmeans
from .local import local_attention
from .routing import routing_attention


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    """True when Triton imports and can drive a CUDA device."""
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


__all__ = ["routing_attention", "local_attention", "kmeans", "triton_available"]
