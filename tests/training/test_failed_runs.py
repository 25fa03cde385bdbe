"""A run that goes wrong: NaN losses stop it before a checkpoint can hold them, and a run that stopped
before its first checkpoint can be started again (but not resumed)."""
import json

import pytest

from routeformer.cli.main import main
from routeformer.training import train
from routeformer.training.checkpoint import list_checkpoints
from routeformer.training.metrics import read_metrics

from .helpers import TINY, poison_loss, prepared, tiny_config


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared(tmp_path_factory.mktemp("failed"))


@pytest.fixture(scope="module")
def clean(data, tmp_path_factory):
    """An uninterrupted 6-step run, checkpoints every 2 steps."""
    return train(tiny_config(data, 6, ["train.checkpoint_every=2"]), tmp_path_factory.mktemp("clean") / "run",
                 log=lambda s: None)


@pytest.mark.parametrize("log_every, kind, error", [
    (1, "nan", "loss became nan at step 3"),  # found at step 3's log line
    (5, "nan", "loss became nan at step 3"),  # found before step 4's checkpoint, not at step 5's log line
    (1, "grad", "weights became non-finite by step 4"),  # finite losses up to 4, NaN weights after it
])
def test_divergence_stops_with_a_clear_error_and_keeps_the_checkpoints(data, clean, tmp_path, monkeypatch,
                                                                       log_every, kind, error):
    run = tmp_path / "run"
    plan = poison_loss(monkeypatch, 3 if kind == "nan" else 4, kind)
    with pytest.raises(FloatingPointError) as info:
        train(tiny_config(data, 6, ["train.checkpoint_every=2", f"train.log_every={log_every}"]), run,
              log=lambda s: None)
    message = str(info.value)
    assert error in message and "train.learning_rate" in message and "step_000002" in message, message
    assert [step for step, _ in list_checkpoints(run)] == [2]  # no checkpoint of a diverged model
    assert not list((run / "checkpoints").glob("*.tmp"))
    # The checkpoint left is the healthy one: resuming from it repeats the uninterrupted run exactly.
    plan["step"] = None
    resumed = train(None, run, resume=True, log=lambda s: None)
    assert resumed.steps == [3, 4, 5, 6] and resumed.losses == clean.losses[2:]


@pytest.mark.parametrize("kind, error", [("nan", FloatingPointError), ("interrupt", KeyboardInterrupt)])
def test_a_run_stopped_before_its_first_checkpoint_starts_afresh_but_does_not_resume(data, clean, tmp_path,
                                                                                     monkeypatch, kind, error):
    run = tmp_path / "run"
    plan = poison_loss(monkeypatch, 1, kind)
    with pytest.raises(error):
        train(tiny_config(data, 6, ["train.checkpoint_every=2", "train.learning_rate=1"]), run, log=lambda s: None)
    assert (run / "config.json").exists() and list_checkpoints(run) == []
    plan["step"] = None
    with pytest.raises(ValueError, match="no checkpoint to resume from.*start it afresh.*without --resume"):
        train(None, run, resume=True, log=lambda s: None)
    logged = []
    again = train(tiny_config(data, 6, ["train.checkpoint_every=2"]), run, log=logged.append)
    assert any("starting it afresh" in line for line in logged), logged
    assert again.losses == clean.losses
    assert json.loads((run / "config.json").read_text())["train"]["learning_rate"] != 1
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [1, 2, 3, 4, 5, 6]
    # Once it has a checkpoint, the directory is a run again: a fresh start is refused.
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny_config(data, 6), run, log=lambda s: None)


def test_cli_restarts_an_interrupted_run_and_explains_resume(data, tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    argv = ["train", "--preset", "tiny", "--data", str(data), "--out", str(run),
            *[arg for item in TINY for arg in ("--set", item)], "--set", "train.max_steps=2"]
    plan = poison_loss(monkeypatch, 2, "interrupt")  # Ctrl-C in step 2, before the checkpoint of step 2
    assert main(argv) == 130
    plan["step"] = None
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "start it afresh" in err and "without --resume" in err, err
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "starting it afresh" in out and "trained" in out
    assert [step for step, _ in list_checkpoints(run)] == [2]
