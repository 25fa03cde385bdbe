"""The single-device training loop: a run directory, checkpoints, resume, metrics.

RUN_DIR/
    config.json          the RunConfig of the run
    metrics.jsonl        one line per logged step / evaluation
    checkpoints/step_*   see checkpoint.py
    train.log            (written by the CLI) human-readable progress lines

One optimizer step = grad_accum micro-batches of loss = cross-entropy + aux_loss (the model's weighted
commitment loss), each scaled by 1/grad_accum; then gradient clipping, the optimizer and scheduler step,
and model.update_centroids() once (k-means statistics of all micro-batches applied together).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sampler import RandomBatchSampler
from ..data.stream import PreparedDataset
from ..model import RoutingTransformerLM
from . import checkpoint as ckpt
from .config import RunConfig, apply_overrides
from .evaluate import evaluate_nll, report
from .metrics import MetricsLog
from .optim import build_optimizer, build_scheduler


@dataclass
class TrainResult:
    run_dir: Path
    steps: list[int] = field(default_factory=list)  # optimizer steps completed in this call (1-based)
    losses: list[float] = field(default_factory=list)  # training loss (ce + aux) of each of those steps
    final_step: int = 0
    eval: dict | None = None


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device=cuda but no CUDA device is available: use --set train.device=cpu")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_for(precision: str, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def check_compatible(config: RunConfig, data: PreparedDataset) -> None:
    """Bad combinations of model, training and data settings, each with the fix in the message."""
    meta, model, train = data.meta, config.model, config.train
    if meta.vocab_size > model.vocab_size:
        raise ValueError(f"dataset {meta.dataset} has {meta.vocab_size} token ids but model.vocab_size="
                         f"{model.vocab_size}: use --set model.vocab_size={meta.vocab_size}")
    if train.seq_len > model.max_seq_len:
        raise ValueError(f"train.seq_len={train.seq_len} is longer than the model accepts (model.max_seq_len="
                         f"{model.max_seq_len}): lower train.seq_len or raise model.max_seq_len")
    if config.data.eval_split not in meta.splits:
        raise ValueError(f"data.eval_split={config.data.eval_split!r} is not a split of {data.path} "
                         f"(has {sorted(meta.splits)})")
    need = meta.example_length or train.seq_len + 1
    for split in ("train", config.data.eval_split):
        have = meta.splits[split]["tokens"]
        if have < need:
            raise ValueError(f"the {split} split of {data.path} has {have} tokens, fewer than one sequence needs "
                             f"({need}): use a larger data file or a smaller train.seq_len")


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _prepare_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from (None for a fresh run); refuses to overwrite an existing run."""
    existing = ckpt.list_checkpoints(run_dir)
    if resume:
        if not existing:
            raise ValueError(f"--resume: {run_dir} holds no checkpoint to resume from; drop --resume to start")
        return existing[-1][1]
    if existing or (run_dir / "config.json").exists():
        raise ValueError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    return None


