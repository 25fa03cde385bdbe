"""benchmarks/plot_model_step.py draws model_step.py's JSON, and refuses one without timed rows."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("plot_model_step", ROOT / "benchmarks" / "plot_model_step.py")
plot_model_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_model_step)


def _row(assign, mode, ms):
    return {"assign": assign, "mode": mode, "step_ms": ms, "optimizer": "adamw", "preset": "enwik8", "T": 8192,
            "batch": 1, "params_M": 160.8}


def test_draws_every_timed_row(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"device": "GPU", "rows": [_row("topk", "eager", 75.9), _row("topk", "reduce-overhead", 35.7),
                                                         {"mode": "compile", "error": "boom", "assign": "topk"}]}))
    out = tmp_path / "step.png"
    plot_model_step.main([str(run), str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_refuses_runs_without_timed_rows(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"rows": [{"mode": "eager", "error": "boom", "assign": "topk"}]}))
    with pytest.raises(SystemExit, match="no timed rows"):
        plot_model_step.main([str(run), str(tmp_path / "x.png")])
