"""Open a finished or running training run for evaluation, sampling and plots."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.stream import PreparedDataset
from ..model import RoutingTransformerLM
from . import checkpoint as ckpt
from .config import RunConfig


@dataclass
class LoadedRun:
    model: RoutingTransformerLM
    config: RunConfig
    state: dict
    checkpoint: Path

    def dataset(self, path: str | Path | None = None) -> PreparedDataset:
        """The run's prepared dataset (or `path`), checked against the model's vocabulary."""
        where = Path(path or self.state.get("dataset", {}).get("path") or self.config.data.resolved_path())
        if not (where / "meta.json").is_file():
            raise FileNotFoundError(f"the run's dataset {where} is gone: prepare it again or pass --data DIR")
        data = PreparedDataset(where)
        if data.meta.vocab_size > self.config.model.vocab_size:
            raise ValueError(f"dataset {where} has {data.meta.vocab_size} token ids but the model only "
                             f"{self.config.model.vocab_size}: pass the dataset the run was trained on with --data")
        return data


def load_run(path: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """The model of a run directory's newest checkpoint (or of a checkpoint directory), in eval mode."""
    checkpoint = ckpt.resolve_checkpoint(path)
    state = ckpt.read_state(checkpoint)
    config = ckpt.run_config(checkpoint, state)
    model = RoutingTransformerLM(config.model)
    ckpt.load_weights(model, checkpoint, device)
    model.to(device).eval()
    return LoadedRun(model, config, state, checkpoint)
