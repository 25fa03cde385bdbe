"""Presets: every one is a valid ModelConfig with a cited source; only `tiny` is instantiated."""
from __future__ import annotations

import pytest
import torch

from routeformer import PRESETS, ModelConfig, RoutingTransformerLM, get_preset
from routeformer.presets import DATASETS, TRAIN_KEYS

PAPER = ("cifar10", "wikitext103", "enwik8", "imagenet64", "pg19")
AUTHORS = ("pg19_local8k", "pg19_local_cluster8k", "enwik8_local_cluster8k", "wikitext103_local_cluster4k",
           "cifar10_local_cluster", "imagenet_local_cluster")


def test_required_presets_exist():
    assert set(PAPER) | set(AUTHORS) | {"tiny"} <= set(PRESETS)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_is_valid_data(name):
    preset = get_preset(name)
    assert preset.name == name
    assert isinstance(preset.model, ModelConfig)
    assert ModelConfig.from_dict(preset.model.to_dict()) == preset.model  # passes validation again
    assert preset.dataset in DATASETS
    assert set(preset.train) <= set(TRAIN_KEYS)
    assert preset.train.get("optimizer", "adamw") in ("adamw", "adafactor")
    assert preset.train.get("schedule", "constant") in ("rsqrt", "cosine", "constant")
    assert preset.train.get("seq_len", 1) <= preset.model.max_seq_len
    assert len(preset.source) > 40
    if name != "tiny":
        assert "AUTHORS" in preset.source and ".py" in preset.source


@pytest.mark.parametrize("name,layers,heads,local,clusters,window,dim,ffn_hidden", [
    ("enwik8_local_cluster8k", 12, 8, 4, 16, 512, 1024, 3072),
    ("wikitext103_local_cluster4k", 14, 16, 8, 8, 512, 1024, 3072),
    ("pg19_local_cluster8k", 22, 8, 6, 16, 512, 1032, 4096),
    ("pg19_local8k", 24, 8, 8, 16, 512, 1032, 4096),
    ("cifar10_local_cluster", 12, 8, 4, 6, 512, 1024, 2048),
    ("imagenet_local_cluster", 24, 16, 12, 8, 2048, 1024, 2048),
])
def test_authors_numbers(name, layers, heads, local, clusters, window, dim, ffn_hidden):
    m = get_preset(name).model
    assert (m.depth, m.heads, m.local_num_heads, m.sparsity_cluster_size) == (layers, heads, local, clusters)
    assert (m.sparsity_cluster_attention_window, m.dim, round(m.ffn_mult * m.dim)) == (window, dim, ffn_hidden)


def test_paper_presets_follow_the_authors_release():
    assert get_preset("pg19").model == get_preset("pg19_local_cluster8k").model
    assert get_preset("wikitext103").model.vocab_size == 267_735
    assert get_preset("enwik8").model.vocab_size == 256 and get_preset("enwik8").model.max_seq_len == 8192
    assert get_preset("imagenet64").model.max_seq_len == 64 * 64 * 3


def test_get_preset_returns_a_copy():
    preset = get_preset("tiny")
    preset.model.dim = 1
    preset.train["learning_rate"] = 9.0
    assert PRESETS["tiny"].model.dim == 128 and PRESETS["tiny"].train["learning_rate"] == 1e-3


def test_unknown_preset_lists_close_matches():
    with pytest.raises(ValueError, match="did you mean 'enwik8'"):
        get_preset("enwik9")
    with pytest.raises(TypeError):
        get_preset(3)


def test_tiny_builds_and_runs():
    preset = get_preset("tiny")
    assert preset.train["optimizer"] == "adamw" and preset.model.vocab_size == 256
    torch.manual_seed(0)
    model = RoutingTransformerLM(preset.model)
    assert model.num_parameters() < 2_000_000
    logits = model(torch.randint(0, 256, (1, preset.train["seq_len"])))
    assert logits.shape == (1, preset.train["seq_len"], 256)
