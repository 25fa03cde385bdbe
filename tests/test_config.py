"""ModelConfig: derived defaults, validation messages, dict round trip."""
from __future__ import annotations

import pytest

from routeformer import ModelConfig


def test_derived_defaults():
    cfg = ModelConfig(vocab_size=256, dim=64, depth=2, heads=4)
    assert cfg.head_dim == 16 and cfg.local_num_heads == 2 and cfg.sparsity_cluster_num_heads == 2
    assert cfg.share_qk is True  # causal default
    assert ModelConfig(causal=False).share_qk is False
    assert ModelConfig(dim=30, heads=4, head_dim=8).head_dim == 8


def test_round_trip_through_dict():
    cfg = ModelConfig(vocab_size=100, dim=48, heads=6, local_num_heads=1, position="rotary", norm="post")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs,match", [
    (dict(vocab_size=0), "vocab_size must be a positive int"),
    (dict(depth=2.0), "depth must be a positive int"),
    (dict(heads=True), "heads must be a positive int"),
    (dict(memory_flange=-1), "memory_flange must be a non-negative int"),
    (dict(dim=30, heads=4), "not divisible by heads"),
    (dict(heads=4, local_num_heads=5), r"local_num_heads must be in \[0, heads=4\]"),
    (dict(routing_assign="lsh"), "routing_assign must be one of"),
    (dict(position="alibi"), "position must be one of"),
    (dict(norm="sandwich"), "norm must be one of"),
    (dict(ffn="swiglu"), "ffn must be one of"),
    (dict(centroid_update="sgd"), "centroid_update must be one of"),
    (dict(attention_backend="cuda"), "attention_backend must be one of"),
    (dict(routing_assign="nearest", causal=False), "needs causal=True"),
    (dict(centroid_decay=1.0), r"centroid_decay must be in \[0, 1\)"),
    (dict(head_dim=32.0), "head_dim must be an int or None"),
    (dict(head_dim=0), "head_dim must be a positive int"),
    (dict(local_num_heads="2"), "local_num_heads must be an int or None"),
    (dict(share_qk="yes"), "share_qk must be True, False or None"),
    (dict(causal=1), "causal must be True or False"),
])
def test_invalid_fields_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ModelConfig(**kwargs)


def test_unknown_dict_fields_are_rejected():
    with pytest.raises(ValueError, match=r"unknown ModelConfig fields: \['num_layers'\]"):
        ModelConfig.from_dict({"num_layers": 3})


def test_issue_defaults():
    """The defaults the spec names: Shaw max distance 513, commitment 1e-4, EMA decay 0.999, pre-LN, relu."""
    import inspect

    from routeformer import RoutingTransformerLM
    from routeformer.ops import kmeans

    cfg = ModelConfig()
    assert (cfg.max_relative_distance, cfg.commitment_weight, cfg.centroid_decay) == (513, 1e-4, 0.999)
    assert (cfg.norm, cfg.ffn, cfg.position, cfg.routing_assign, cfg.causal) == ("pre", "relu", "shaw", "topk", True)
    assert cfg.share_centroids is False  # the authors' code: one centroid set per layer
    assert inspect.signature(kmeans.ema_update).parameters["decay"].default == 0.999
    model = RoutingTransformerLM(ModelConfig(vocab_size=16, dim=16, depth=1, heads=2))
    local = model.layers[0].attn.local
    assert local.rel_k.shape == local.rel_v.shape == (2 * 513 + 1, 8)  # separate key and value tables
    assert local.rel_k is not local.rel_v
