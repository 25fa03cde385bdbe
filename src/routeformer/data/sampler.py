"""Seeded, resumable batch samplers over a token array.

Training batches are random windows. The window starts of batch `step` on `rank` are a pure function of
(seed, rank, step): numpy's PCG64 seeded by SeedSequence([seed, rank, step]). The sampler's whole state
is therefore the step counter, which the checkpoint stores; a resumed run draws exactly the batches an
uninterrupted run would have drawn, whatever the number of workers or restarts.

Evaluation walks the split in order with non-overlapping windows (`eval_batches`).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

# Fixed-length examples (images) are read as this id followed by the example, so the model predicts
# every value of it: value i sits at input position i + 1. Sampling and plotting must do the same.
START_TOKEN = 0


def _window_count(num_tokens: int, seq_len: int, example_length: int) -> int:
    if example_length:
        return num_tokens // example_length
    return num_tokens - seq_len  # starts 0 .. N - seq_len - 1 leave room for the shifted target


def _gather(tokens: np.ndarray, starts: np.ndarray, length: int) -> torch.Tensor:
    rows = np.stack([np.asarray(tokens[s : s + length], dtype=np.int64) for s in starts])
    return torch.from_numpy(rows)


class RandomBatchSampler:
    """Random (inputs, targets) windows of seq_len tokens; targets are the inputs shifted by one.

    With example_length > 0 (images) each window is one example: seq_len must equal example_length,
    the input is the example with START_TOKEN (id 0) prepended and its last token dropped, and the
    target is the whole example, so every token of every example is predicted.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1, example_length: int = 0):
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if example_length and seq_len != example_length:
            raise ValueError(
                f"this dataset holds examples of {example_length} tokens (one image each): set "
                f"train.seq_len={example_length} (got {seq_len})"
            )
        need = example_length or seq_len + 1
        if len(tokens) < need:
            raise ValueError(
                f"the training split has {len(tokens)} tokens, fewer than the {need} one sequence needs: "
                f"use more data or a smaller train.seq_len"
            )
        self.tokens = tokens
        self.seq_len, self.batch_size = seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.example_length = example_length
        self.num_windows = _window_count(len(tokens), seq_len, example_length)
        self.step = 0

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch of `step` on this rank: (inputs, targets), each (batch_size, seq_len) int64."""
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.rank, step])))
        starts = rng.integers(0, self.num_windows, size=self.batch_size)
        if self.example_length:
            targets = _gather(self.tokens, starts * self.example_length, self.example_length)
            inputs = torch.cat([torch.full_like(targets[:, :1], START_TOKEN), targets[:, :-1]], dim=1)
            return inputs, targets
        rows = _gather(self.tokens, starts, self.seq_len + 1)
        return rows[:, :-1], rows[:, 1:]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.step)
        self.step += 1
        return out

    def state_dict(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "rank", "world_size"):
            if state.get(key) != getattr(self, key):
                raise ValueError(
                    f"sampler state was saved with {key}={state.get(key)} but this run has {key}="
                    f"{getattr(self, key)}: resume with the same settings"
                )
        self.step = int(state["step"])


def _eval_starts(num_tokens: int, seq_len: int, example_length: int, max_tokens: int | None) -> np.ndarray:
    if example_length:
        starts = np.arange(num_tokens // example_length) * example_length
    else:
        starts = np.arange((num_tokens - 1) // seq_len) * seq_len
    if max_tokens is not None:
        starts = starts[: max(1, max_tokens // seq_len)]
    return starts


def eval_target_count(num_tokens: int, *, seq_len: int, example_length: int = 0,
                      max_tokens: int | None = None) -> int:
    """How many target tokens eval_batches yields (with max_tokens None: a whole-split evaluation)."""
    return len(_eval_starts(num_tokens, seq_len, example_length, max_tokens)) * (example_length or seq_len)


def eval_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, example_length: int = 0,
                 max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows in order, covering each token once as a target (the tail that does not
    fill a whole window is dropped). max_tokens caps the number of target tokens (None: whole split)."""
    if seq_len < 1 or batch_size < 1:
        raise ValueError(f"seq_len and batch_size must be >= 1, got {seq_len} and {batch_size}")
    starts = _eval_starts(len(tokens), seq_len, example_length, max_tokens)
    length = example_length or seq_len + 1
    if len(starts) == 0:
        raise ValueError(
            f"the evaluation split has {len(tokens)} tokens, too few for one window of {seq_len}: "
            "use more data or a smaller seq_len"
        )
    for i in range(0, len(starts), batch_size):
        rows = _gather(tokens, starts[i : i + batch_size], length)
        if example_length:
            yield torch.cat([torch.full_like(rows[:, :1], START_TOKEN), rows[:, :-1]], dim=1), rows
        else:
            yield rows[:, :-1], rows[:, 1:]
