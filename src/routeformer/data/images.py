"""Images as pixel sequences: CIFAR-10 (3072 tokens) and ImageNet-64 (12288 tokens), 256 values each.

Order: raster order over rows, then columns, with the three channels of a pixel adjacent (R, G, B):
token index = (row * W + col) * 3 + channel, i.e. an (H, W, C) array flattened. This is the authors'
order: their sparse_image_transformer.py reshapes [batch, height, width, channels] targets to
[batch, height * width * channels] for 1-D local attention (google-research routing_transformer).
Both source formats store images channel-major (all R, then all G, then all B), so prepare transposes.

Each image is one training sequence (example_length in meta.json): the model reads a zero start token
followed by the first 3071 (12287) values and predicts all 3072 (12288), the zero right-shift of the
authors' code. Metric: bits per dimension (per sub-pixel value).

CIFAR-10: train = the 50,000 training images, test = the 10,000 test images; valid reads the test file
(the standard protocol reports test bits/dim and has no validation split).
ImageNet-64: the downsampled ImageNet of Chrabaszcz et al. 2017 (image-net.org "downsample", npz
batches): train = train_data_batch_1..10, valid = test = val_data (50,000). NOTE: the paper used van den
Oord et al.'s 64x64 ImageNet (image-net.org/small/train_64x64.tar), which is no longer distributed and
was resized differently; numbers on the two are close but not identical.
"""
from __future__ import annotations

import contextlib
import pickle
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from .stream import DatasetMeta, DatasetWriter


def chw_to_hwc(flat: np.ndarray, size: int) -> np.ndarray:
    """(N, 3*size*size) channel-major rows -> (N, size*size*3) raster order with RGB adjacent."""
    return flat.reshape(-1, 3, size, size).transpose(0, 2, 3, 1).reshape(len(flat), -1)


def cifar10_batches(path: Path) -> dict[str, list[np.ndarray]]:
    """Training and test rows (N, 3072) uint8, channel-major, from cifar-10-python.tar.gz or its folder."""
    out: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    names = {f"data_batch_{i}": "train" for i in range(1, 6)} | {"test_batch": "test"}

    def load(raw: bytes, name: str) -> None:
        batch = pickle.loads(raw, encoding="bytes")  # noqa: S301 (the canonical, checksum-verified archive)
        out[names[name]].append((name, np.asarray(batch[b"data"], dtype=np.uint8)))

    if path.is_dir():
        for name in names:
            hits = sorted(path.rglob(name))
            if not hits:
                raise ValueError(f"{path} holds no {name}: pass cifar-10-python.tar.gz or its extracted folder")
            load(hits[0].read_bytes(), name)
    else:
        if not tarfile.is_tarfile(path):
            raise ValueError(f"{path} is not a tar archive: pass cifar-10-python.tar.gz or its extracted folder")
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                base = member.name.rsplit("/", 1)[-1]
                if base in names and member.isfile():
                    load(tar.extractfile(member).read(), base)
    for split, batches in out.items():
        if not batches:
            raise ValueError(f"{path} holds no CIFAR-10 {split} batches")
        out[split] = [rows for _, rows in sorted(batches)]
    return out


def write_cifar10(out: Path, path: Path, extra: dict) -> Path:
    batches = cifar10_batches(path)
    writer = DatasetWriter(out, DatasetMeta("cifar10", 256, "uint8", "bpd", example_length=3072, extra=extra))
    try:
        for split in ("train", "test"):
            for rows in batches[split]:
                writer.append(split, chw_to_hwc(rows, 32))
        writer.alias("valid", "test")
        writer.meta.extra["order"] = "HWC raster, RGB adjacent; valid = test"
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


CHUNK_ROWS = 1024  # images converted and written at a time (12 MB of ImageNet-64)


@dataclass(frozen=True)
class _Member:
    """One npz batch: a file on disk (inner is None) or a member of a zip archive. Opened only when read."""

    path: Path
    inner: str | None
    size: int  # uncompressed bytes, to tell duplicates from different files of the same name

    @contextlib.contextmanager
    def reading(self) -> Iterator[BinaryIO]:
        if self.inner is None:
            with open(self.path, "rb") as f:
                yield f
        else:
            with zipfile.ZipFile(self.path) as archive, archive.open(self.inner) as f:
                yield f

    def __str__(self) -> str:
        return f"{self.path}:{self.inner}" if self.inner else str(self.path)


