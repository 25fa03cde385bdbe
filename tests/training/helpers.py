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


def tiny_config(data, steps: int, extra=()):
    """The `tiny` preset shrunk by TINY, on the prepared dataset `data`, for `steps` optimizer steps."""
    from routeformer.presets import get_preset
    from routeformer.training import config_from_preset

    return config_from_preset(get_preset("tiny"), TINY + [f"data.path={data}", f"train.max_steps={steps}", *extra])


def poison_loss(monkeypatch, step: int, kind: str = "nan") -> dict:
    """From now on, optimizer step `step` of the next training run goes wrong (grad_accum=1): its loss is NaN
    ("nan"), its loss is finite but its gradients NaN ("grad"), or it raises KeyboardInterrupt ("interrupt").
    Returns the plan; set plan["step"] = None to train normally again."""
    import torch

    real = torch.nn.functional.cross_entropy
    plan = {"step": step, "calls": 0}

    def cross_entropy(*args, **kwargs):
        loss = real(*args, **kwargs)
        if "reduction" in kwargs or plan["step"] is None:  # evaluation passes reduction="sum"
            return loss
        plan["calls"] += 1
        if plan["calls"] != plan["step"]:
            return loss
        if kind == "interrupt":
            raise KeyboardInterrupt
        if kind == "grad":
            loss.register_hook(lambda grad: grad * float("nan"))
            return loss
        return loss * float("nan")

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", cross_entropy)
    return plan
