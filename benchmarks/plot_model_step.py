"""Bar chart of benchmarks/model_step.py runs: training-step time per routing mode, optimizer and mode.

    python benchmarks/plot_model_step.py RUN.json [RUN.json ...] OUT.png

Each JSON is what `model_step.py --out` writes; rows of all of them go into one chart, grouped by
(assign, optimizer), one bar per mode (eager, torch.compile, CUDA graphs), labelled in ms.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MODES = [("eager", "eager", "tab:gray"), ("compile", "torch.compile", "tab:blue"),
         ("reduce-overhead", "torch.compile + CUDA graphs", "tab:green")]


def load(paths: list[Path]) -> tuple[list[dict], str]:
    rows, device = [], ""
    for path in paths:
        data = json.loads(path.read_text())
        device = device or data.get("device", "")
        rows += [r for r in data["rows"] if "step_ms" in r]
    if not rows:
        raise SystemExit("no timed rows in " + ", ".join(map(str, paths)))
    return rows, device


def plot(rows: list[dict], device: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys((r["assign"], r.get("optimizer", "adamw")) for r in rows))
    width = 0.8 / len(MODES)
    fig, ax = plt.subplots(figsize=(1.8 + 1.9 * len(groups), 4.2))
    for m, (mode, label, color) in enumerate(MODES):
        xs, ys = [], []
        for g, key in enumerate(groups):
            row = next((r for r in rows if (r["assign"], r.get("optimizer", "adamw")) == key and r["mode"] == mode), None)
            if row:
                xs.append(g + (m - (len(MODES) - 1) / 2) * width)
                ys.append(row["step_ms"])
        bars = ax.bar(xs, ys, width, label=label, color=color)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(groups)), [f"{a}\n{o}" for a, o in groups])
    ax.set_ylabel("training step (ms, median)")
    first = rows[0]
    ax.set_title(f"{first['preset']} preset, T={first['T']}, batch {first['batch']}, "
                 f"{first['params_M']:.0f}M parameters" + (f"\n{device}" if device else ""), fontsize=10)
    ax.set_ylim(0, 1.25 * max(r["step_ms"] for r in rows))  # room for the labels and the legend
    ax.legend(fontsize=8, loc="upper center", ncol=len(MODES), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("out", type=Path)
    args = p.parse_args(argv)
    rows, device = load(args.runs)
    plot(rows, device, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
