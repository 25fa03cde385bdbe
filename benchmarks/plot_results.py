"""Plot a benchmarks/attention.py run: fwd+bwd time and peak memory against T, log-log, one line a method.

    python benchmarks/plot_results.py RESULTS  OUT.png

RESULTS is the JSON that `attention.py --out` writes, or a markdown file holding its first table
(benchmarks/RESULTS.md works), so a committed table can be drawn again without the GPU.
"""
from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

# What to draw, in order: (row name, label, style).
LINES = [
    ("dense SDPA", "dense SDPA (FlashAttention)", dict(color="black", marker="o")),
    ("peer KmeansAttention", "routing-transformer 1.6.1", dict(color="tab:red", marker="s")),
    ("gather+SDPA", "gather + SDPA (plain PyTorch)", dict(color="tab:gray", marker="^")),
    ("ours topk", "ours topk (eager)", dict(color="tab:blue", marker="o")),
    ("ours topk (CUDA graph)", "ours topk (CUDA graph)", dict(color="tab:blue", marker="o", linestyle="--")),
    ("ours nearest", "ours nearest (eager)", dict(color="tab:green", marker="o")),
    ("ours nearest (CUDA graph)", "ours nearest (CUDA graph)", dict(color="tab:green", marker="o", linestyle="--")),
]
_ROW = re.compile(r"^\|\s*(\d+)\s*\|([^|]+)\|([^|]*)\|([^|]*)\|([^|]*)\|([^|]*)\|")


def _number(text: str):
    text = text.strip()
    return None if text in ("", "-") else float(text)


def load_rows(path: Path) -> tuple[list[dict], str]:
    """(rows with name, T, fwd_ms, fwdbwd_ms, fwd_mib, fwdbwd_mib; a title line)."""
    text = path.read_text()
    if path.suffix == ".json":
        data = json.loads(text)
        return data["rows"], data.get("device", "")
    rows, title = [], ""
    for line in text.splitlines():
        if not title and "UTC" in line and "B=" in line:  # the header attention.py writes above its table
            title = line.strip()
        m = _ROW.match(line)
        if m:
            T, name, *values = m.groups()
            fwd, fwdbwd, fwd_mib, fwdbwd_mib = (_number(v) for v in values)
            rows.append(dict(T=int(T), name=name.strip(), fwd_ms=fwd, fwdbwd_ms=fwdbwd, fwd_mib=fwd_mib,
                             fwdbwd_mib=fwdbwd_mib))
        elif rows and not line.startswith("|"):
            break  # the first table only: later tables (other runs) would add second points per T
    if not rows:
        raise ValueError(f"{path}: no '| T | variant | fwd ms | ...' table rows found")
    return rows, title


def plot(rows: list[dict], title: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5))
    for name, label, style in LINES:
        pts = sorted((r["T"], r.get("fwdbwd_ms"), r.get("fwdbwd_mib")) for r in rows if r["name"] == name)
        times = [(T, t) for T, t, _ in pts if t]
        mems = [(T, m) for T, _, m in pts if m]
        if times:
            ax_t.plot(*zip(*times), label=label, **style)
        if mems:
            ax_m.plot(*zip(*mems), label=label, **style)
    for ax, ylabel in ((ax_t, "forward + backward, ms (median)"), (ax_m, "forward + backward peak, MiB")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(title or "benchmarks/attention.py", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, help="attention.py --out JSON, or a markdown file with its table")
    p.add_argument("out", type=Path, help="PNG to write")
    args = p.parse_args(argv)
    rows, title = load_rows(args.results)
    plot(rows, title, args.out)
    print(f"wrote {args.out} ({len(rows)} rows)")


if __name__ == "__main__":
    main()
