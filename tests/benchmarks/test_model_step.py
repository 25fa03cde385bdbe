"""benchmarks/model_step.py on the CPU: its rows, its JSON, and its check that modes agree."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("model_step", ROOT / "benchmarks" / "model_step.py")
model_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(model_step)


def test_eager_rows_on_cpu(tmp_path, capsys):
    out = tmp_path / "step.json"
    model_step.main(["--preset", "tiny", "--T", "64", "--device", "cpu", "--steps", "2", "--warmup", "0",
                     "--modes", "eager", "--assign", "topk,nearest", "--optimizer", "preset", "--out", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [(r["assign"], r["mode"]) for r in rows] == [("topk", "eager"), ("nearest", "eager")]
    assert all(r["step_ms"] > 0 and r["first_loss"] > 0 and r["optimizer"] == "adamw" for r in rows)
    assert "tiny, T=64" in capsys.readouterr().out


def test_modes_whose_first_losses_disagree_fail_the_run(tmp_path, monkeypatch):
    real = model_step._run_mode

    def skewed(base, mode, *args):
        row = real(base, "eager", *args)
        row["mode"] = mode
        if mode == "compile":
            row["first_loss"] *= 1.5
        return row

    monkeypatch.setattr(model_step, "_run_mode", skewed)
    with pytest.raises(SystemExit, match="first-step losses disagree: topk compile"):
        model_step.main(["--preset", "tiny", "--T", "64", "--device", "cpu", "--steps", "1", "--warmup", "0",
                         "--modes", "eager,compile", "--assign", "topk"])
