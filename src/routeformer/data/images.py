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

import io
import pickle
import tarfile
import zipfile
from pathlib import Path
from typing import Iterator

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


def _npz_members(path: Path) -> Iterator[tuple[str, bytes]]:
    if path.is_dir():
        for file in sorted(path.rglob("*")):
            if file.is_file() and (file.suffix in (".npz", ".zip")):
                yield from _npz_members(file)
    elif zipfile.is_zipfile(path) and path.suffix == ".zip":
        with zipfile.ZipFile(path) as zf:
            for name in sorted(zf.namelist()):
                if name.endswith(".npz"):
                    yield name.rsplit("/", 1)[-1], zf.read(name)
    elif path.suffix == ".npz":
        yield path.name, path.read_bytes()


def _batch_key(name: str) -> tuple[str, int]:
    stem = name[: -len(".npz")]
    if stem.startswith("train_data_batch_"):
        return "train", int(stem.rsplit("_", 1)[-1])
    if stem.startswith("val_data"):
        return "valid", 0
    return "", 0


def write_imagenet64(out: Path, paths: list[Path], extra: dict) -> Path:
    members = sorted(((_batch_key(n), blob) for p in paths for n, blob in _npz_members(p)), key=lambda x: x[0])
    members = [(key, blob) for key, blob in members if key[0]]
    if not any(k[0] == "train" for k, _ in members) or not any(k[0] == "valid" for k, _ in members):
        raise ValueError(
            "ImageNet-64 needs train_data_batch_*.npz and val_data.npz (from Imagenet64_train_part1_npz.zip, "
            "Imagenet64_train_part2_npz.zip and Imagenet64_val_npz.zip): pass those zips or their folder"
        )
    writer = DatasetWriter(out, DatasetMeta("imagenet64", 256, "uint8", "bpd", example_length=12288, extra=extra))
    try:
        for (split, _), blob in members:
            rows = np.load(io.BytesIO(blob))["data"]
            writer.append(split, chw_to_hwc(np.asarray(rows, dtype=np.uint8), 64))
        writer.alias("test", "valid")
        writer.meta.extra["order"] = "HWC raster, RGB adjacent; test = valid (ImageNet's validation set)"
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
