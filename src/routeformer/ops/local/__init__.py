"""Local (blocked sliding-window) attention.

Legend: B batch, H heads, T tokens, D head dim.
"""
from __future__ import annotations

import torch

from .._checks import (TRITON_DTYPES, autocast_inputs, check_backend, check_nonnegative_int, check_positive_int,
                       check_qkv, resolve_scale)
from .reference import local_attention_reference

__all__ = ["local_attention"]


def _check_rel_tables(rel_k, rel_v, q: torch.Tensor, v: torch.Tensor) -> None:
    if (rel_k is None) != (rel_v is None):
        raise ValueError("rel_k and rel_v go together: pass both relative-position tables or neither")
    if rel_k is None:
        return
    for name, table, width in (("rel_k", rel_k, q.shape[-1]), ("rel_v", rel_v, v.shape[-1])):
        if not isinstance(table, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of shape (2M + 1, D), got {type(table).__name__}")
        if table.dim() != 2 or table.shape[1] != width or table.shape[0] % 2 != 1:
            raise ValueError(
                f"{name} must have shape (2M + 1, {width}) (an odd number of rows), got {tuple(table.shape)}"
            )
        if table.device != q.device:
            raise ValueError(f"{name} is on {table.device} but q is on {q.device}: move it to one device")
    if rel_k.shape[0] != rel_v.shape[0]:
        raise ValueError(f"rel_k and rel_v must have the same number of rows, got {rel_k.shape[0]} and {rel_v.shape[0]}")


def local_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    block: int,
    flange: int,
    causal: bool = True,
    scale: float | None = None,
    rel_k: torch.Tensor | None = None,
    rel_v: torch.Tensor | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Blocked local attention. q, k, v: (B, H, T, D) -> (B, H, T, Dv); any T.

    Query i in block b = i // block attends keys j in [b*block - flange, (b+1)*block)
    (non-causal: up to (b+1)*block + flange), only j <= i if causal. Optional Shaw et al. relative
    positions: tables rel_k, rel_v of shape (2M + 1, D), distance clipped to [-M, M].
    backend: "auto" (Triton on CUDA when available), "reference" or "triton".
    Under autocast, q, k and v run in the autocast dtype (as F.scaled_dot_product_attention); the tables
    keep theirs, as outside autocast.
    """
    q, k, v = autocast_inputs(q, k, v)
    check_qkv(q, k, v)
    check_positive_int("block", block)
    check_nonnegative_int("flange", flange)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    _check_rel_tables(rel_k, rel_v, q, v)
    check_backend(backend)
    scale = resolve_scale(scale, q.shape[-1])

    use_triton = backend == "triton"
    if backend == "auto":
        from .. import triton_available

        use_triton = q.is_cuda and q.dtype in TRITON_DTYPES and triton_available()
    if use_triton:
        from .triton_ops import local_attention_triton

        return local_attention_triton(
            q, k, v, block=block, flange=flange, causal=causal, scale=scale, rel_k=rel_k, rel_v=rel_v
        )
    out = local_attention_reference(
        q, k, v, block=block, flange=flange, causal=causal, scale=scale, rel_k=rel_k, rel_v=rel_v
    )
    return out.to(q.dtype)
