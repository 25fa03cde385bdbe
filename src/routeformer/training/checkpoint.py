"""Checkpoints: RUN_DIR/checkpoints/step_NNNNNN/, written as a unit.

A checkpoint directory holds
    model.safetensors   weights and persistent buffers (centroids, EMA statistics)
    optimizer.pt        optimizer and LR-scheduler state (torch.save)
    rng.pt              torch (CPU and CUDA), numpy and python RNG states
    state.json          {"format", "step", "config": RunConfig dict, "sampler": state, "dataset": {...}}

It is written into step_NNNNNN.tmp, every file fsynced, then renamed to step_NNNNNN (atomic on POSIX)
and the parent directory fsynced. A writer killed at any moment leaves either the previous set of
complete checkpoints or the new one; *.tmp debris is deleted by the next save.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def capture_rng() -> dict:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        m = _STEP_DIR.match(path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path))
    return sorted(found)


def save_checkpoint(run_dir: str | os.PathLike, *, step: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler, state: dict, keep: int) -> Path:
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for debris in root.glob("*.tmp"):
        shutil.rmtree(debris, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    tmp.mkdir()
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(capture_rng(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "step": step, **state}, indent=1) + "\n")
    for file in tmp.iterdir():
        _fsync_file(file)
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. a resumed run that stops where it started)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(ckpt: Path) -> dict:
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"checkpoint {ckpt} has no state.json: it is incomplete; delete it") from None
    except ValueError as err:
        raise ValueError(f"checkpoint {ckpt}: state.json is corrupt ({err}); delete {ckpt} to fall back "
                         "to the previous checkpoint") from None
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {ckpt} has format {state.get('format')}, this version reads {FORMAT}")
    return state


def load_weights(model: torch.nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors strictly; corrupt files and config mismatches become one-line ValueErrors."""
    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"checkpoint {ckpt} has no model.safetensors: it is incomplete; delete it")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False, device=str(device))
    except (safetensors.SafetensorError, OSError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load {path}: {first}. The file is corrupt or was written for another "
                         f"model configuration; delete {ckpt} to fall back to the previous checkpoint") from None
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model built from its config (missing {sorted(missing)[:4]}, "
                         f"unexpected {sorted(unexpected)[:4]}); was config.json edited?")


def load_training_state(ckpt: Path) -> tuple[dict, dict]:
    """(optimizer.pt contents, rng states) of a checkpoint."""
    try:
        opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
        rng = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=False)
    except (OSError, RuntimeError, EOFError, ValueError) as err:
        raise ValueError(f"checkpoint {ckpt}: optimizer/RNG state unreadable ({type(err).__name__}); delete "
                         f"{ckpt} to resume from the previous checkpoint") from None
    return opt, rng


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint directory itself, or the newest checkpoint of a run directory."""
    path = Path(path)
    if (path / "state.json").is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: pass a run directory written by `routeformer train`")
    found = list_checkpoints(path)
    if not found:
        raise ValueError(f"{path} holds no checkpoint (no checkpoints/step_*): train first, or pass the run "
                         "directory that `routeformer train --out` wrote")
    return found[-1][1]
