"""Resume is bit-for-bit; a writer killed mid-checkpoint loses only the steps since the last one."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from routeformer.presets import get_preset
from routeformer.training import config_from_preset, train
from routeformer.training.checkpoint import list_checkpoints
from routeformer.training.metrics import read_metrics

from .helpers import TINY, prepared, tiny_config


def _config(data, steps, extra=()):
    return config_from_preset(get_preset("tiny"), TINY + [f"data.path={data}", f"train.max_steps={steps}",
                                                          "train.checkpoint_every=3", *extra])


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    # rsqrt does not depend on max_steps, so stopping at 3 and extending to 6 is the same schedule.
    data = prepared(tmp_path)
    full = train(_config(data, 6, ["train.schedule=rsqrt"]), tmp_path / "full", log=lambda s: None)
    assert full.steps == [1, 2, 3, 4, 5, 6]
    first = train(_config(data, 3, ["train.schedule=rsqrt"]), tmp_path / "split", log=lambda s: None)
    second = train(None, tmp_path / "split", resume=True, overrides=["train.max_steps=6"], log=lambda s: None)
    assert second.steps == [4, 5, 6]
    assert first.losses + second.losses == full.losses  # exact, not approximate
    logged = [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl") if "loss" in r]
    assert logged == full.losses


KILLER = textwrap.dedent("""
    import sys, time
    import routeformer.training.checkpoint as ckpt
    from routeformer.presets import get_preset
    from routeformer.training import config_from_preset, train
    real_save = ckpt.torch.save
    calls = []
    def slow_save(obj, path, *a, **k):
        real_save(obj, path, *a, **k)
        calls.append(path)
        if len(calls) == 3:  # second checkpoint, optimizer.pt written, rng.pt and rename still to come
            print("WRITING", flush=True)
            time.sleep(60)
    ckpt.torch.save = slow_save
    overrides = sys.argv[3:]
    train(config_from_preset(get_preset("tiny"), overrides), sys.argv[1], log=lambda s: None)
