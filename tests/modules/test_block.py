"""Transformer block: pre-/post-LN wiring, relu/geglu FFN formulas, dropout options (float64)."""
from __future__ import annotations

import pytest
import torch

from routeformer import ModelConfig, RoutingTransformerLM
from routeformer.modules import FeedForward, TransformerBlock


def _layer_norm(x, weight, bias, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def _randomize_norms(module):
    # Non-trivial LayerNorm affine parameters, so a swapped or missing norm shows up.
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm):
                m.weight.normal_(1.0, 0.3)
                m.bias.normal_(0.0, 0.3)


@pytest.mark.parametrize("kind", ["relu", "geglu"])
def test_feed_forward_formula(kind):
    torch.manual_seed(0)
    ffn = FeedForward(12, kind, 2.5, dropout=0.0).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    if kind == "relu":
        h = torch.clamp_min(x @ ffn.w1.weight.T + ffn.w1.bias, 0.0)
        expected = h @ ffn.out.weight.T + ffn.out.bias
    else:
        a = x @ ffn.w1.weight.T
        gelu = 0.5 * a * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (a + 0.044715 * a ** 3)))
        expected = (gelu * (x @ ffn.w2.weight.T)) @ ffn.out.weight.T
        assert ffn.w1.bias is None and ffn.w2.bias is None and ffn.out.bias is None
    assert ffn.w1.weight.shape == (30, 12)  # hidden = round(2.5 * 12)
    torch.testing.assert_close(ffn(x), expected)


@pytest.mark.parametrize("norm", ["pre", "post"])
def test_block_wiring(norm):
    torch.manual_seed(1)
    cfg = ModelConfig(vocab_size=16, dim=16, depth=1, heads=2, query_shape=4, memory_flange=4,
                      sparsity_cluster_size=2, sparsity_cluster_attention_window=4, max_relative_distance=5,
                      norm=norm, attention_backend="reference")
    block = TransformerBlock(cfg, 0).double().eval()
    _randomize_norms(block)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    n1, n2 = block.attn_norm, block.ffn_norm
    if norm == "pre":  # x + f(LN(x)) per sublayer
        h = x + block.attn(_layer_norm(x, n1.weight, n1.bias))[0]
        expected = h + block.ffn(_layer_norm(h, n2.weight, n2.bias))
    else:  # LN(x + f(x)) per sublayer
        h = _layer_norm(x + block.attn(x)[0], n1.weight, n1.bias)
        expected = _layer_norm(h + block.ffn(h), n2.weight, n2.bias)
    out, aux = block(x)
    assert aux is None
    torch.testing.assert_close(out, expected)


def test_model_final_norm_only_for_pre_ln():
    kw = dict(vocab_size=16, dim=16, depth=1, heads=2)
    assert isinstance(RoutingTransformerLM(ModelConfig(**kw)).norm, torch.nn.LayerNorm)
    assert isinstance(RoutingTransformerLM(ModelConfig(**kw, norm="post")).norm, torch.nn.Identity)


def _lm(**kw):
    torch.manual_seed(2)
    base = dict(vocab_size=32, dim=16, depth=2, heads=2, query_shape=4, memory_flange=4, sparsity_cluster_size=2,
                sparsity_cluster_attention_window=4, max_relative_distance=5)
    return RoutingTransformerLM(ModelConfig(**{**base, **kw}))


@pytest.mark.parametrize("kw", [dict(dropout=0.3), dict(embedding_dropout=0.3)])
def test_dropout_acts_in_train_mode_only(kw):
    tokens = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(3))
    plain, dropped = _lm(), _lm(**kw)
    for a, b in zip(plain.state_dict().values(), dropped.state_dict().values()):
        assert torch.equal(a, b)  # dropout adds no weights and draws nothing at init
    plain.eval(), dropped.eval()
    torch.testing.assert_close(dropped(tokens), plain(tokens), rtol=0, atol=0)
    plain.train(), dropped.train()
    reference = plain(tokens)
    torch.testing.assert_close(plain(tokens), reference, rtol=0, atol=0)  # no dropout: deterministic
    torch.manual_seed(4)
    first = dropped(tokens)
    assert not torch.allclose(first, reference)
    assert not torch.allclose(dropped(tokens), first)  # a fresh mask every call
