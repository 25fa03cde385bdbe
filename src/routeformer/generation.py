"""Sampling from a RoutingTransformerLM: temperature, nucleus (top-p) and top-k filtering.

Plain recompute-the-prefix decoding: every new token runs the model over the whole context (the last
config.max_seq_len tokens). Cached decoding is a later issue's job; this path is the reference it must
match.
"""
from __future__ import annotations

import math

import torch


def filter_logits(logits: torch.Tensor, *, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """logits (..., V) -> logits with tokens outside the nucleus / top-k set to -inf.

    Top-k keeps exactly k tokens: the k largest logits, and among tokens tied at the k-th value the
    lowest ids (the order of a stable sort, and of argmax, which picks the first maximum). Keeping every
    tied token instead would let top_k=1 sample among equals where greedy decoding does not.
    Nucleus (Holtzman et al. 2020): keep the smallest set of most probable tokens whose probability
    sums to at least top_p (the most probable token is always kept). Ties at the boundary are broken by
    token id (stable sort). Top-k is applied first.
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    out = logits.clone()
    if top_k and top_k < logits.shape[-1]:
        # torch.topk does not say which of several tied tokens it returns; a stable sort does.
        order = torch.sort(logits, dim=-1, descending=True, stable=True).indices
        drop = torch.ones_like(out, dtype=torch.bool).scatter(-1, order[..., :top_k], False)
        out = out.masked_fill(drop, float("-inf"))
    if top_p < 1.0:
        probs = torch.softmax(out.float(), dim=-1)
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass of the strictly more probable tokens
        drop_sorted = before >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


@torch.no_grad()
def sample(model: torch.nn.Module, prompt: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, generator: torch.Generator | None = None) -> torch.Tensor:
    """prompt (B, T0) int64 -> (B, T0 + max_new_tokens). temperature 0 means greedy (argmax).

    Any finite temperature > 0 is valid, however small: the logits are shifted so that their maximum
    is 0 before dividing, so a tiny temperature sends the others to -inf (probability 0) rather than
    overflowing to inf and NaN, and sampling approaches greedy decoding as the temperature goes to 0.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (B, T0) with T0 >= 1 tokens, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0: greedy), got {temperature}")
    was_training = model.training
    model.eval()
    tokens = prompt
    max_len = model.config.max_seq_len
    try:
        for _ in range(max_new_tokens):
            logits = model(tokens[:, -max_len:])[:, -1].float()
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                # float64: a temperature below float32's smallest subnormal would round to 0 (0 / 0).
                shifted = (logits - logits.max(-1, keepdim=True).values).double()
                filtered = filter_logits(shifted / temperature, top_p=top_p, top_k=top_k)
                nxt = torch.multinomial(torch.softmax(filtered, -1), 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
    finally:
        model.train(was_training)
    return tokens