def _npz_members(path: Path) -> Iterator[tuple[str, _Member]]:
    """(batch file name, where it is) for every .npz in a file, zip or folder; nothing is read yet."""
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file() and (file.suffix in (".npz", ".zip")):
                yield from _npz_members(file)
    elif zipfile.is_zipfile(path) and path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            for info in sorted(zf.infolist(), key=lambda i: i.filename):
                if info.filename.endswith(".npz"):
                    yield info.filename.rsplit("/", 1)[-1], _Member(path, info.filename, info.file_size)
    elif path.suffix == ".npz":
        yield path.name, _Member(path, None, path.stat().st_size)


def _batch_key(name: str) -> tuple[str, int]:
    stem = name[: -len(".npz")]
    if stem.startswith("train_data_batch_"):
        return "train", int(stem.rsplit("_", 1)[-1])
    if stem.startswith("val_data"):
        return "valid", 0
    return "", 0


def imagenet64_members(paths: list[Path]) -> list[tuple[tuple[str, int], _Member]]:
    """The batches to read, in order (train 1..10, then valid), each once.

    The same batch may be found twice (a file passed twice, or a folder holding both a zip and its
    extracted .npz); it is read once. Two different files with one batch name are an error.
    """
    found: dict[tuple[str, int], tuple[str, _Member]] = {}
    seen_inputs: set[Path] = set()
    for p in paths:
        if p.resolve() in seen_inputs:
            continue
        seen_inputs.add(p.resolve())
        for name, member in _npz_members(p):
            key = _batch_key(name)
            if not key[0]:
                continue
            if key in found:
                first = found[key][1]
                if first.size != member.size:
                    raise ValueError(f"{first} and {member} are both {name} but differ in size: remove one")
                continue
            found[key] = (name, member)
    return [(key, member) for key, (_, member) in sorted(found.items())]


def npz_rows(member: _Member, array: str = "data", chunk_rows: int | None = None) -> Iterator[np.ndarray]:
    """The rows of one 2-D array of an npz, chunk_rows at a time, without reading the whole array.

    An npz is a zip of .npy files; the .npy member is read as a stream: its header, then the rows.
    """
    chunk_rows = chunk_rows or CHUNK_ROWS
    try:
        with member.reading() as outer, zipfile.ZipFile(outer) as npz:
            if array + ".npy" not in npz.namelist():
                raise ValueError(f"{member} holds no {array!r} array: is it an ImageNet-64 npz batch?")
            with npz.open(array + ".npy") as f:
                version = np.lib.format.read_magic(f)
                if version == (1, 0):
                    shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
                else:
                    shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
                if fortran or len(shape) != 2 or dtype.hasobject:
                    raise ValueError(f"{member}: {array!r} is not a C-order 2-D array of numbers (shape {shape}); "
                                     "is it an ImageNet-64 npz batch?")
                row_bytes = shape[1] * dtype.itemsize
                for start in range(0, shape[0], chunk_rows):
                    n = min(chunk_rows, shape[0] - start)
                    raw = f.read(n * row_bytes)
                    if len(raw) != n * row_bytes:
                        raise ValueError(f"{member} is truncated ({array!r} ends before row {start + n}): "
                                         "download it again")
                    yield np.frombuffer(raw, dtype=dtype).reshape(n, shape[1])
    except zipfile.BadZipFile as err:
        raise ValueError(f"{member} is not a readable npz ({err}): download it again") from None


def write_imagenet64(out: Path, paths: list[Path], extra: dict) -> Path:
    members = imagenet64_members(paths)
    if not any(k[0] == "train" for k, _ in members) or not any(k[0] == "valid" for k, _ in members):
        raise ValueError(
            "ImageNet-64 needs train_data_batch_*.npz and val_data.npz (from Imagenet64_train_part1_npz.zip, "
            "Imagenet64_train_part2_npz.zip and Imagenet64_val_npz.zip): pass those zips or their folder"
        )
    writer = DatasetWriter(out, DatasetMeta("imagenet64", 256, "uint8", "bpd", example_length=12288, extra=extra))
    try:
        # One chunk of rows in memory at a time: the train batches are about 1.5 GB each uncompressed.
        for (split, _), member in members:
            for rows in npz_rows(member):
                if rows.shape[1] != 3 * 64 * 64:
                    raise ValueError(f"{member} holds images of {rows.shape[1]} values, not 12288 (64x64, RGB): "
                                     "pass the 64x64 ImageNet batches (Imagenet64_*_npz.zip)")
                writer.append(split, chw_to_hwc(np.asarray(rows, dtype=np.uint8), 64))
        writer.alias("test", "valid")
        writer.meta.extra["order"] = "HWC raster, RGB adjacent; test = valid (ImageNet's validation set)"
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
