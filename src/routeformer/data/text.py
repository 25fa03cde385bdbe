"""Character/byte-level and word-level text datasets: enwik8, text8, Wikitext-103 (words and bytes).

enwik8 and text8 use the standard split of their 100M characters: the first 90M for training, the next
5M for validation, the last 5M for test (Al-Rfou et al. 2019; the routing transformer's t2t problem reads
the same train/valid/test files). Both are stored as bytes (uint8, vocab 256): enwik8 is raw UTF-8
bytes (bits per character = bits per byte, as every paper reports it); text8 holds only a-z and space,
so its bytes are its characters.

Wikitext-103 word level: lines split on spaces, an <eos> token at the end of every line (Merity et al.;
Transformer-XL's preprocessing), vocabulary = every word of the training split (about 268k),
ordered by frequency then alphabetically so ids are deterministic. Word-level perplexity.
Wikitext-103 bytes: the raw archive (wiki.*.raw, untokenised text) as UTF-8 bytes, bits per byte.
"""
from __future__ import annotations

import io
import json
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np

from .stream import DatasetMeta, DatasetWriter, dtype_for_vocab

MIN_CHARS = 64  # below this a 90/5/5 split leaves nothing to validate on


def read_member(path: Path, member_suffix: str) -> bytes:
    """Bytes of a zip member whose name ends with member_suffix, or the file itself if not a zip."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if n.endswith(member_suffix)]
            if not names:
                raise ValueError(f"{path} holds no file named *{member_suffix}; is it the right archive?")
            return zf.read(names[0])
    return path.read_bytes()


def write_char_splits(out: Path, name: str, data: bytes, extra: dict) -> Path:
    """90/5/5 contiguous split of a byte string, stored as uint8 tokens."""
    if len(data) < MIN_CHARS:
        raise ValueError(
            f"the input for {name} has {len(data)} bytes; at least {MIN_CHARS} are needed for a "
            "90/5/5 split: use a larger file"
        )
    n_train, n_valid = int(len(data) * 0.9), int(len(data) * 0.05)
    arr = np.frombuffer(data, dtype=np.uint8)
    writer = DatasetWriter(out, DatasetMeta(name, 256, "uint8", "bpc", extra=extra))
    try:
        writer.append("train", arr[:n_train])
        writer.append("valid", arr[n_train : n_train + n_valid])
        writer.append("test", arr[n_train + n_valid :])
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def wikitext_files(path: Path, suffix: str) -> dict[str, bytes]:
    """The three split files (wiki.{train,valid,test}.{suffix}) from a zip or a directory."""
    names = {"train": f"wiki.train.{suffix}", "valid": f"wiki.valid.{suffix}", "test": f"wiki.test.{suffix}"}
    out = {}
    if path.is_dir():
        for split, fname in names.items():
            hits = sorted(path.rglob(fname))
            if not hits:
                raise ValueError(f"{path} holds no {fname}: pass the Wikitext-103 archive or its folder")
            out[split] = hits[0].read_bytes()
        return out
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is neither a zip archive nor a directory holding wiki.*.{suffix} files")
    for split, fname in names.items():
        out[split] = read_member(path, fname)
    return out


def _words(text: bytes) -> list[str]:
    words: list[str] = []
    for line in io.TextIOWrapper(io.BytesIO(text), encoding="utf-8", newline="\n"):
        words.extend(line.split())
        words.append("<eos>")
    return words


def write_wikitext_words(out: Path, files: dict[str, bytes], extra: dict) -> Path:
    train_words = _words(files["train"])
    counts = Counter(train_words)
    vocab = sorted(counts, key=lambda w: (-counts[w], w))
    index = {w: i for i, w in enumerate(vocab)}
    unk = index.get("<unk>")
    meta = DatasetMeta("wikitext103", len(vocab), dtype_for_vocab(len(vocab)), "ppl", extra=extra)
    writer = DatasetWriter(out, meta)
    try:
        for split in ("train", "valid", "test"):
            words = train_words if split == "train" else _words(files[split])
            ids = [index.get(w, unk) for w in words]
            if None in ids:
                raise ValueError(f"split {split} has words outside the training vocabulary and no <unk> token")
            writer.append(split, np.asarray(ids, dtype=np.int64))
        writer.add_file("vocab.json", json.dumps(vocab, ensure_ascii=False))
        meta.extra["tokenizer"] = "words split on whitespace, <eos> per line; ids in vocab.json"
        return writer.commit()
    except BaseException:
        writer.abort()
        raise


def write_byte_splits(out: Path, name: str, files: dict[str, bytes], extra: dict) -> Path:
    writer = DatasetWriter(out, DatasetMeta(name, 256, "uint8", "bpc", extra=extra))
    try:
        for split in ("train", "valid", "test"):
            writer.append(split, np.frombuffer(files[split], dtype=np.uint8))
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
