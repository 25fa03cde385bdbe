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

from .helpers import TINY, prepared


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
