"""Run configuration: RunConfig = (model: ModelConfig, train: TrainConfig, data: DataConfig).

Built from a named preset plus `--set key=value` overrides. Keys are `section.field` (train.learning_rate,
model.depth, data.path) or a bare field name when only one section has it. Values are parsed from the
dataclass field's type; a misspelt key is an error naming the close matches.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import asdict, dataclass, field, fields

from ..config import ModelConfig

OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("rsqrt", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass
class TrainConfig:
    optimizer: str = "adamw"  # "adamw" (torch.optim.AdamW) or "adafactor" (torch.optim.Adafactor)
    learning_rate: float = 3e-4  # peak learning rate (reached at the end of warm-up)
    warmup_steps: int = 100  # linear warm-up from 0 over this many optimizer steps
    # "rsqrt": warm-up, then lr * sqrt(warmup / step) (the authors' rsqrt_normalized_decay);
    # "cosine": warm-up, then cosine to min_lr_ratio * lr at max_steps; "constant": warm-up, then flat.
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of learning_rate
    batch_size: int = 8  # sequences per micro-batch (per device)
    seq_len: int = 512  # tokens per sequence; at most model.max_seq_len
    max_steps: int = 1000  # optimizer steps
    grad_accum: int = 1  # micro-batches per optimizer step (effective batch = batch_size * grad_accum)
    weight_decay: float = 0.0  # decoupled; applied to matrices only (not norms, biases, positions)
    grad_clip: float = 1.0  # max global gradient norm; 0 disables clipping
    adam_betas: tuple[float, float] = (0.9, 0.99)
    seed: int = 0  # seeds parameter init, dropout and the data sampler
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda"
    precision: str = "auto"  # "auto" (bf16 autocast on CUDA, fp32 on CPU), "fp32", "bf16"
    compile: bool = False  # wrap the model in torch.compile
    # torch.compile's mode when compile=true. "reduce-overhead" replays CUDA graphs: below ~32k tokens
    # an eager step is mostly kernel-launch time on the host (benchmarks/RESULTS.md), which it removes.
    compile_mode: str = "default"
    centroid_init: bool = True  # fresh runs: k-means-initialise routing centroids on one training batch
    log_every: int = 10  # steps between metrics lines / progress updates (1 logs every step)
    eval_every: int = 0  # steps between validation evaluations; 0: only at the end
    eval_tokens: int = 65536  # target tokens per validation evaluation during training (0: whole split)
    checkpoint_every: int = 100  # steps between checkpoints (the last step is always saved)
    keep_checkpoints: int = 3  # keep the newest N checkpoints
    time_budget_s: float = 0.0  # stop (and checkpoint) after this many seconds of training; 0: no limit
    tensorboard: bool = False  # also write TensorBoard event files to RUN_DIR/tensorboard
    progress: bool = True  # tqdm progress bar

    def __post_init__(self) -> None:
        for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("device", DEVICES),
                              ("precision", PRECISIONS), ("compile_mode", COMPILE_MODES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"train.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        for name in ("batch_size", "seq_len", "max_steps", "grad_accum", "log_every", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("learning_rate", "min_lr_ratio", "weight_decay", "grad_clip", "time_budget_s"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"train.{name} must be a finite number, got {getattr(self, name)}")
        if len(self.adam_betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"train.adam_betas must be two numbers in [0, 1), got {self.adam_betas}")
        for name in ("warmup_steps", "eval_every", "eval_tokens", "weight_decay", "grad_clip", "time_budget_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ValueError(f"train.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"train.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        self.adam_betas = tuple(float(b) for b in self.adam_betas)


@dataclass
class DataConfig:
    dataset: str = "stdlib"  # a name from `routeformer prepare --help`
    path: str = ""  # prepared dataset directory; "" means data/<dataset>
    eval_split: str = "valid"  # split evaluated during training

    def resolved_path(self) -> str:
        return self.path or f"data/{self.dataset}"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def to_dict(self) -> dict:
        return {"model": asdict(self.model), "train": asdict(self.train), "data": asdict(self.data)}

    @classmethod
    def from_dict(cls, raw: dict) -> "RunConfig":
        try:
            return cls(ModelConfig.from_dict(raw["model"]), _build(TrainConfig, raw["train"]),
                       _build(DataConfig, raw["data"]))
        except (KeyError, TypeError) as err:
            raise ValueError(f"run config is malformed ({err})") from None


def _build(cls, raw: dict):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} fields: {unknown}")
    return cls(**raw)


SECTIONS = {"model": ModelConfig, "train": TrainConfig, "data": DataConfig}
# ModelConfig fills these from others when None; they follow their inputs unless set explicitly.
_DERIVED = {"head_dim": lambda m: m["dim"] // m["heads"], "local_num_heads": lambda m: m["heads"] // 2,
            "share_qk": lambda m: m["causal"]}


def _parse_bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected true/false, got {text!r}")


def parse_value(text: str, annotation):
    """Parse `text` as the type `annotation` (int, float, bool, str, X | None, tuple[float, ...])."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if args and type(None) in args:
        if text.strip().lower() in ("none", "null"):
            return None
        return parse_value(text, next(a for a in args if a is not type(None)))
    if origin is tuple:
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        if len(parts) != len(args):
            raise ValueError(f"expected {len(args)} comma-separated values, got {text!r}")
        return tuple(parse_value(p, a) for p, a in zip(parts, args))
    if annotation is bool:
        return _parse_bool(text)
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            pass
        try:
            value = float(text)  # accepts 1e4; rejects 2.5 below
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
        if not value.is_integer():
            raise ValueError(f"expected an integer, got {text!r}")
        return int(value)
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if annotation is str:
        return text
    raise TypeError(f"cannot parse a value of type {annotation}")


