"""Sampling from a RoutingTransformerLM: temperature, nucleus (top-p) and top-k filtering.

Plain recompute-the-prefix decoding: every new token runs the model over the whole context (the last
config.max_seq_len tokens). Cached decoding is a later issue's job; this path is the reference it must
match.
"""
from __future__ import annotations

import torch


def filter_logits(logits: torch.Tensor, *, top_p: float = 1.0, top_k: int = 0) -> torch.Tensor:
    """logits (..., V) -> logits with tokens outside the nucleus / top-k set to -inf.

    Nucleus (Holtzman et al. 2020): keep the smallest set of most probable tokens whose probability
    sums to at least top_p (the most probable token is always kept). Ties at the boundary are broken by
    token id (stable sort).
    """
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0 (0 disables it), got {top_k}")
    out = logits.clone()
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
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
    """prompt (B, T0) int64 -> (B, T0 + max_new_tokens). temperature 0 means greedy (argmax)."""
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (B, T0) with T0 >= 1 tokens, got shape {tuple(prompt.shape)}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
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
                filtered = filter_logits(logits / temperature, top_p=top_p, top_k=top_k)
                nxt = torch.multinomial(torch.softmax(filtered, -1), 1, generator=generator)
            tokens = torch.cat([tokens, nxt], dim=1)
    finally:
        model.train(was_training)
    return tokens
