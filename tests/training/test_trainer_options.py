"""Training options of issue 3 that the resume tests do not reach: centroid updates once per optimizer
step, Adafactor, clipping, precision, torch.compile, TensorBoard and the progress display."""
import contextlib
import io
import sys

import pytest
import torch

from routeformer.model import RoutingTransformerLM
from routeformer.training import train, trainer
from routeformer.training.metrics import read_metrics

from .helpers import prepared, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp("options"))


def _quiet(*args, **kwargs):
    return train(*args, log=lambda s: None, **kwargs)


def test_centroids_update_once_per_optimizer_step_with_all_micro_batches(data, tmp_path, monkeypatch):
    # Per update_centroids call: how many training forwards ran since the previous one, and how many
    # positions the first routing layer's pending k-means statistics hold.
    calls, forwards = [], [0]
    real_update, real_forward = RoutingTransformerLM.update_centroids, RoutingTransformerLM.forward

    def update(self, *args, **kwargs):
        calls.append((forwards[0], float(self.centroid_modules()[0].pending_counts.sum())))
        forwards[0] = 0
        return real_update(self, *args, **kwargs)

    def forward(self, *args, **kwargs):
        forwards[0] += self.training
        return real_forward(self, *args, **kwargs)

    monkeypatch.setattr(RoutingTransformerLM, "update_centroids", update)
    monkeypatch.setattr(RoutingTransformerLM, "forward", forward)
    _quiet(tiny_config(data, 3, ["train.grad_accum=1"]), tmp_path / "one")
    single = calls[:]
    calls.clear()
    _quiet(tiny_config(data, 3, ["train.grad_accum=3"]), tmp_path / "three")
    assert [n for n, _ in single] == [1, 1, 1]
    assert [n for n, _ in calls] == [3, 3, 3]  # one update per optimizer step, after all 3 micro-batches
    assert all(c == 3 * single[0][1] > 0 for _, c in calls)  # holding the statistics of all three


def test_adafactor_trains_and_resumes_exactly(data, tmp_path, monkeypatch):
    from routeformer.training.adafactor import Adafactor  # torch's Adafactor without host syncs

    used = []
    real_step = Adafactor.step

    def step(self, *args, **kwargs):
        used.append((type(self).__name__, isinstance(self, torch.optim.Adafactor)))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(Adafactor, "step", step)
    extra = ["train.optimizer=adafactor", "train.schedule=rsqrt", "train.learning_rate=1e-2",
             "train.checkpoint_every=2"]
    full = _quiet(tiny_config(data, 4, extra), tmp_path / "full")
    assert used == [("Adafactor", True)] * 4
    assert full.losses[-1] < full.losses[0]
    _quiet(tiny_config(data, 2, extra), tmp_path / "split")
    rest = _quiet(None, tmp_path / "split", resume=True, overrides=["train.max_steps=4"])
    assert rest.losses == full.losses[2:]  # exact: Adafactor's factored moments are in the checkpoint


@pytest.mark.parametrize("clip", [0.0, 0.25])
def test_gradient_clipping_follows_grad_clip(data, tmp_path, monkeypatch, clip):
    seen = []
    real_clip = torch.nn.utils.clip_grad_norm_

    def clip_grad_norm_(parameters, max_norm, *args, **kwargs):
        norm = real_clip(parameters, max_norm, *args, **kwargs)
        seen.append((max_norm, float(norm)))
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip_grad_norm_)
    _quiet(tiny_config(data, 2, [f"train.grad_clip={clip}"]), tmp_path / "run")
    if clip == 0:
        assert seen == []
    else:
        assert [m for m, _ in seen] == [clip, clip] and all(n > clip for _, n in seen)  # it did clip


@pytest.mark.filterwarnings("ignore:CUDA is not available")
def test_precision_picks_bf16_autocast_on_cuda_only_by_default():
    assert trainer.autocast_for("auto", torch.device("cpu")) is contextlib.nullcontext
    assert trainer.autocast_for("fp32", torch.device("cuda")) is contextlib.nullcontext
    for precision, device in (("auto", "cuda"), ("bf16", "cuda"), ("bf16", "cpu")):
        ctx = trainer.autocast_for(precision, torch.device(device))()
        assert isinstance(ctx, torch.autocast) and ctx.fast_dtype == torch.bfloat16 and ctx.device == device


def test_bf16_autocast_trains_with_topk_routing(data, tmp_path):
    result = _quiet(tiny_config(data, 1, ["train.precision=bf16"]), tmp_path / "run")
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_compile_option_wraps_the_model_in_torch_compile(data, tmp_path, monkeypatch):
    compiled = []
    real_compile = torch.compile

    def compile_(model, *args, mode=None, **kwargs):
        compiled.append((model, mode))
        return real_compile(model, backend="eager")  # dynamo's tracing without inductor's C++ build

    monkeypatch.setattr(trainer.torch, "compile", compile_)
    eager = _quiet(tiny_config(data, 2), tmp_path / "eager")
    assert compiled == []
    result = _quiet(tiny_config(data, 2, ["train.compile=true"]), tmp_path / "compiled")
    assert len(compiled) == 1 and isinstance(compiled[0][0], RoutingTransformerLM) and compiled[0][1] == "default"
    assert result.losses == pytest.approx(eager.losses, rel=1e-5)
    _quiet(tiny_config(data, 1, ["train.compile=true", "train.compile_mode=reduce-overhead"]), tmp_path / "graphs")
    assert compiled[-1][1] == "reduce-overhead"
    with pytest.raises(ValueError, match="train.compile_mode must be one of"):
        tiny_config(data, 1, ["train.compile_mode=fast"])


def test_tensorboard_mirrors_the_metrics(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    _quiet(tiny_config(data, 2, ["train.tensorboard=true"]), run)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"loss", "lr", "tokens_per_s", "eval_loss", "bpc"} <= tags
    logged = [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(logged, rel=1e-6)


def test_progress_lines_show_loss_tokens_per_second_and_eta(data, tmp_path):
    lines = []
    train(tiny_config(data, 2, ["train.progress=true", "train.log_every=1"]), tmp_path / "run",
          log=lines.append)  # pytest's stderr is no terminal: plain lines, one per log step
    steps = [line for line in lines if line.startswith("step ")]
    assert len(steps) == 2
    for line in steps:
        assert " loss " in line and " tok/s " in line and " eta " in line, line


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_shows_loss_tokens_per_second_and_eta(data, tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    lines = []
    train(tiny_config(data, 3, ["train.progress=true", "train.log_every=1"]), tmp_path / "run",
          log=lines.append)
    bar = terminal.getvalue().split("\r")[-1]
    assert "3/3" in bar and "loss=" in bar and "tok_s=" in bar, bar
    assert "<" in bar  # tqdm's [elapsed<remaining]: the ETA
    assert not [line for line in lines if line.startswith("step ")]  # the bar replaces the plain lines


def test_logged_learning_rate_is_the_one_each_step_used(data, tmp_path, monkeypatch):
    from routeformer.training.optim import lr_multiplier

    used = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append(self.param_groups[0]["lr"])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    config = tiny_config(data, 4, ["train.warmup_steps=3", "train.learning_rate=1e-3"])
    _quiet(config, tmp_path / "run")
    logged = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert logged == used == [1e-3 * lr_multiplier(s, config.train) for s in range(4)]
    assert logged[0] == pytest.approx(1e-3 / 3)  # the first update: one third of the way up the warm-up
