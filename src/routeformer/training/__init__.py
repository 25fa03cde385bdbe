"""Training: run configuration, optimizers and schedules, checkpoints, the training loop, evaluation."""
from .config import DataConfig, RunConfig, TrainConfig, apply_overrides, config_from_preset
from .evaluate import evaluate_nll, report
from .trainer import TrainResult, train

__all__ = ["DataConfig", "RunConfig", "TrainConfig", "TrainResult", "apply_overrides", "config_from_preset",
           "evaluate_nll", "report", "train"]
