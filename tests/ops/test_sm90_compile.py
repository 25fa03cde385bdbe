"""Every Triton kernel the GPU path launches compiles for sm_90 (H100 / H200), checked on a CPU machine.

benchmarks/sm90_resources.py records the launches of the benchmark setting (routing topk and nearest
with shared and separate keys, local attention with and without Shaw tables, forward and backward)
from the real launchers on meta tensors, and compiles each with the installed Triton and ptxas. The
interpreter tests check what the kernels compute; this checks that the GPU compiler takes them at
the tile sizes the GPU uses, which the interpreter never sees.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_every_gpu_launch_compiles_for_sm90(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    out = tmp_path / "sm90.json"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "sm90_resources.py"), "--T", "65536",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=540)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["failures"] == []
    kernels = {(r["module"], r["kernel"]) for r in report["rows"]}
    for name in ("_scores_kernel", "_select_rows_kernel", "_threshold_select_kernel", "_fwd_kernel",
                 "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_combine_kernel", "_count_below_kernel", "_membership_kernel",
                 "_entry_counts_kernel", "_entry_perm_kernel",
                 "_tile_entry_ranges_kernel", "_nearest_slots_kernel"):
        assert ("routing", name) in kernels, name
    for name in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        assert ("local", name) in kernels, name
    for r in report["rows"]:
        assert 0 < r["regs"] <= 255 and r["shared_bytes"] <= 227 * 1024, r  # an H100 block's limits
        if r["module"] == "routing" and r["kernel"] in ("_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
            assert r["loops"] and min(r["loops"]) > 50, r  # the slot / entry loops were found in the SASS
