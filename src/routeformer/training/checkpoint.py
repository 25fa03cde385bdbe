"""Checkpoints: RUN_DIR/checkpoints/step_NNNNNN/, written as a unit.

A checkpoint directory holds
    model.safetensors   weights and persistent buffers (centroids, EMA statistics)
    optimizer.pt        optimizer and LR-scheduler state (torch.save)
    rng.pt              torch (CPU and CUDA), numpy and python RNG states as tensors and plain numbers
    state.json          {"format", "step", "config": RunConfig dict, "sampler": state, "dataset": {...}}

optimizer.pt and rng.pt hold only tensors and plain containers, so both are read with
torch.load(weights_only=True): opening a checkpoint never runs code from it.

It is written into step_NNNNNN.tmp, every file fsynced, then renamed to step_NNNNNN (atomic on POSIX)
and the parent directory fsynced. A writer killed at any moment leaves either the previous set of
complete checkpoints or the new one; *.tmp debris is deleted by the next save. A step is written once:
saving over an existing step_NNNNNN is refused rather than deleting a complete checkpoint first.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch

from .config import RunConfig

FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
# What unpickling numpy's RNG state (a uint32 ndarray) needs: ndarray.__reduce__ names numpy's array
# constructor under this numpy's module path (numpy.core or numpy._core).
_NUMPY_ARRAY_GLOBALS = [np.zeros(1, np.uint32).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


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
    """RNG states as tensors and numbers only (numpy's and python's come as ndarray / tuples of ints),
    so that rng.pt loads with weights_only=True."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state, py_state = state["numpy"], state["python"]
    if isinstance(np_state, dict):
        np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                             np_state["has_gauss"], np_state["cached_gaussian"]))
        random.setstate((py_state["version"], tuple(py_state["internal"].tolist()), py_state["gauss_next"]))
    else:  # rng.pt of an older version: numpy's own state tuple and python's getstate() tuple
        np.random.set_state(np_state)
        random.setstate(py_state)
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
    if final.exists():
        # The trainer saves each step once (a resumed run starts after its newest checkpoint). Replacing
        # a complete checkpoint could not be atomic: it would be deleted before its successor is in place.
        raise FileExistsError(f"{final} already exists: a checkpoint is never overwritten; delete it first "
                              "if it is to be replaced")
    tmp = root / f"step_{step:06d}.tmp"
    tmp.mkdir()
    safetensors.torch.save_model(model, str(tmp / "model.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    torch.save(capture_rng(), tmp / "rng.pt")
    (tmp / "state.json").write_text(json.dumps({"format": FORMAT, "step": step, **state}, indent=1) + "\n")
    for file in tmp.iterdir():
        _fsync_file(file)
    _fsync_dir(tmp)
    os.replace(tmp, final)
    _fsync_dir(root)
    for _, old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _state_problem(state: dict) -> str | None:
    """What is wrong with a parsed state.json for resume and evaluation, or None."""
    for key, kind in (("step", int), ("config", dict), ("sampler", dict)):
        if key not in state:
            return f"missing key {key!r}"
        if not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"{key!r} is a {type(state[key]).__name__}, not a {kind.__name__}"
    for section in ("model", "train", "data"):
        if not isinstance(state["config"].get(section), dict):
            return f"missing key 'config.{section}'"
    if "step" not in state["sampler"]:
        return "missing key 'sampler.step'"
    return None


def read_state(ckpt: Path) -> dict:
    """state.json of a checkpoint, checked for the keys resume and evaluation read."""
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except FileNotFoundError:
        raise ValueError(f"checkpoint {ckpt} has no state.json: it is incomplete; delete it") from None
    except ValueError as err:
        raise ValueError(f"checkpoint {ckpt}: state.json is corrupt ({err}); delete {ckpt} to fall back "
                         "to the previous checkpoint") from None
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {ckpt}: state.json is corrupt (a JSON {type(state).__name__}, not an "
                         f"object); delete {ckpt} to fall back to the previous checkpoint")
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {ckpt} has format {state.get('format')}, this version reads {FORMAT}")
    problem = _state_problem(state)
    if problem:
        raise ValueError(f"{ckpt / 'state.json'} is corrupt or from an incompatible version: {problem}. If "
                         f"another routeformer version wrote it, use that one; otherwise delete {ckpt} to fall "
                         "back to the previous checkpoint")
    return state


def run_config(ckpt: Path, state: dict) -> RunConfig:
    """The RunConfig stored in a checkpoint's state (from read_state); a bad one names the file."""
    try:
        return RunConfig.from_dict(state["config"])
    except (ValueError, TypeError) as err:
        raise ValueError(f"{ckpt / 'state.json'}: its config is corrupt or from an incompatible version "
                         f"({err})") from None


class WeightsMismatchError(ValueError):
    """model.safetensors is readable but does not fit the model built from the config it is loaded into."""


def load_weights(model: torch.nn.Module, ckpt: Path, device: str | torch.device = "cpu") -> None:
    """Load model.safetensors strictly. An unreadable file is a ValueError advising deletion (the previous
    checkpoint takes over); a readable file that does not fit `model` is a WeightsMismatchError: the
    checkpoint is fine, the config it is loaded with is not, so nothing should be deleted."""
    path = ckpt / "model.safetensors"
    if not path.is_file():
        raise ValueError(f"checkpoint {ckpt} has no model.safetensors: it is incomplete; delete it")
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False, device=str(device))
    except (safetensors.SafetensorError, OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0][:300] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load {path}: {first}. The file is corrupt; delete {ckpt} to fall back to the "
                         "previous checkpoint") from None
    except RuntimeError as err:  # load_state_dict: the file's tensors have other shapes than the model's
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        detail = (lines[1] if len(lines) > 1 else lines[0] if lines else type(err).__name__)[:300]
        raise WeightsMismatchError(f"{path} does not fit the model its config describes ({detail}): was the "
                                   f"model config in {ckpt / 'state.json'} edited? Restore it") from None
    if missing or unexpected:
        raise WeightsMismatchError(f"{path} does not fit the model its config describes (missing "
                                   f"{sorted(missing)[:4]}, unexpected {sorted(unexpected)[:4]}): was the model "
                                   f"config in {ckpt / 'state.json'} edited? Restore it")


def load_training_state(ckpt: Path) -> tuple[dict, dict]:
    """(optimizer.pt contents, rng states) of a checkpoint."""
    try:
        opt = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=True)
        # rng.pt of an older version holds numpy's state as an ndarray; these globals only rebuild
        # arrays, so allowing them keeps such checkpoints resumable without unpickling anything else.
        with torch.serialization.safe_globals(_NUMPY_ARRAY_GLOBALS):
            rng = torch.load(ckpt / "rng.pt", map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
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
