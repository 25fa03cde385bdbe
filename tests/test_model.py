"""RoutingTransformerLM: shapes at any length, causality, encoder use, input checks, learning."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import routeformer
from routeformer import ModelConfig, RoutingTransformerLM


def _model(**kw) -> RoutingTransformerLM:
    torch.manual_seed(0)
    return RoutingTransformerLM(ModelConfig(**kw))


def _tokens(B, T, V=256, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def test_public_api():
    for name in ("ModelConfig", "RoutingTransformerLM", "presets", "get_preset", "PRESETS"):
        assert name in routeformer.__all__ and hasattr(routeformer, name)


@pytest.mark.parametrize("T", [1, 37, 512])
def test_small_default_model_accepts_any_length(T):
    model = _model(vocab_size=256, dim=64, depth=2, heads=4)
    logits, aux = model(_tokens(2, T), return_aux_loss=True)
    assert logits.shape == (2, T, 256) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all() and aux.dim() == 0 and aux > 0
    assert model(_tokens(2, T)).shape == (2, T, 256)


@pytest.mark.parametrize("position", ["shaw", "rotary", "none"])
@pytest.mark.parametrize("norm,ffn", [("pre", "relu"), ("post", "geglu")])
def test_causal_nearest_model_never_looks_ahead(position, norm, ffn):
    """Changing tokens t+1.. never changes logits at <= t (the whole model with nearest routing)."""
    model = _model(vocab_size=64, dim=32, depth=2, heads=4, query_shape=5, memory_flange=5, sparsity_cluster_size=3,
                   sparsity_cluster_attention_window=4, routing_assign="nearest", position=position, norm=norm,
                   ffn=ffn, max_relative_distance=8).double().eval()
    a = _tokens(2, 23, V=64, seed=1)
    base = model(a)
    for t in (0, 6, 15):
        b = a.clone()
        b[:, t + 1 :] = _tokens(2, 22 - t, V=64, seed=2 + t)
        assert not torch.equal(a, b)
        torch.testing.assert_close(model(b)[:, : t + 1], base[:, : t + 1], atol=1e-12, rtol=0)
        assert not torch.allclose(model(b)[:, t + 1 :], base[:, t + 1 :])  # the test can see a change


def test_bidirectional_encoder_sees_both_sides():
    model = _model(vocab_size=64, dim=32, depth=2, heads=4, causal=False, query_shape=4, memory_flange=4,
                   sparsity_cluster_size=2, sparsity_cluster_attention_window=8).eval()
    assert model.config.share_qk is False and model.config.routing_assign == "topk"
    a = _tokens(1, 21, V=64)
    b = a.clone()
    b[0, -1] = (a[0, -1] + 1) % 64
    la, lb = model(a), model(b)
    assert la.shape == (1, 21, 64)
    assert not torch.allclose(la[:, 18], lb[:, 18])  # position 18 sees the last token


def test_train_step_with_aux_loss_reaches_all_parameters():
    model = _model(vocab_size=64, dim=32, depth=2, heads=4, query_shape=4, memory_flange=4,
                   sparsity_cluster_size=2, sparsity_cluster_attention_window=4).train()
    tokens = _tokens(2, 16, V=64)
    logits, aux = model(tokens, return_aux_loss=True)
    (F.cross_entropy(logits.flatten(0, 1), tokens.flatten()) + aux).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []


def test_aux_loss_is_weighted_sum_over_layers():
    kw = dict(vocab_size=64, dim=32, depth=3, heads=4, query_shape=4, memory_flange=4, sparsity_cluster_size=2,
              sparsity_cluster_attention_window=4)
    tokens = _tokens(2, 16, V=64)
    _, aux1 = _model(**kw, commitment_weight=1.0).eval()(tokens, return_aux_loss=True)
    _, aux2 = _model(**kw, commitment_weight=0.25).eval()(tokens, return_aux_loss=True)
    torch.testing.assert_close(aux2, 0.25 * aux1)
    # Each of 3 layers contributes the mean squared distance of LayerNorm(q) (norm^2 = D) to a unit
    # centroid: (D - 2 q.c + 1) per layer, so the sum lies well inside (3 * (sqrt(D) - 1)^2, 3 * (sqrt(D) + 1)^2).
    D = 8
    assert 3 * (D ** 0.5 - 1) ** 2 < aux1 < 3 * (D ** 0.5 + 1) ** 2


def test_all_local_model_has_no_centroids_and_zero_aux():
    model = _model(vocab_size=64, dim=32, depth=2, heads=4, local_num_heads=4)
    assert model.centroid_modules() == []
    _, aux = model(_tokens(1, 9, V=64), return_aux_loss=True)
    assert aux.item() == 0.0
    assert model.update_centroids() == 0


def test_skip_first_layers_are_all_local():
    model = _model(vocab_size=64, dim=32, depth=3, heads=4, local_num_heads=1, sparsity_skip_first=2)
    assert [blk.attn.num_local for blk in model.layers] == [4, 4, 1]
    assert len(model.centroid_modules()) == 1


def test_backend_is_passed_to_the_ops(monkeypatch):
    from routeformer.modules import attention as attention_mod

    seen = []
    for name in ("local_attention", "routing_attention"):
        real = getattr(attention_mod, name)

        def spy(*a, _real=real, **kw):
            seen.append(kw["backend"])
            return _real(*a, **{**kw, "backend": "reference"})

        monkeypatch.setattr(attention_mod, name, spy)
    # "triton" is only recorded by the spy, which then runs the reference.
    model = _model(vocab_size=64, dim=32, depth=1, heads=4, attention_backend="triton")
    model(_tokens(1, 5, V=64))
    assert seen == ["triton", "triton"]


def test_tied_embeddings_and_parameter_count():
    tied = _model(vocab_size=64, dim=32, depth=1, heads=4)
    untied = _model(vocab_size=64, dim=32, depth=1, heads=4, tie_embeddings=False)
    assert tied.head.weight is tied.embed.weight
    assert untied.num_parameters() - tied.num_parameters() == 64 * 32
    assert tied.num_parameters() == sum(p.numel() for p in tied.parameters())
    assert tied.num_parameters(exclude_embeddings=True) == tied.num_parameters() - 64 * 32


def test_rotary_needs_even_head_dim():
    with pytest.raises(ValueError, match="even head_dim"):
        RoutingTransformerLM(ModelConfig(vocab_size=16, dim=12, heads=4, depth=1, position="rotary"))


def test_bad_inputs_raise_clear_errors():
    model = _model(vocab_size=50, dim=32, depth=1, heads=4, max_seq_len=40)
    with pytest.raises(TypeError, match="ModelConfig"):
        RoutingTransformerLM({"vocab_size": 50})
    with pytest.raises(TypeError, match="torch.Tensor"):
        model([[1, 2, 3]])
    with pytest.raises(TypeError, match="int64"):
        model(torch.rand(1, 5))
    with pytest.raises(ValueError, match=r"2 dims \(B, T\)"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"2 dims \(B, T\)"):
        model(torch.zeros(1, 2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one"):
        model(torch.zeros(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="max_seq_len=40"):
        model(torch.zeros(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match=r"vocab_size=50\).*\[0, 50\]"):
        model(torch.tensor([[0, 50]]))
    with pytest.raises(ValueError, match=r"\[-1, 3\]"):
        model(torch.tensor([[3, -1]]))
    assert model(torch.tensor([[0, 49]], dtype=torch.int32)).shape == (1, 2, 50)


def test_overfits_one_small_batch():
    model = _model(vocab_size=32, dim=64, depth=2, heads=4, query_shape=16, memory_flange=16,
                   sparsity_cluster_size=2, sparsity_cluster_attention_window=32, max_relative_distance=32,
                   max_seq_len=65).train()
    data = _tokens(2, 65, V=32, seed=7)
    x, y = data[:, :-1], data[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        logits, aux = model(x, return_aux_loss=True)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        opt.zero_grad()
        (loss + aux).backward()
        opt.step()
        model.update_centroids()
        first = loss.item() if first is None else first
        if loss.item() < 0.2:
            break
    assert first > 3.0 and loss.item() < 0.5, (first, loss.item())


def test_torch_compile_matches_eager_including_centroid_statistics():
    """Buffer mutation (k-means statistics) must survive compilation; aot_eager traces like inductor."""
    kw = dict(vocab_size=64, dim=32, depth=2, heads=4, query_shape=8, memory_flange=8, sparsity_cluster_size=2,
              sparsity_cluster_attention_window=8, attention_backend="reference")
    tokens = _tokens(2, 33, V=64)
    eager, compiled = _model(**kw).train(), _model(**kw).train()
    fn = torch.compile(compiled, backend="aot_eager")
    for _ in range(2):
        (le, ae), (lc, ac) = eager(tokens, return_aux_loss=True), fn(tokens, return_aux_loss=True)
    torch.testing.assert_close(lc, le)
    torch.testing.assert_close(ac, ae)
    for a, b in zip(eager.centroid_modules(), compiled.centroid_modules()):
        torch.testing.assert_close(b.pending_sums, a.pending_sums)
        assert b.pending_counts.sum() == 2 * 2 * 33 * 2  # forwards * B * T * routing heads


def test_qk_layernorm_model_trains_under_autocast_with_float32_layernorm(monkeypatch):
    """CUDA autocast returns float32 from F.layer_norm whatever its input (CPU autocast keeps bf16), so
    there a qk_layernorm model hands the routing op float32 q and bf16 v; that once stopped GPU training
    of the paper presets at step 1 (`v has dtype torch.bfloat16 but q has torch.float32`). Here the
    module's layer_norm is made to return float32 as on CUDA."""
    import types

    from routeformer.modules import attention as attention_mod

    real = attention_mod.F
    monkeypatch.setattr(attention_mod, "F", types.SimpleNamespace(
        layer_norm=lambda x, shape: real.layer_norm(x.float(), shape)))
    model = _model(vocab_size=64, dim=32, depth=2, heads=4, query_shape=8, memory_flange=8, sparsity_cluster_size=2,
                   sparsity_cluster_attention_window=8, share_qk=True, qk_layernorm=True).train()
    tokens = _tokens(1, 40, V=64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, aux = model(tokens, return_aux_loss=True)
    assert logits.dtype == torch.bfloat16
    (F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()) + aux.float()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)
