"""FlexAttention with the local-attention sliding window, set up the same way in every benchmark.

Query i sees keys [(i // block) * block - flange, i] (causal). flex_attention is compiled with
dynamic=False, one graph per sequence length: with torch.compile's default, the second length seen
recompiles the kernel with symbolic shapes, which ran ~1.4x slower at T = 64k on an H200 (run D,
benchmarks/RESULTS.md) and made an earlier local-vs-Flex comparison (NOTES_local.md) look better for
us than it was. The block mask is built once per length, outside any timing, without a T x T mask.
"""
from __future__ import annotations

import torch

_COMPILED = {}


def sliding_window_flex(T: int, block: int, flange: int, device="cuda"):
    """-> f(q, k, v): FlexAttention over (B, H, T, D) tensors with the causal sliding-window mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    if "fn" not in _COMPILED:
        # One compiled graph per (T, grad mode): above the default limit of 8, dynamo would silently
        # fall back to the unfused flex_attention that materialises T x T scores.
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _COMPILED["fn"] = torch.compile(flex_attention, dynamic=False)

    def mask_mod(b, h, qi, kj):
        return (kj <= qi) & (kj >= (qi // block) * block - flange)

    mask = create_block_mask(mask_mod, None, None, T, T, device=device, _compile=True)

    def f(q, k, v):
        return _COMPILED["fn"](q, k, v, block_mask=mask)
    return f
