"""Checkpoint files on their own: what they hold, how they load, and the errors a bad one gives."""
import json
import random
import re

import numpy as np
import pytest
import torch

import routeformer.training.checkpoint as ckpt
from routeformer.training import trainer
from routeformer.training.config import RunConfig, TrainConfig
from routeformer.training.optim import build_optimizer, build_scheduler

from .helpers import prepared, tiny_config


def _draws() -> list:
    """Draws from every generator capture_rng covers, including the cached second gaussians of
    random.gauss and np.random.randn (part of their states)."""
    return [torch.rand(3).tolist(), np.random.randn(3).tolist(), random.gauss(0, 1), random.random()]


def test_rng_state_loads_with_weights_only_and_restores_every_generator(tmp_path):
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.randn(1), random.gauss(0, 1)  # leave a cached gaussian in both states
    torch.save(ckpt.capture_rng(), tmp_path / "rng.pt")
    expected = _draws()
    state = torch.load(tmp_path / "rng.pt", weights_only=True)  # no pickled numpy/python objects in it
    ckpt.restore_rng(state)
    assert _draws() == expected


def test_rng_state_of_an_older_version_still_restores(tmp_path):
    # Before this layout rng.pt held numpy's get_state() tuple (an ndarray) and python's getstate().
    np.random.seed(5), random.seed(6)
    np.random.randn(1), random.gauss(0, 1)
    torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
               tmp_path / "rng.pt")
    torch.save({"optimizer": {}, "scheduler": {}}, tmp_path / "optimizer.pt")
    expected = _draws()
    _, rng = ckpt.load_training_state(tmp_path)
    ckpt.restore_rng(rng)
    assert _draws() == expected


def _save(run_dir, step=1, optimizer_name="adamw", keep=3):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    cfg = TrainConfig(optimizer=optimizer_name, warmup_steps=1)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step(), scheduler.step()
    state = {"config": RunConfig().to_dict(), "sampler": {"seed": 0, "rank": 0, "world_size": 1, "step": 1},
             "dataset": {}}
    return ckpt.save_checkpoint(run_dir, step=step, model=model, optimizer=optimizer, scheduler=scheduler,
                                state=state, keep=keep)


@pytest.mark.parametrize("optimizer_name", ["adamw", "adafactor"])
def test_training_state_is_read_with_weights_only(tmp_path, monkeypatch, optimizer_name):
    path = _save(tmp_path, optimizer_name=optimizer_name)
    calls = []
    real_load = torch.load

    def load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "load", load)
    opt, rng = ckpt.load_training_state(path)
    assert calls == [True, True]
    assert opt["optimizer"]["state"] and torch.is_tensor(rng["torch"])


@pytest.mark.parametrize("drop", ["step", "config", "sampler", "config.model", "sampler.step"])
def test_state_json_missing_a_key_is_a_clear_error(tmp_path, drop):
    path = _save(tmp_path)
    state = json.loads((path / "state.json").read_text())
    outer, _, inner = drop.partition(".")
    del (state[outer] if inner else state)[inner or outer]
    (path / "state.json").write_text(json.dumps(state))
    message = f"{path / 'state.json'} is corrupt or from an incompatible version: missing key '{drop}'"
    with pytest.raises(ValueError, match=re.escape(message)):
        ckpt.read_state(path)


def test_state_json_with_a_bad_config_names_the_file(tmp_path):
    path = _save(tmp_path)
    state = ckpt.read_state(path)
    state["config"]["train"]["batch_size"] = 0
    with pytest.raises(ValueError, match=re.escape(str(path / "state.json")) + ".*batch_size"):
        ckpt.run_config(path, state)


def test_a_saved_step_is_never_overwritten(tmp_path):
    first = _save(tmp_path, step=1)
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(FileExistsError, match="step_000001 already exists"):
        _save(tmp_path, step=1)
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_000001"]


def test_weights_that_do_not_fit_the_config_are_not_called_corrupt(tmp_path):
    path = _save(tmp_path)
    wider = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8))
    with pytest.raises(ckpt.WeightsMismatchError) as info:
        ckpt.load_weights(wider, path)
    assert "size mismatch" in str(info.value) and "delete" not in str(info.value)
    weights = path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(ValueError, match="corrupt; delete") as info:
        ckpt.load_weights(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4)), path)
    assert not isinstance(info.value, ckpt.WeightsMismatchError)


def test_the_run_directory_holds_what_the_trainer_docstring_lists(tmp_path):
    # Entries listed as "with train.<option>" appear only with that option; every other one always does.
    listed = re.findall(r"^    (\S+?)/?(?:step_\*)?\s{2,}(.*)$", trainer.__doc__.split("RUN_DIR/")[1], re.M)
    always = {name.rstrip("/") for name, text in listed if "with train." not in text}
    data = prepared(tmp_path)
    trainer.train(tiny_config(data, 1), tmp_path / "run", log=lambda s: None)
    assert {p.name for p in (tmp_path / "run").iterdir()} == always
