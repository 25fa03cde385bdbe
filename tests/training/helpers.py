"""Shared by the training and CLI tests: a tiny corpus and a model small enough for seconds on CPU."""
from __future__ import annotations

import numpy as np

from routeformer.data import prepare

# --set overrides that shrink the `tiny` preset; dropout > 0 so that resume must restore the RNG.
TINY = ["model.dim=32", "model.depth=2", "model.heads=2", "model.max_seq_len=64", "model.query_shape=16",
        "model.memory_flange=16", "model.sparsity_cluster_size=2", "model.sparsity_cluster_attention_window=16",
        "model.max_relative_distance=33", "model.dropout=0.1", "train.seq_len=32", "train.batch_size=2",
        "train.warmup_steps=2", "train.progress=false", "train.log_every=1", "train.eval_tokens=256",
        "train.device=cpu"]


def corpus_file(path, n_bytes: int = 20000, seed: int = 0):
    """Random printable text with some structure (repeated words), so a model can learn something."""
    rng = np.random.default_rng(seed)
    words = ["def ", "return ", "self", ".", "(", ")", ":\n    ", "import ", "x", "y", " = ", "1", "\n"]
    text = "".join(rng.choice(words, size=n_bytes // 3))[:n_bytes]
    path.write_text(text)
    return path


def prepared(tmp_path, n_bytes: int = 20000):
    src = corpus_file(tmp_path / "corpus.txt", n_bytes)
    return prepare("stdlib", tmp_path / "data", from_file=src)
