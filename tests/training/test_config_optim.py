import math

import pytest

from routeformer.presets import get_preset
from routeformer.training.config import TrainConfig, apply_overrides, config_from_preset
from routeformer.training.optim import lr_multiplier


def test_overrides_are_parsed_by_field_type():
    cfg = config_from_preset(get_preset("tiny"), [
        "train.learning_rate=3e-4", "model.depth=2", "max_steps=1e3", "model.causal=false",
        "model.routing_assign=topk", "adam_betas=0.8,0.95", "model.head_dim=none", "data.path=/x"])
    assert cfg.train.learning_rate == 3e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.model.depth == 2 and cfg.train.max_steps == 1000
    assert cfg.model.causal is False and cfg.model.share_qk is False  # derived field follows causal
    assert cfg.train.adam_betas == (0.8, 0.95)
    assert cfg.data.path == "/x"


def test_derived_fields_follow_their_inputs_unless_set():
    base = config_from_preset(get_preset("tiny"))
    assert base.model.head_dim == base.model.dim // base.model.heads
    wider = apply_overrides(base, ["model.dim=256"])
    assert wider.model.head_dim == 256 // base.model.heads
    pinned = apply_overrides(base, ["model.dim=256", "model.head_dim=16"])
    assert pinned.model.head_dim == 16


@pytest.mark.parametrize("item, fragment", [
    ("train.lerning_rate=1", "did you mean train.learning_rate"),
    ("dropuot=0.1", "did you mean"),
    ("max_steps=2.5", "integer"),
    ("model.causal=maybe", "true/false"),
    ("train.schedule=linear", "schedule must be one of"),
    ("learning_rate", "expected key=value"),
    ("train.batch_size=0", "batch_size must be >= 1"),
])
def test_bad_overrides_name_the_problem(item, fragment):
    with pytest.raises(ValueError, match=fragment):
        config_from_preset(get_preset("tiny"), [item])


def test_ambiguous_bare_key_is_an_error(monkeypatch):
    from routeformer.training import config as config_mod

    import dataclasses

    @dataclasses.dataclass
    class Clash:
        dropout: float = 0.0

    monkeypatch.setitem(config_mod.SECTIONS, "data", Clash)
    with pytest.raises(ValueError, match="ambiguous"):
        config_mod.resolve_key("dropout")


def test_schedules_match_their_formulas():
    rs = TrainConfig(schedule="rsqrt", warmup_steps=10, learning_rate=1.0)
    assert lr_multiplier(0, rs) == pytest.approx(0.1)
    assert lr_multiplier(9, rs) == pytest.approx(1.0)
    assert lr_multiplier(39, rs) == pytest.approx(math.sqrt(10 / 40))
    cos = TrainConfig(schedule="cosine", warmup_steps=0, max_steps=100, min_lr_ratio=0.1)
    assert lr_multiplier(49, cos) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_multiplier(99, cos) == pytest.approx(0.1)
    const = TrainConfig(schedule="constant", warmup_steps=4)
    assert [lr_multiplier(s, const) for s in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_adamw_is_fused_exactly_when_every_parameter_is_on_cuda():
    import torch

    from routeformer.training.optim import build_optimizer

    cfg = TrainConfig(optimizer="adamw")
    cpu = build_optimizer(torch.nn.Linear(4, 4), cfg)
    assert not cpu.param_groups[0].get("fused")
    if torch.cuda.is_available():
        assert build_optimizer(torch.nn.Linear(4, 4).cuda(), cfg).param_groups[0]["fused"] is True
