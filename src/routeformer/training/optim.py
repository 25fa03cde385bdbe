"""Optimizers and learning-rate schedules.

Schedules are multipliers of the peak learning rate, as a pure function of the optimizer step s
(0-based; the multiplier for step s is used by the s-th update):
    warm-up:  w(s) = min(1, (s + 1) / warmup_steps)          (1 when warmup_steps = 0)
    rsqrt:    w(s) * sqrt(warmup / max(s + 1, warmup))          authors' rsqrt_normalized_decay: the peak
              is learning_rate, reached at the end of warm-up, then 1/sqrt(step) decay
    cosine:   w(s) * (m + (1 - m) * 0.5 * (1 + cos(pi * p)))    p = progress after warm-up in [0, 1],
              m = min_lr_ratio
    constant: w(s)
"""
from __future__ import annotations

import math

import torch

from .adafactor import Adafactor
from .config import TrainConfig


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    warm = cfg.warmup_steps
    w = min(1.0, (step + 1) / warm) if warm > 0 else 1.0
    if cfg.schedule == "constant":
        return w
    if cfg.schedule == "rsqrt":
        return w * math.sqrt(max(warm, 1) / max(step + 1, warm, 1))
    span = max(1, cfg.max_steps - warm)
    progress = min(1.0, max(0.0, (step + 1 - warm) / span))
    m = cfg.min_lr_ratio
    return w * (m + (1 - m) * 0.5 * (1 + math.cos(math.pi * progress)))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (linear weights, embeddings); not norms, biases or relative-position tables."""
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        is_matrix = p.dim() >= 2 and not name.rsplit(".", 1)[-1].startswith("rel_")
        (decay if is_matrix else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adamw":
        # Fused on CUDA: one kernel for all parameters instead of torch's default foreach kernels, host
        # time that an eager (or CUDA-graph) training step would otherwise wait on.
        fused = all(p.is_cuda for group in groups for p in group["params"])
        return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=cfg.adam_betas, weight_decay=cfg.weight_decay,
                                 fused=fused or None)
    # torch's Adafactor (>= 2.5): factored second moments, no first moment (the authors' beta1 = 0),
    # beta2 decay -0.8 (their "pow" decay with exponent 0.8); its step without torch's two host syncs per
    # parameter (training/adafactor.py), same state and checkpoints.
    return Adafactor(groups, lr=cfg.learning_rate, beta2_decay=-0.8, weight_decay=cfg.weight_decay)


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, cfg))


def load_optimizer_state(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                         saved: dict, cfg: TrainConfig) -> None:
    """Load a checkpoint's optimizer and scheduler state (optimizer.pt) but keep the settings of `cfg`.

    torch's load_state_dict also restores the saved param groups' lr, weight_decay and betas and the
    scheduler's base_lrs, which would silently ignore a resumed run's --set train.learning_rate (the
    usual answer to a loss that became NaN). Moments and step counts come from the checkpoint; the
    hyperparameters from cfg; with an unchanged cfg every value is the one saved, bit for bit.
    """
    settings = [{k: v for k, v in group.items() if k not in ("params", "lr")} for group in optimizer.param_groups]
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    for group, fresh in zip(optimizer.param_groups, settings):
        group.update(fresh)
    scheduler.base_lrs = [group["initial_lr"] for group in optimizer.param_groups]
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = base * lr_multiplier(scheduler.last_epoch, cfg)  # what LambdaLR.step() set last
