"""Transformer block: mixed-heads attention and a feed-forward network, pre- or post-LayerNorm."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ModelConfig
from .attention import MixedAttention
from .centroids import RoutingCentroids


class FeedForward(nn.Module):
    """"relu": Linear-ReLU-Linear with biases; "geglu" (Shazeer 2020, the authors' text configs):
    (GELU(x W1) * x W2) W3 without biases. Hidden width round(ffn_mult * dim) in both cases."""

    def __init__(self, dim: int, kind: str, mult: float, dropout: float) -> None:
        super().__init__()
        hidden = int(round(mult * dim))
        if hidden < 1:
            raise ValueError(f"ffn_mult * dim must give a hidden width >= 1, got {mult} * {dim}")
        self.kind = kind
        if kind == "relu":
            self.w1 = nn.Linear(dim, hidden)
            self.w2 = None
        elif kind == "geglu":
            self.w1 = nn.Linear(dim, hidden, bias=False)
            self.w2 = nn.Linear(dim, hidden, bias=False)
        else:
            raise ValueError(f'ffn must be "relu" or "geglu", got {kind!r}')
        self.out = nn.Linear(hidden, dim, bias=kind == "relu")
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w2 is None:
            h = F.relu(self.w1(x))
        else:
            h = F.gelu(self.w1(x), approximate="tanh") * self.w2(x)
        return self.out(self.dropout(h))


class TransformerBlock(nn.Module):
    """norm="pre": x + drop(f(LN(x))) per sublayer; "post" (T2T default "dan"): LN(x + drop(f(x)))."""

    def __init__(self, config: ModelConfig, layer_index: int, centroids: RoutingCentroids | None = None) -> None:
        super().__init__()
        # The authors' sparsity_skip_first: those first layers turn every head local.
        num_local = config.heads if layer_index < config.sparsity_skip_first else config.local_num_heads
        self.pre_norm = config.norm == "pre"
        self.attn_norm = nn.LayerNorm(config.dim)
        self.attn = MixedAttention(config, num_local, centroids)
        self.ffn_norm = nn.LayerNorm(config.dim)
        self.ffn = FeedForward(config.dim, config.ffn, config.ffn_mult, config.dropout)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, *, compute_aux: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.pre_norm:
            y, aux = self.attn(self.attn_norm(x), compute_aux=compute_aux)
            x = x + self.dropout(y)
            return x + self.dropout(self.ffn(self.ffn_norm(x))), aux
        y, aux = self.attn(x, compute_aux=compute_aux)
        x = self.attn_norm(x + self.dropout(y))
        return self.ffn_norm(x + self.dropout(self.ffn(x))), aux
