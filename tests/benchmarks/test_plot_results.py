"""benchmarks/plot_results.py draws a committed table (RESULTS.md) or an attention.py JSON."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("plot_results", ROOT / "benchmarks" / "plot_results.py")
plot_results = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(plot_results)


def test_results_md_table_is_read_and_drawn(tmp_path):
    rows, title = plot_results.load_rows(ROOT / "benchmarks" / "RESULTS.md")
    dense = {r["T"]: r["fwdbwd_ms"] for r in rows if r["name"] == "dense SDPA"}
    assert dense[65536] == pytest.approx(35.213) and "UTC" in title
    assert len(dense) == 6  # the first table only (run U); earlier runs repeat T below it
    graph = [r for r in rows if r["name"] == "ours topk (CUDA graph)"]
    assert graph and all(r["fwd_mib"] is None for r in graph)  # '-' cells stay missing, not zero
    plot_results.main([str(ROOT / "benchmarks" / "RESULTS.md"), str(tmp_path / "p.png")])
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_json_rows_and_a_file_without_a_table(tmp_path):
    rows = [{"name": "dense SDPA", "T": 4096, "fwd_ms": 0.1, "fwdbwd_ms": 0.3, "fwd_mib": 4, "fwdbwd_mib": 20},
            {"name": "ours topk", "T": 4096, "error": "OutOfMemoryError"}]
    (tmp_path / "r.json").write_text(json.dumps({"device": "X", "rows": rows}))
    plot_results.main([str(tmp_path / "r.json"), str(tmp_path / "j.png")])
    assert (tmp_path / "j.png").stat().st_size > 0
    (tmp_path / "empty.md").write_text("no table here\n")
    with pytest.raises(ValueError, match="no '| T | variant"):
        plot_results.load_rows(tmp_path / "empty.md")
