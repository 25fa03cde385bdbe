"""Prepared datasets on disk: one raw token array per split (numpy memmap) and a small meta.json.

Layout of a prepared dataset directory:

    meta.json        {"format": 1, "dataset", "vocab_size", "dtype", "metric", "splits": {name: {...}}, ...}
    train.bin        raw little-endian tokens, dtype as in meta (uint8 bytes/pixels, uint16/uint32 else)
    valid.bin, test.bin
    (vocab.json / tokenizer.json for word and subword datasets)

A split entry is {"file": "train.bin", "tokens": N} plus, for text with a tokenizer, "words": the number
of whitespace-separated words it encodes (to report word-level perplexity from subword losses).

A prepared directory is written into a fresh temporary directory beside DIR (.DIR.<random>.tmp, made
by tempfile.mkdtemp, so no existing directory is ever reused or deleted) and renamed to DIR when
complete, so a directory with a meta.json was written completely. A prepare killed mid-write leaves
its .DIR.*.tmp behind; delete it by hand.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
DTYPES = ("uint8", "uint16", "uint32")
METRICS = ("bpc", "ppl", "bpd")


def dtype_for_vocab(vocab_size: int) -> str:
    """Smallest unsigned dtype that holds token ids < vocab_size."""
    if vocab_size <= 2**8:
        return "uint8"
    if vocab_size <= 2**16:
        return "uint16"
    return "uint32"


@dataclass
class DatasetMeta:
    dataset: str
    vocab_size: int
    dtype: str
    metric: str  # "bpc" bits per byte/character, "ppl" perplexity, "bpd" bits per dimension (subpixel)
    splits: dict = field(default_factory=dict)  # name -> {"file", "tokens", optional "words"}
    example_length: int = 0  # >0: fixed-length examples (images); sequences start at multiples of it
    extra: dict = field(default_factory=dict)  # provenance: source, checksums, tokenizer, notes

    def to_dict(self) -> dict:
        return {"format": FORMAT_VERSION, "dataset": self.dataset, "vocab_size": self.vocab_size,
                "dtype": self.dtype, "metric": self.metric, "splits": self.splits,
                "example_length": self.example_length, "extra": self.extra}


class PreparedDataset:
    """A prepared dataset directory opened read-only; splits are memory-mapped on first use."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{self.path} is not a prepared dataset (no meta.json): run `routeformer prepare DATASET "
                f"--out {self.path}` first, or pass --data pointing at a prepared directory"
            )
        try:
            raw = json.loads(meta_path.read_text())
            self.meta = DatasetMeta(
                dataset=raw["dataset"], vocab_size=int(raw["vocab_size"]), dtype=raw["dtype"],
                metric=raw["metric"], splits=dict(raw["splits"]),
                example_length=int(raw.get("example_length", 0)), extra=dict(raw.get("extra", {})),
            )
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{meta_path} is corrupt ({err}); prepare the dataset again") from None
        if self.meta.dtype not in DTYPES:
            raise ValueError(f"{meta_path}: dtype must be one of {DTYPES}, got {self.meta.dtype!r}")
        self._arrays: dict[str, np.ndarray] = {}

    def split(self, name: str) -> np.ndarray:
        """The split's tokens as a read-only 1-D memmap."""
        if name not in self.meta.splits:
            raise ValueError(
                f"dataset {self.meta.dataset} at {self.path} has no split {name!r}; "
                f"available: {sorted(self.meta.splits)}"
            )
        if name not in self._arrays:
            info = self.meta.splits[name]
            file = self.path / info["file"]
            dtype = np.dtype(self.meta.dtype)
            expected = int(info["tokens"]) * dtype.itemsize
            size = file.stat().st_size if file.is_file() else -1
            if size != expected:
                raise ValueError(
                    f"{file} holds {size} bytes but meta.json says {info['tokens']} tokens of "
                    f"{self.meta.dtype} ({expected} bytes): the dataset is incomplete or corrupt; prepare it again"
                )
            if expected == 0:
                self._arrays[name] = np.zeros(0, dtype=dtype)
            else:
                self._arrays[name] = np.memmap(file, dtype=dtype, mode="r")
        return self._arrays[name]


class DatasetWriter:
    """Writes a prepared dataset into a new temporary directory beside OUT, renamed to OUT on commit().

    Splits are appended in chunks so that large corpora never sit in memory whole.
    """

    def __init__(self, out: str | os.PathLike, meta: DatasetMeta):
        self.out = Path(out)
        if (self.out / "meta.json").exists():
            raise FileExistsError(
                f"{self.out} already holds a prepared dataset; delete it or choose another --out"
            )
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise FileExistsError(f"{self.out} exists and is not an empty directory: choose another --out")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        # A name of our own (not OUT.tmp): a fixed name could be a user's directory, and deleting
        # "debris" there would delete their files.
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
        self.meta = meta
        self._dtype = np.dtype(meta.dtype)

    def append(self, split: str, tokens) -> None:
        arr = np.asarray(tokens)
        if arr.size and (arr.min() < 0 or arr.max() >= self.meta.vocab_size):
            raise ValueError(f"token ids of split {split!r} fall outside [0, {self.meta.vocab_size})")
        info = self.meta.splits.setdefault(split, {"file": f"{split}.bin", "tokens": 0})
        with open(self.tmp / info["file"], "ab") as f:
            arr.astype(self._dtype, copy=False).tofile(f)
        info["tokens"] += int(arr.size)

    def alias(self, split: str, same_as: str) -> None:
        """Make `split` read the file of `same_as` (e.g. CIFAR-10's valid = test)."""
        self.meta.splits[split] = dict(self.meta.splits[same_as])

    def add_file(self, name: str, text: str) -> None:
        (self.tmp / name).write_text(text)

    def commit(self) -> Path:
        for name, info in self.meta.splits.items():
            if info["tokens"] < 1:
                raise ValueError(f"split {name!r} is empty: the input is too small to split; use a larger file")
        (self.tmp / "meta.json").write_text(json.dumps(self.meta.to_dict(), indent=1) + "\n")
        for path in self.tmp.iterdir():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        # mkdtemp makes the directory private (0700); give the dataset the permissions mkdir would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)
        if self.out.exists():
            self.out.rmdir()  # only an empty directory can be here (checked in __init__)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
