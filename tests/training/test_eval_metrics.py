"""What `routeformer eval` reports, from hand-made cross-entropies: bits per character / dimension are
nats / ln 2, perplexity is e^nats, word-level perplexity e^(nats * tokens / words), on numbers worked out
by hand. (Library code of training/evaluate.py; here because tests/cli covers the eval command.)"""
import math

import numpy as np
import pytest
import torch

from routeformer.data.sampler import eval_target_count
from routeformer.training.evaluate import evaluate_nll, report

# Probabilities 1/2, 1/4, 1/8, 1/8 for ids 0..3: id 0 costs 1 bit, id 1 2 bits, ids 2 and 3 3 bits.
PROBS = torch.tensor([0.5, 0.25, 0.125, 0.125])
BITS = {0: 1.0, 1: 2.0, 2: 3.0, 3: 3.0}


class FixedLogits(torch.nn.Module):
    """Predicts the same distribution at every position, and remembers its inputs."""

    def __init__(self, probs):
        super().__init__()
        self.logits = probs.log()
        self.inputs = []

    def forward(self, x):
        self.inputs.append(x.clone())
        return self.logits.expand(*x.shape, -1)


def test_bits_per_char_and_perplexity_from_a_known_cross_entropy():
    tokens = np.array([0, 0, 1, 2, 3, 0, 1, 2, 3], dtype=np.uint8)  # targets: tokens[1:]
    nll, n = evaluate_nll(FixedLogits(PROBS), tokens, seq_len=4, batch_size=1)
    assert n == 8 == eval_target_count(len(tokens), seq_len=4)
    bits = sum(BITS[int(t)] for t in tokens[1:]) / 8  # (1 + 2 + 3 + 3) * 2 / 8 = 2.25
    assert bits == 2.25
    assert nll == pytest.approx(bits * math.log(2), rel=1e-6)  # 1.5596 nats
    rep = report(nll, "bpc")
    assert rep["bpc"] == pytest.approx(2.25, rel=1e-6) and set(rep) == {"nll", "bpc"}
    rep = report(nll, "ppl")
    assert rep["ppl"] == pytest.approx(2 ** 2.25, rel=1e-6)  # 4.7568
    uniform, _ = evaluate_nll(FixedLogits(torch.full((256,), 1 / 256)), tokens, seq_len=4, batch_size=3)
    assert report(uniform, "bpc")["bpc"] == pytest.approx(8.0, rel=1e-6)  # a uniform byte: 8 bits
    assert report(uniform, "ppl")["ppl"] == pytest.approx(256.0, rel=1e-5)


def test_bits_per_dim_counts_every_value_of_every_image():
    images = np.array([1, 2, 3, 0, 3, 2, 1, 0], dtype=np.uint8)  # two "images" of 4 values
    model = FixedLogits(PROBS)
    nll, n = evaluate_nll(model, images, seq_len=4, batch_size=2, example_length=4)
    assert n == 8  # the first value of each image is predicted too, from the start token
    assert model.inputs[0].tolist() == [[0, 1, 2, 3], [0, 3, 2, 1]]
    assert report(nll, "bpd")["bpd"] == pytest.approx((9 + 9) / 8, rel=1e-6)  # 2.25


def test_word_perplexity_only_for_the_whole_split():
    nll = 2.25 * math.log(2)
    split = {"tokens": 9, "words": 3}  # 3 tokens per word: 6.75 bits per word
    whole = report(nll, "ppl", split, whole_split=True)
    assert whole["word_ppl"] == pytest.approx(2 ** 6.75, rel=1e-9)  # 107.63
    assert "word_ppl_estimate" not in whole
    part = report(nll, "ppl", split)  # a caller that does not say gets the labelled estimate
    assert "word_ppl" not in part and part["word_ppl_estimate"] == pytest.approx(2 ** 6.75, rel=1e-9)
    assert "word_ppl" not in report(nll, "ppl", {"tokens": 9})  # no word count: no word-level number


def test_validation_during_training_labels_word_perplexity_by_coverage(tmp_path):
    """train's periodic validation reports word_ppl only when it covered the whole split."""
    import json

    from routeformer.training import train
    from routeformer.training.metrics import read_metrics

    from .helpers import prepared, tiny_config

    data = prepared(tmp_path)
    meta = json.loads((data / "meta.json").read_text())
    meta["metric"] = "ppl"  # as PG-19's: tokens with the split's word count
    for info in meta["splits"].values():
        info["words"] = max(1, info["tokens"] // 4)
    (data / "meta.json").write_text(json.dumps(meta))
    for eval_tokens, key in (("0", "word_ppl"), ("64", "word_ppl_estimate")):
        run = tmp_path / f"run{eval_tokens}"
        train(tiny_config(data, 1, [f"train.eval_tokens={eval_tokens}"]), run, log=lambda s: None)
        (line,) = [r for r in read_metrics(run / "metrics.jsonl") if "eval_loss" in r]
        other = {"word_ppl", "word_ppl_estimate"} - {key}
        assert key in line and not other & set(line), line
