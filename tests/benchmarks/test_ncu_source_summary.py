"""benchmarks/ncu_source_summary.py reads Nsight Compute's source-page CSV (gpu_session.sh ncusrc): loops by
their backward branches, each instruction's share of the kernel's stall samples, and its region."""
from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("ncu_source_summary", ROOT / "benchmarks" / "ncu_source_summary.py")
summary_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summary_mod)

_HEADER = ["Address", "Source", "Warp Stall Sampling (All Samples)", "Warp Stall Sampling (Not-issued Samples)",
           "stall_long_sb", "stall_barrier", "stall_long_sb (Not Issued)"]


def _write(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Kernel Name", "_bwd_dq_kernel"])  # ncu's export starts with the kernel's name
        w.writerow(_HEADER)
        for addr, sass, samples, long_sb, barrier in rows:
            w.writerow([hex(0x1000 + addr), "      " + sass, samples, samples, long_sb, barrier, 0])


def test_loops_regions_and_shares(tmp_path):
    path = tmp_path / "k.csv"
    _write(path, [(0x00, "LDG.E R2, desc[UR4][R2.64]", 10, 10, 0),
                  (0x10, "BAR.SYNC.DEFER_BLOCKING 0x0", 50, 40, 10),         # loop head (target 0x1010)
                  (0x20, "HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], RZ", 20, 0, 20),
                  (0x30, "@!P0 BRA 0x1010", 5, 0, 0),                      # backward branch: loop 0x10-0x30
                  (0x40, "STG.E.128 desc[UR4][R2.64], R8", 15, 15, 0),
                  (0x50, "BRA 0x1060", 0, 0, 0)])                           # a forward branch: no loop
    rows = summary_mod.read(str(path))
    assert [r["addr"] - 0x1000 for r in rows] == [0x00, 0x10, 0x20, 0x30, 0x40, 0x50]
    assert summary_mod.loops(rows) == [(0x1010, 0x1030)]
    text = summary_mod.summary(str(path), top=2)
    lines = text.splitlines()
    assert "loop0 0x10-0x30" in lines[0] and "100 samples" in lines[0]
    assert lines[1].split()[:2] == ["loop0", "75.0%"] and "long_sb 40" in lines[1]
    assert lines[2].split()[:2] == ["outside", "25.0%"]
    top = [line.split() for line in lines[4:]]
    assert [t[:3] for t in top] == [["10", "loop0", "50.0%"], ["20", "loop0", "20.0%"]]


def test_an_empty_export_says_so(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("==ERROR== no kernels matched\n")
    assert "no instructions" in summary_mod.summary(str(path))