def train(config: RunConfig, run_dir: str | Path, *, resume: bool = False, overrides: list[str] = (),
          log: Callable[[str], None] = print) -> TrainResult:
    """Train (or, with resume=True, continue) the run in run_dir. On resume the run's saved config is
    used, with `overrides` applied on top (e.g. a larger train.max_steps)."""
    run_dir = Path(run_dir)
    start_ckpt = _prepare_run_dir(run_dir, resume)
    state = None
    if start_ckpt is not None:
        state = ckpt.read_state(start_ckpt)
        config = apply_overrides(RunConfig.from_dict(state["config"]), list(overrides))
    cfg = config.train
    data = PreparedDataset(config.data.resolved_path())
    check_compatible(config, data)
    device = resolve_device(cfg.device)
    autocast = autocast_for(cfg.precision, device)

    _seed_everything(cfg.seed)
    model = RoutingTransformerLM(config.model).to(device)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_scheduler(optimizer, cfg)
    sampler = RandomBatchSampler(data.split("train"), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                 seed=cfg.seed, example_length=data.meta.example_length)
    step = 0
    if start_ckpt is not None:
        ckpt.load_weights(model, start_ckpt, device)
        opt_state, rng = ckpt.load_training_state(start_ckpt)
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        sampler.load_state_dict(state["sampler"])
        ckpt.restore_rng(rng)
        step = int(state["step"])
        log(f"resumed {run_dir} from {start_ckpt.name} (step {step})")
    elif cfg.centroid_init:
        # Its own sampler seed: the training batches (and so resumed runs) are the same with or without it.
        init_sampler = RandomBatchSampler(data.split("train"), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                          seed=cfg.seed + 1, example_length=data.meta.example_length)
        model.init_centroids(next(init_sampler)[0].to(device), seed=cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    forward = torch.compile(model) if cfg.compile else model
    metrics = MetricsLog(run_dir, tensorboard=cfg.tensorboard, truncate_after=step if resume else None)
    dataset_state = {"name": data.meta.dataset, "path": str(data.path.resolve()), "vocab_size": data.meta.vocab_size,
                     "metric": data.meta.metric}
    result = TrainResult(run_dir)

    def save(at_step: int) -> None:
        ckpt.save_checkpoint(run_dir, step=at_step, model=model, optimizer=optimizer, scheduler=scheduler,
                             state={"config": config.to_dict(), "sampler": sampler.state_dict(),
                                    "dataset": dataset_state}, keep=cfg.keep_checkpoints)

    def run_eval(at_step: int) -> dict:
        nll, n = evaluate_nll(model, data.split(config.data.eval_split), seq_len=cfg.seq_len,
                              batch_size=cfg.batch_size, example_length=data.meta.example_length,
                              max_tokens=cfg.eval_tokens or None, device=device, autocast=autocast)
        rep = report(nll, data.meta.metric, data.meta.splits[config.data.eval_split])
        metrics.write({"step": at_step, "split": config.data.eval_split, "eval_loss": nll, "eval_tokens": n,
                       **{k: v for k, v in rep.items() if k != "nll"}})
        return rep

    tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    bar = None
    # Not a terminal (CI, `make demo | tee`): plain lines at each log step instead of carriage returns.
    plain = cfg.progress and not sys.stderr.isatty()
    if cfg.progress and not plain:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True, leave=True)
    pending: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    first_step = step
    started = time.perf_counter()
    window_start, window_steps = started, 0
    model.train()
    try:
        while step < cfg.max_steps:
            optimizer.zero_grad(set_to_none=True)
            ce_sum = torch.zeros((), device=device)
            aux_sum = torch.zeros((), device=device)
            for _ in range(cfg.grad_accum):
                x, y = next(sampler)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                with autocast():
                    logits, aux = forward(x, return_aux_loss=True)
                ce = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
                ((ce + aux.float()) / cfg.grad_accum).backward()
                ce_sum += ce.detach() / cfg.grad_accum
                aux_sum += aux.detach().float() / cfg.grad_accum
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            model.update_centroids()
            step += 1
            window_steps += 1
            pending.append((step, ce_sum, aux_sum))
            out_of_time = cfg.time_budget_s > 0 and time.perf_counter() - started >= cfg.time_budget_s
            last = step == cfg.max_steps or out_of_time
            if step % cfg.log_every == 0 or last:
                # The one host sync of the loop: losses of the logged window come to the CPU together.
                values = torch.stack([torch.stack([c, a]) for _, c, a in pending]).tolist()
                now = time.perf_counter()
                tps = tokens_per_step * window_steps / max(now - window_start, 1e-9)
                for (s, _, _), (c, a) in zip(pending, values):
                    result.steps.append(s)
                    result.losses.append(c + a)
                ce_mean = sum(v[0] for v in values) / len(values)
                aux_mean = sum(v[1] for v in values) / len(values)
                metrics.write({"step": step, "loss": ce_mean + aux_mean, "ce": ce_mean, "aux": aux_mean,
                               "lr": scheduler.get_last_lr()[0], "tokens_per_s": tps,
                               "elapsed_s": now - started})
                if not math.isfinite(ce_mean):
                    raise FloatingPointError(f"loss became {ce_mean} at step {step}: lower train.learning_rate")
                if bar is not None:
                    bar.set_postfix(loss=f"{ce_mean + aux_mean:.4f}", tok_s=f"{tps:,.0f}")
                elif plain:
                    eta = (now - started) / (step - first_step) * (cfg.max_steps - step)
                    if cfg.time_budget_s:
                        eta = min(eta, max(0.0, cfg.time_budget_s - (now - started)))
                    log(f"step {step}/{cfg.max_steps}  loss {ce_mean + aux_mean:.4f}  lr {scheduler.get_last_lr()[0]:.2e}"
                        f"  {tps:,.0f} tok/s  elapsed {now - started:.0f}s  eta {eta:.0f}s")
                pending.clear()
                window_start, window_steps = now, 0
            if bar is not None:
                bar.update(1)
            if cfg.eval_every and step % cfg.eval_every == 0 and not last:
                rep = run_eval(step)
                log(f"step {step}: {config.data.eval_split} " + ", ".join(f"{k} {v:.4f}" for k, v in rep.items()))
            if step % cfg.checkpoint_every == 0 or last:
                save(step)
            if out_of_time:
                log(f"time budget of {cfg.time_budget_s:g}s reached after step {step}")
                break
        result.final_step = step
        if result.steps:
            result.eval = run_eval(step)
    finally:
        if bar is not None:
            bar.close()
        metrics.close()
    return result
