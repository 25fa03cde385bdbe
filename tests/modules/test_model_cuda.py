"""Whole model on CUDA: the Triton backend equals the reference backend, outputs and gradients.

Skipped without a GPU (under the Triton interpreter a whole model is too slow for the suite).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from routeformer import ModelConfig, RoutingTransformerLM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _run(backend: str, assign: str, causal: bool, dtype: torch.dtype, tokens: torch.Tensor):
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=256, dim=128, depth=2, heads=4, query_shape=32, memory_flange=32, causal=causal,
                      sparsity_cluster_size=4, sparsity_cluster_attention_window=48, routing_assign=assign,
                      max_relative_distance=40, attention_backend=backend)
    model = RoutingTransformerLM(cfg).cuda().to(dtype).train()
    logits, aux = model(tokens, return_aux_loss=True)
    loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()) + aux
    loss.backward()
    grads = {n: p.grad.float() for n, p in model.named_parameters()}
    pending = [m.pending_counts.clone() for m in model.centroid_modules()]
    return logits.float(), grads, pending


@pytest.mark.parametrize("assign,causal", [("topk", True), ("nearest", True), ("topk", False)])
def test_triton_backend_matches_reference(assign, causal):
    tokens = torch.randint(0, 256, (2, 197), device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    ref_logits, ref_grads, ref_pending = _run("reference", assign, causal, torch.float64, tokens)
    for backend, dtype, tol in (("reference", torch.float32, 1e-3), ("triton", torch.float32, 1e-3)):
        logits, grads, pending = _run(backend, assign, causal, dtype, tokens)
        # Allowed error: a multiple of what plain float32 PyTorch gets against the float64 run.
        torch.testing.assert_close(logits, ref_logits, atol=tol, rtol=tol)
        for name, g in grads.items():
            scale = ref_grads[name].abs().max().clamp_min(1e-6)
            err = (g - ref_grads[name]).abs().max() / scale
            assert err < 2e-2, (backend, name, err.item())
        for a, b in zip(pending, ref_pending):
            assert torch.equal(a.double(), b)


@pytest.mark.parametrize("assign", ["topk", "nearest"])
def test_paper_layout_trains_under_bf16_autocast(assign):
    """The paper presets' layout (LayerNormed shared q/k, Shaw tables, geglu, post-LN) under CUDA bf16
    autocast, as the trainer runs it: there LayerNorm(q) is float32 while v is bf16. The Triton backend
    gives the reference backend's loss and gradients, and torch.compile (inductor) gives eager's loss."""
    tokens = torch.randint(0, 256, (1, 1500), device="cuda", generator=torch.Generator("cuda").manual_seed(2))

    def run(backend, compile_model=False):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=256, dim=128, depth=2, heads=4, query_shape=128, memory_flange=128,
                          sparsity_cluster_size=4, sparsity_cluster_attention_window=384, routing_assign=assign,
                          share_qk=True, qk_layernorm=True, position="shaw", max_relative_distance=129,
                          norm="post", ffn="geglu", max_seq_len=2048, attention_backend=backend)
        model = RoutingTransformerLM(cfg).cuda().train()
        forward = torch.compile(model) if compile_model else model
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, aux = forward(tokens, return_aux_loss=True)
        loss = F.cross_entropy(logits.float().flatten(0, 1), tokens.flatten()) + aux.float()
        loss.backward()
        return loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}

    ref_loss, ref_grads = run("reference")
    loss, grads = run("triton")
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
    for name, g in grads.items():
        err = (g - ref_grads[name]).abs().max() / ref_grads[name].abs().max().clamp_min(1e-6)
        assert err < 0.1, (name, err.item())  # bf16 activations: a few per cent of the largest entry
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled_loss, _ = run("triton", compile_model=True)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    torch.testing.assert_close(compiled_loss, loss, atol=2e-2, rtol=2e-2)
