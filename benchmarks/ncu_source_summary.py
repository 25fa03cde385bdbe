"""Summarise Nsight Compute's per-instruction stall samples (the source page of a SourceCounters report,
exported as CSV by gpu_session.sh's ncusrc step): where a kernel's warps wait, by loop and by instruction.

    python benchmarks/ncu_source_summary.py ncu_source__bwd_dkdv_kernel.csv [--top 30]

Loops are found as in sm90_resources.py (a branch back to an earlier address closes one); "outside" is
the prologue and epilogue. Each line: samples (share of the kernel's), the SASS, its top stall reasons
(ncu's stall_* columns: long_sb = waiting on a global load, barrier = on a barrier or warpgroup MMA, wait
= a fixed-latency dependency). Session 23 (NOTES_routing.md) read topk's dq and dk/dv with it.
"""
from __future__ import annotations

import argparse
import collections
import csv
import re


def read(path: str) -> list[dict]:
    rows = list(csv.reader(open(path, newline="")))
    header = next((i for i, r in enumerate(rows) if r and r[0] == "Address"), None)
    if header is None:  # ncu wrote an error instead of the source page
        return []
    names = rows[header]
    col = {n: i for i, n in enumerate(names)}
    stalls = [n for n in names if n.startswith("stall_") and "Not Issued" not in n]
    out = []
    for r in rows[header + 1:]:
        if len(r) < len(names) or not r[0].startswith("0x"):
            continue
        out.append({"addr": int(r[0], 16), "sass": r[1].strip(),
                    "samples": int(r[col["Warp Stall Sampling (All Samples)"]] or 0),
                    "stalls": {n[len("stall_"):]: int(r[col[n]] or 0) for n in stalls}})
    return out


def loops(ins: list[dict]) -> list[tuple[int, int]]:
    found = []
    for i in ins:
        m = re.search(r"\bBRA\b.*?(0x[0-9a-f]+)", i["sass"])
        if m and int(m.group(1), 16) < i["addr"]:
            found.append((int(m.group(1), 16), i["addr"]))
    return sorted(found)


def summary(path: str, top: int = 30) -> str:
    ins = read(path)
    if not ins:
        return f"{path}: no instructions (ncu's export failed? see the file)"
    base, total = ins[0]["addr"], sum(i["samples"] for i in ins) or 1
    spans = loops(ins)

    def region(addr):
        # the innermost loop holding addr (an outer loop's span holds its inner ones)
        inside = [(hi - lo, j) for j, (lo, hi) in enumerate(spans) if lo <= addr <= hi]
        return f"loop{min(inside)[1]}" if inside else "outside"

    samples, reasons = collections.Counter(), collections.defaultdict(collections.Counter)
    for i in ins:
        r = region(i["addr"])
        samples[r] += i["samples"]
        reasons[r].update(i["stalls"])
    lines = [f"{path}: {len(ins)} instructions, {total} samples; loops "
             + ", ".join(f"loop{j} {lo - base:#x}-{hi - base:#x}" for j, (lo, hi) in enumerate(spans))]
    for r in sorted(samples, key=lambda r: -samples[r]):
        top_reasons = ", ".join(f"{k} {v}" for k, v in reasons[r].most_common(5))
        lines.append(f"  {r:8s} {100 * samples[r] / total:5.1f}%  ({top_reasons})")
    lines.append("  top instructions (offset, region, share, SASS, top stalls):")
    for i in sorted(ins, key=lambda i: -i["samples"])[:top]:
        why = ", ".join(f"{k} {v}" for k, v in sorted(i["stalls"].items(), key=lambda kv: -kv[1])[:2])
        lines.append(f"  {i['addr'] - base:6x} {region(i['addr']):8s} {100 * i['samples'] / total:5.1f}%  "
                     f"{i['sass'][:58]:58s} {why}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="+")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    for path in args.csv:
        print(summary(path, args.top))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