""")


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    data = prepared(tmp_path)
    run = tmp_path / "run"
    overrides = TINY + [f"data.path={data}", "train.max_steps=6", "train.checkpoint_every=3"]
    proc = subprocess.Popen([sys.executable, "-c", KILLER, str(run), "x", *overrides],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        line = ""
        while time.time() < deadline and "WRITING" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                pytest.fail("trainer exited early: " + proc.stderr.read()[-2000:])
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert [step for step, _ in list_checkpoints(run)] == [3]
    assert (run / "checkpoints" / "step_000006.tmp").exists()  # the torn write, never renamed
    resumed = train(None, run, resume=True, log=lambda s: None)
    assert resumed.steps == [4, 5, 6]
    full = train(_config(data, 6), tmp_path / "full", log=lambda s: None)
    assert resumed.losses == full.losses[3:]
    assert [step for step, _ in list_checkpoints(run)] == [3, 6]
    assert not list((run / "checkpoints").glob("*.tmp"))
    state = json.loads((run / "checkpoints" / "step_000006" / "state.json").read_text())
    assert state["step"] == 6



def _quiet(*args, **kwargs):
    return train(*args, log=lambda s: None, **kwargs)


def test_resume_with_grad_accum_gives_the_same_losses(tmp_path):
    # Each optimizer step draws grad_accum micro-batches: the saved sampler state must count all of them.
    # log_every=3 also leaves unlogged steps pending at the checkpoint (step 2).
    data = prepared(tmp_path)
    extra = ["train.grad_accum=3", "train.checkpoint_every=2", "train.log_every=3", "train.schedule=rsqrt"]
    full = _quiet(tiny_config(data, 4, extra), tmp_path / "full")
    first = _quiet(tiny_config(data, 2, extra), tmp_path / "split")
    second = _quiet(None, tmp_path / "split", resume=True, overrides=["train.max_steps=4"])
    assert first.steps + second.steps == full.steps == [1, 2, 3, 4]
    assert first.losses + second.losses == full.losses  # exact, not approximate


def test_time_budget_stop_writes_a_checkpoint_and_resumes_exactly(tmp_path):
    # A budget of 1 ns runs out during the first step, whatever the machine: the run stops after it.
    data = prepared(tmp_path)
    full = _quiet(tiny_config(data, 4, ["train.checkpoint_every=3"]), tmp_path / "full")
    logged = []
    stopped = train(tiny_config(data, 4, ["train.checkpoint_every=3", "train.time_budget_s=1e-9"]),
                    tmp_path / "budget", log=logged.append)
    assert stopped.steps == [1] and stopped.final_step == 1
    assert any("time budget" in line for line in logged)
    assert [step for step, _ in list_checkpoints(tmp_path / "budget")] == [1]  # not a multiple of 3: the stop
    rest = _quiet(None, tmp_path / "budget", resume=True, overrides=["train.time_budget_s=0"])
    assert rest.steps == [2, 3, 4]
    assert stopped.losses + rest.losses == full.losses  # same max_steps, so the same cosine schedule
    assert [step for step, _ in list_checkpoints(tmp_path / "budget")] == [1, 3, 4]


def test_keep_checkpoints_keeps_exactly_the_newest_n(tmp_path, monkeypatch):
    import routeformer.training.checkpoint as ckpt

    data = prepared(tmp_path)
    seen = []
    real_save = ckpt.save_checkpoint

    def save(run_dir, **kwargs):
        path = real_save(run_dir, **kwargs)
        seen.append([step for step, _ in list_checkpoints(run_dir)])
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", save)
    _quiet(tiny_config(data, 5, ["train.checkpoint_every=1", "train.keep_checkpoints=2"]), tmp_path / "run")
    assert seen == [[1], [1, 2], [2, 3], [3, 4], [4, 5]]
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_000004", "step_000005"]  # no debris beside them either
    seen.clear()
    _quiet(None, tmp_path / "run", resume=True, overrides=["train.max_steps=7", "train.keep_checkpoints=3"])
    assert seen == [[4, 5, 6], [5, 6, 7]]


def test_resume_uses_the_new_learning_rate(tmp_path, monkeypatch):
    # Loading optimizer state also loads the old hyperparameters; --set train.learning_rate (the fix for
    # a loss that became NaN) must still take effect.
    import torch

    from routeformer.training.checkpoint import load_training_state

    used = []
    real_step = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        used.append([(g["lr"], g["weight_decay"]) for g in self.param_groups])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    data = prepared(tmp_path)
    extra = ["train.schedule=constant", "train.learning_rate=1e-3", "train.weight_decay=0.1",
             "train.checkpoint_every=2"]
    _quiet(tiny_config(data, 2, extra), tmp_path / "run")
    resumed = _quiet(None, tmp_path / "run", resume=True,
                     overrides=["train.max_steps=3", "train.learning_rate=1e-4", "train.weight_decay=0"])
    assert resumed.steps == [3]
    # (decay group, no-decay group) per update; warm-up over 2 steps, then the new rate and decay
    assert used == [[(5e-4, 0.1), (5e-4, 0.0)], [(1e-3, 0.1), (1e-3, 0.0)], [(1e-4, 0.0), (1e-4, 0.0)]]
    saved, _ = load_training_state(tmp_path / "run" / "checkpoints" / "step_000003")
    assert [g["initial_lr"] for g in saved["optimizer"]["param_groups"]] == [1e-4, 1e-4]
    assert saved["scheduler"]["base_lrs"] == [1e-4, 1e-4]


def test_resume_with_a_changed_model_says_to_drop_the_override_not_to_delete(tmp_path):
    data = prepared(tmp_path)
    _quiet(tiny_config(data, 2, ["train.checkpoint_every=2"]), tmp_path / "run")
    before = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    with pytest.raises(ValueError) as err:
        _quiet(None, tmp_path / "run", resume=True, overrides=["train.max_steps=3", "model.dim=64"])
    message = str(err.value)
    assert "model.dim 32 -> 64" in message and "another --out" in message and "drop" in message
    assert "delete" not in message  # the checkpoint is valid
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == before
    # A change the weights still fit (dropout) resumes, and says what changed.
    logged = []
    resumed = train(None, tmp_path / "run", resume=True, overrides=["train.max_steps=3", "model.dropout=0"],
                    log=logged.append)
    assert resumed.steps == [3] and any("model.dropout 0.1 -> 0.0" in line for line in logged)
