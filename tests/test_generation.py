import pytest
import torch

from routeformer import config as cfg_mod
from routeformer.generation import filter_logits, sample
from routeformer.model import RoutingTransformerLM


def _nucleus_brute_force(logits, p):
    probs = torch.softmax(logits.double(), -1).tolist()
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    kept, mass = set(), 0.0
    for i in order:
        if mass >= p:
            break
        kept.add(i)
        mass += probs[i]
    return kept


def test_nucleus_keeps_the_smallest_set_reaching_p():
    g = torch.Generator().manual_seed(0)
    for p in (0.1, 0.5, 0.9, 0.99):
        logits = torch.randn(3, 50, generator=g) * 2
        out = filter_logits(logits, top_p=p)
        for row, row_out in zip(logits, out):
            assert {i for i in range(50) if row_out[i] > float("-inf")} == _nucleus_brute_force(row, p)


def test_top_k_keeps_k_largest():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(1))
    out = filter_logits(logits, top_k=5)
    for row, row_out in zip(logits, out):
        assert set(torch.nonzero(row_out > float("-inf")).flatten().tolist()) == set(row.topk(5).indices.tolist())


def test_top_k_ties_keep_the_lowest_ids():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0, 0.0],
                           [2.0, 2.0, 2.0, 2.0, 2.0]])
    kept = filter_logits(logits, top_k=2) > float("-inf")
    assert kept.tolist() == [[False, True, True, False, False], [True, True, False, False, False]]
    # top_k=1 agrees with greedy decoding (argmax returns the first maximum) on ties.
    assert torch.equal(filter_logits(logits, top_k=1).argmax(-1), logits.argmax(-1))
    assert (filter_logits(logits, top_k=1) > float("-inf")).sum(-1).tolist() == [1, 1]


def _model(routing_assign="topk"):
    torch.manual_seed(0)
    cfg = cfg_mod.ModelConfig(vocab_size=40, dim=32, depth=2, heads=2, max_seq_len=32, query_shape=8,
                              memory_flange=8, sparsity_cluster_size=2, sparsity_cluster_attention_window=8,
                              max_relative_distance=17, routing_assign=routing_assign)
    return RoutingTransformerLM(cfg).eval()


def test_greedy_equals_argmax_of_one_forward_over_the_output():
    # "nearest" routing is strictly causal, so one teacher-forced forward over the finished sequence
    # gives at every position the logits the decoding loop saw there (with "topk" the clusters of a
    # longer sequence differ). An independent computation: no loop, one call.
    model = _model("nearest")
    prompt = torch.randint(0, 40, (2, 5), generator=torch.Generator().manual_seed(2))
    out = sample(model, prompt, 12, temperature=0)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    with torch.no_grad():
        predicted = model(out[:, :-1]).argmax(-1)
    assert torch.equal(out[:, 5:], predicted[:, 4:])


def test_tiny_temperature_is_greedy_not_nan():
    model = _model()
    prompt = torch.randint(0, 40, (2, 4), generator=torch.Generator().manual_seed(4))
    greedy = sample(model, prompt, 6, temperature=0)
    for t in (1e-40, 1e-30, 5e-324):
        g = torch.Generator().manual_seed(0)
        assert torch.equal(sample(model, prompt, 6, temperature=t, top_p=0.9, top_k=5, generator=g), greedy)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            sample(model, prompt, 1, temperature=bad)


def test_tiny_nucleus_is_greedy_and_long_outputs_slide_the_window():
    model = _model()
    prompt = torch.randint(0, 40, (1, 30), generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(0)
    a = sample(model, prompt, 5, temperature=1.0, top_p=1e-6, generator=g)
    b = sample(model, prompt, 5, temperature=0)
    assert torch.equal(a, b) and a.shape == (1, 35)  # 35 > max_seq_len: the context is the last 32