def _all_keys() -> dict[str, tuple[str, str]]:
    """'section.field' and unambiguous bare 'field' -> (section, field)."""
    keys, owners = {}, {}
    for section, cls in SECTIONS.items():
        for f in fields(cls):
            keys[f"{section}.{f.name}"] = (section, f.name)
            owners.setdefault(f.name, []).append(section)
    for name, sections in owners.items():
        if len(sections) == 1:
            keys[name] = (sections[0], name)
    return keys


def resolve_key(key: str) -> tuple[str, str]:
    keys = _all_keys()
    if key in keys:
        return keys[key]
    bare = key.rsplit(".", 1)[-1]
    owners = [s for s, cls in SECTIONS.items() if bare in {f.name for f in fields(cls)}]
    if "." not in key and len(owners) > 1:
        raise ValueError(f"--set {key}: ambiguous, it is a field of {' and '.join(owners)}; write "
                         + " or ".join(f"{s}.{key}" for s in owners))
    close = difflib.get_close_matches(key, list(keys), n=4, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else "; see `routeformer train --help-config`"
    raise ValueError(f"--set {key}: unknown config key{hint}")


def apply_overrides(config: RunConfig, overrides: list[str]) -> RunConfig:
    """A new RunConfig with `key=value` overrides applied and every section re-validated."""
    raw = config.to_dict()
    explicit = set()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set train.learning_rate=3e-4")
        key, text = item.split("=", 1)
        section, name = resolve_key(key.strip())
        hints = typing.get_type_hints(SECTIONS[section])
        try:
            raw[section][name] = parse_value(text.strip(), hints[name])
        except ValueError as err:
            kind = getattr(hints[name], "__name__", None) if typing.get_origin(hints[name]) is None else None
            raise ValueError(f"--set {key}={text}: {err} (the field's type is {kind or hints[name]})") from None
        explicit.add((section, name))
    original = config.model
    for name, derive in _DERIVED.items():
        if ("model", name) not in explicit and getattr(original, name) == derive(asdict(original)):
            raw["model"][name] = None
    try:
        return RunConfig(ModelConfig(**raw["model"]), TrainConfig(**raw["train"]), DataConfig(**raw["data"]))
    except TypeError as err:
        raise ValueError(str(err)) from None


def config_from_preset(preset, overrides: list[str] = ()) -> RunConfig:
    """RunConfig of a presets.Preset (its train dict fills TrainConfig) with overrides applied."""
    train = TrainConfig(**{k: v for k, v in preset.train.items()})
    base = RunConfig(dataclasses.replace(preset.model), train, DataConfig(dataset=preset.dataset))
    return apply_overrides(base, list(overrides))


def describe_fields() -> str:
    """One line per overridable key with its type and default (for --help-config)."""
    lines = []
    for section, cls in SECTIONS.items():
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"{section}.{f.name}: {getattr(hints[f.name], '__name__', hints[f.name])} = {default!r}")
    return "\n".join(lines)
