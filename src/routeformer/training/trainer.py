"""The single-device training loop: a run directory, checkpoints, resume, metrics.

RUN_DIR/
    config.json          the RunConfig of the run (the newest, with a resumed run's overrides)
    metrics.jsonl        one JSON line per logged step and per evaluation (see metrics.py)
    checkpoints/step_*   see checkpoint.py
    tensorboard/         the same metrics as TensorBoard events, with train.tensorboard=true

There is no log file: progress lines go to `log` (print in the CLI) or to a tqdm bar on stderr.
`routeformer eval` adds eval.jsonl to RUN_DIR, and `routeformer plot` adds plots/.

A directory holding a checkpoint is only ever continued (resume=True). One whose run stopped before its
first checkpoint (NaN loss, Ctrl-C, an error) holds nothing to resume, so a fresh run may start there again.

One optimizer step = grad_accum micro-batches of loss = cross-entropy + aux_loss (the model's weighted
commitment loss), each scaled by 1/grad_accum; then gradient clipping, the optimizer and scheduler step,
and model.update_centroids() once (k-means statistics of all micro-batches applied together).
"""
from __future__ import annotations

import contextlib
import json
import math
import random
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..data.sampler import RandomBatchSampler, eval_target_count
from ..data.stream import PreparedDataset
from ..model import RoutingTransformerLM
from . import checkpoint as ckpt
from .config import RunConfig, apply_overrides
from .evaluate import evaluate_nll, report
from .metrics import MetricsLog
from .optim import build_optimizer, build_scheduler, load_optimizer_state


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


