"""`make demo`: prepare the built-in corpus, train the `tiny` preset on CPU for about two minutes,
evaluate, plot and print a sample. Writes data/stdlib (kept between demos) and runs/demo (replaced).

ROUTEFORMER_DEMO_SECONDS changes the training time budget (default 120).
"""
from __future__ import annotations

import os
import shlex
import shutil
import sys
import time
from pathlib import Path

from .main import main as cli


def _run(*argv: str) -> None:
    print(f"\n$ routeformer {shlex.join(argv)}", flush=True)  # quoted: each line can be pasted and run
    code = cli(list(argv))
    if code:
        sys.exit(code)


def main() -> int:
    seconds = float(os.environ.get("ROUTEFORMER_DEMO_SECONDS", "120"))
    started = time.perf_counter()
    if not (Path("data/stdlib") / "meta.json").is_file():
        _run("prepare", "stdlib", "--out", "data/stdlib")
    if Path("runs/demo").exists():
        shutil.rmtree("runs/demo")  # the demo's own output of a previous `make demo`
    _run("train", "--preset", "tiny", "--data", "data/stdlib", "--out", "runs/demo",
         "--set", f"train.time_budget_s={seconds:g}", "--set", "train.device=cpu",
         "--set", "train.log_every=10", "--set", "train.eval_tokens=32768")
    _run("eval", "runs/demo", "--split", "test", "--max-tokens", "65536", "--device", "cpu")
    _run("plot", "runs/demo")
    _run("sample", "runs/demo", "--prompt", "class ", "--tokens", "240", "--temperature", "1.0",
         "--top-p", "0.95", "--device", "cpu")
    print(f"\ndemo finished in {time.perf_counter() - started:.0f}s; run directory: runs/demo", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
