"""Rotary position embedding (Su et al. 2021), rotate-half layout, for the local heads.

Legend: B batch, H heads, T tokens, D head dim (even).
"""
from __future__ import annotations

import torch
import torch.nn as nn


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D); cos, sin (T, D) -> x rotated by position."""
    return x * cos + rotate_half(x) * sin


class RotaryEmbedding(nn.Module):
    """Makes the (T, D) cos/sin tables on the fly: cheap next to attention, and no length to fix upfront."""

    def __init__(self, head_dim: int, base: float = 10000.0) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary position encoding needs an even head_dim, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        self.register_buffer("inv_freq", inv_freq.float(), persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        T = q.shape[2]
        # float32 angles at least: bf16 positions lose integer precision beyond 256.
        dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
        pos = torch.arange(T, device=q.device, dtype=dtype)
        angles = pos[:, None] * self.inv_freq.to(dtype)[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