def _prepare_run_dir(run_dir: Path, resume: bool) -> tuple[Path | None, bool]:
    """(the checkpoint to resume from, or None for a fresh run; whether a fresh run replaces one that
    stopped before its first checkpoint). Refuses to overwrite a run that has a checkpoint."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a run directory: choose another --out")
    existing = ckpt.list_checkpoints(run_dir)
    started = (run_dir / "config.json").exists()
    if resume:
        if existing:
            return existing[-1][1], False
        if started:
            raise ValueError(f"--resume: {run_dir} holds no checkpoint to resume from (its run stopped before "
                             "writing the first one): start it afresh, without --resume, as it was started "
                             f"(routeformer train --preset NAME ... --out {run_dir}); that replaces its "
                             "config.json and metrics.jsonl")
        raise ValueError(f"--resume: {run_dir} holds no checkpoint to resume from; drop --resume to start a run")
    if existing:
        raise ValueError(f"{run_dir} already holds a run: pass --resume to continue it, or choose another --out")
    return None, started


def _model_changes(before, after) -> dict[str, tuple]:
    """ModelConfig fields that differ: name -> (checkpoint's value, new value)."""
    old, new = asdict(before), asdict(after)
    return {name: (old[name], new[name]) for name in old if old[name] != new[name]}


def _divergence_advice(run_dir: Path) -> str:
    found = ckpt.list_checkpoints(run_dir)
    if found:
        return (f"lower train.learning_rate; the checkpoints up to {found[-1][1].name} are intact, and "
                "--resume --set train.learning_rate=... continues from the newest")
    return "lower train.learning_rate and start the run afresh (it wrote no checkpoint yet)"


def train(config: RunConfig, run_dir: str | Path, *, resume: bool = False, overrides: list[str] = (),
          log: Callable[[str], None] = print) -> TrainResult:
    """Train (or, with resume=True, continue) the run in run_dir. On resume the run's saved config is
    used, with `overrides` applied on top (e.g. a larger train.max_steps)."""
    run_dir = Path(run_dir)
    start_ckpt, restarting = _prepare_run_dir(run_dir, resume)
    state, changed = None, {}
    if start_ckpt is not None:
        state = ckpt.read_state(start_ckpt)
        saved = ckpt.run_config(start_ckpt, state)
        config = apply_overrides(saved, list(overrides))
        changed = _model_changes(saved.model, config.model)
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
        what = ", ".join(f"model.{k} {old!r} -> {new!r}" for k, (old, new) in changed.items())
        try:
            ckpt.load_weights(model, start_ckpt, device)
        except ckpt.WeightsMismatchError:
            if not changed:
                raise
            # The checkpoint is fine; the override is what does not fit it.
            raise ValueError(f"--set overrides change the model of {run_dir} ({what}) and its checkpoint's weights "
                             "do not fit the changed model: drop those overrides to continue the run, or train "
                             "the changed model as a new run with another --out") from None
        opt_state, rng = ckpt.load_training_state(start_ckpt)
        load_optimizer_state(optimizer, scheduler, opt_state, cfg)
        sampler.load_state_dict(state["sampler"])
        ckpt.restore_rng(rng)
        step = state["step"]
        log(f"resumed {run_dir} from {start_ckpt.name} (step {step})" + (f" with {what}" if changed else ""))
    elif cfg.centroid_init:
        # Its own sampler seed: the training batches (and so resumed runs) are the same with or without it.
        init_sampler = RandomBatchSampler(data.split("train"), seq_len=cfg.seq_len, batch_size=cfg.batch_size,
                                          seed=cfg.seed + 1, example_length=data.meta.example_length)
        model.init_centroids(next(init_sampler)[0].to(device), seed=cfg.seed)
    run_dir.mkdir(parents=True, exist_ok=True)
    if restarting:
        # Removed only now, after every check passed: a restart that fails early keeps the old logs.
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
        log(f"{run_dir} holds a run that stopped before its first checkpoint: starting it afresh "
            "(its config.json and metrics.jsonl are replaced)")
    (run_dir / "config.json").write_text(json.dumps(config.to_dict(), indent=1) + "\n")
    forward = torch.compile(model, mode=cfg.compile_mode) if cfg.compile else model
    if device.type == "cuda" and not (cfg.compile and cfg.compile_mode in ("reduce-overhead", "max-autotune")):
        # Eager (or graph-less compiled) steps wait on Python launching kernels: benchmarks/RESULTS.md,
        # "Whole-model training step". (max-autotune also uses CUDA graphs.)
        log("tip: on CUDA, --set train.compile=true --set train.compile_mode=reduce-overhead (CUDA graphs) ran the "
            "enwik8 preset's training steps 1.4-2.5x faster than eager on an H200 (benchmarks/model_step.py)")
    metrics = MetricsLog(run_dir, tensorboard=cfg.tensorboard, truncate_after=step if resume else None)
    dataset_state = {"name": data.meta.dataset, "path": str(data.path.resolve()), "vocab_size": data.meta.vocab_size,
                     "metric": data.meta.metric}
    result = TrainResult(run_dir)

    def pending_values() -> list[list[float]]:
        # The loop's one host sync, at log and checkpoint steps: [ce, aux] of the steps not yet synced.
        return torch.stack([torch.stack([c, a]) for _, c, a in pending]).tolist()

    def stop_if_not_finite(values: list[list[float]]) -> None:
        for (s, _, _), (c, a) in zip(pending, values):
            if not math.isfinite(c + a):
                raise FloatingPointError(f"loss became {c + a} at step {s}: {_divergence_advice(run_dir)}")

    def save(at_step: int) -> None:
        # A checkpoint must never hold a diverged model: it would be what --resume picks, and pruning would
        # delete an older healthy one for it. Saving copies every tensor to the host anyway, so these two
        # host syncs (losses not yet logged; all weights and buffers) cost little beside it.
        if pending:
            stop_if_not_finite(pending_values())
        tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
        if not torch.stack([torch.isfinite(t).all() for t in tensors]).all():
            raise FloatingPointError(f"the model's weights became non-finite by step {at_step}: "
                                     f"{_divergence_advice(run_dir)}")
        ckpt.save_checkpoint(run_dir, step=at_step, model=model, optimizer=optimizer, scheduler=scheduler,
                             state={"config": config.to_dict(), "sampler": sampler.state_dict(),
                                    "dataset": dataset_state}, keep=cfg.keep_checkpoints)

    def run_eval(at_step: int) -> dict:
        nll, n = evaluate_nll(model, data.split(config.data.eval_split), seq_len=cfg.seq_len,
                              batch_size=cfg.batch_size, example_length=data.meta.example_length,
                              max_tokens=cfg.eval_tokens or None, device=device, autocast=autocast)
        split = data.split(config.data.eval_split)
        whole = n == eval_target_count(len(split), seq_len=cfg.seq_len, example_length=data.meta.example_length)
        rep = report(nll, data.meta.metric, data.meta.splits[config.data.eval_split], whole_split=whole)
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
            step_lr = optimizer.param_groups[0]["lr"]  # the rate this update uses (logged with its step)
            optimizer.step()
            scheduler.step()
            model.update_centroids()
            step += 1
            window_steps += 1
            pending.append((step, ce_sum, aux_sum))
            out_of_time = cfg.time_budget_s > 0 and time.perf_counter() - started >= cfg.time_budget_s
            last = step == cfg.max_steps or out_of_time
            if step % cfg.log_every == 0 or last:
                values = pending_values()
                now = time.perf_counter()
                tps = tokens_per_step * window_steps / max(now - window_start, 1e-9)
                for (s, _, _), (c, a) in zip(pending, values):
                    result.steps.append(s)
                    result.losses.append(c + a)
                ce_mean = sum(v[0] for v in values) / len(values)
                aux_mean = sum(v[1] for v in values) / len(values)
                metrics.write({"step": step, "loss": ce_mean + aux_mean, "ce": ce_mean, "aux": aux_mean,
                               "lr": step_lr, "tokens_per_s": tps,
                               "elapsed_s": now - started})
                stop_if_not_finite(values)
                if bar is not None:
                    bar.set_postfix(loss=f"{ce_mean + aux_mean:.4f}", tok_s=f"{tps:,.0f}")
                elif plain:
                    eta = (now - started) / (step - first_step) * (cfg.max_steps - step)
                    if cfg.time_budget_s:
                        eta = min(eta, max(0.0, cfg.time_budget_s - (now - started)))
                    log(f"step {step}/{cfg.max_steps}  loss {ce_mean + aux_mean:.4f}  lr {step_lr:.2e}"
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
