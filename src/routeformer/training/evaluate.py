"""Evaluation: mean negative log-likelihood over a split, reported in the dataset's metric.

bits per character/byte (enwik8, text8, stdlib, Wikitext-103 bytes) and bits per dimension (images) are
nll / ln 2; perplexity (Wikitext-103 words, PG-19) is exp(nll). For subword data the split's word count
also gives word-level perplexity exp(nll * tokens / words): the total NLL of the split over its words.
That identity holds only when nll is the mean over the whole split, so an evaluation of part of it
(--max-tokens, train.eval_tokens) reports `word_ppl_estimate` instead: the whole split's tokens-per-word
ratio applied to a part whose ratio may differ.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sampler import eval_batches


@torch.no_grad()
def evaluate_nll(model: torch.nn.Module, tokens: np.ndarray, *, seq_len: int, batch_size: int,
                 example_length: int = 0, max_tokens: int | None = None, device: torch.device | str = "cpu",
                 autocast=contextlib.nullcontext) -> tuple[float, int]:
    """(mean NLL in nats per target token, number of target tokens) over non-overlapping windows."""
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    try:
        for x, y in eval_batches(tokens, seq_len=seq_len, batch_size=batch_size,
                                 example_length=example_length, max_tokens=max_tokens):
            x, y = x.to(device), y.to(device)
            with autocast():
                logits = model(x)
            total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="sum").double()
            count += y.numel()
    finally:
        model.train(was_training)
    return float(total) / count, count  # one host sync for the whole evaluation


def report(nll: float, metric: str, split_info: dict | None = None, *, whole_split: bool = False) -> dict:
    """{"nll", metric: value, ...} for a mean NLL (nats per token).

    whole_split: nll covers every full window of the split (sampler.eval_target_count), so word-level
    perplexity is reported as "word_ppl"; otherwise as "word_ppl_estimate". False unless the caller knows.
    """
    out = {"nll": nll}
    if metric in ("bpc", "bpd"):
        out[metric] = nll / math.log(2)
    else:
        out["ppl"] = math.exp(min(nll, 700.0))
        if split_info and split_info.get("words"):
            ratio = split_info["tokens"] / split_info["words"]
            out["word_ppl" if whole_split else "word_ppl_estimate"] = math.exp(min(nll * ratio, 700.0))
    return out
