"""Metrics: one JSON object per line in RUN_DIR/metrics.jsonl, optionally mirrored to TensorBoard.

Training lines: {"step", "loss", "ce", "aux", "lr", "tokens_per_s", "elapsed_s"}; evaluation lines:
{"step", "split", "eval_loss", <metric>}. `step` counts optimizer steps completed; `lr` is the learning
rate that step's update used.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


class MetricsLog:
    def __init__(self, run_dir: str | os.PathLike, *, tensorboard: bool = False, truncate_after: int | None = None):
        self.path = Path(run_dir) / "metrics.jsonl"
        if truncate_after is not None and self.path.exists():
            # A resumed run repeats the steps after its checkpoint; drop their old lines so the log
            # holds one trajectory. Rewritten atomically: a crash here keeps the old file.
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= truncate_after]
            tmp = self.path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(line) + "\n" for line in kept))
            os.replace(tmp, self.path)
        self._file = open(self.path, "a", buffering=1)
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("train.tensorboard=true needs the tensorboard package: "
                                 "pip install 'routeformer[tensorboard]'") from None
            self._tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record.get("step", 0))

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """Lines of a metrics.jsonl; a torn last line (killed writer) is skipped."""
    out = []
    path = Path(path)
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out
