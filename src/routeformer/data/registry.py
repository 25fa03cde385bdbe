"""Dataset names, canonical sources and `prepare`, plus the codec that turns text into ids and back.

Checksums (and where they come from) are in SOURCES; where none could be found the size is checked and
the entry says so.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import corpus, images, pg19, text
from .download import DownloadError, Source, fetch
from .stream import PreparedDataset

MATT = "http://mattmahoney.net/dc/"
# The original S3 bucket (s3.amazonaws.com/research.metamind.io/wikitext/) answers 403 since 2024; the
# dataset author's own host serves the same archives. The checksums below are checked on every
# download, so a file that differs is refused rather than used.
WIKITEXT = "https://wikitext.smerity.com/"
IMAGENET = "https://image-net.org/data/downsample/"

SOURCES: dict[str, list[Source]] = {
    # Archive sizes as in TensorFlow's word2vec tutorial (text8) and the HuggingFace enwik8 card; no published
    # checksum was found for these two archives, so their size is verified, and enwik8's extracted text
    # against its published md5 (CONTENT_MD5).
    "enwik8": [Source(MATT + "enwik8.zip", "enwik8.zip", size=36445475, provenance="size only (HF dataset card)")],
    "text8": [Source(MATT + "text8.zip", "text8.zip", size=31344016, provenance="size only (TF word2vec tutorial)")],
    "wikitext103": [Source(WIKITEXT + "wikitext-103-v1.zip", "wikitext-103-v1.zip",
                           md5="9ddaacaf6af0710eda8c456decff7832", sha1="0aec09a7537b58d4bb65362fee27650eeaba625a",
                           provenance="md5: torchtext; sha1: GluonNLP")],
    "wikitext103_bytes": [Source(WIKITEXT + "wikitext-103-raw-v1.zip", "wikitext-103-raw-v1.zip",
                                 sha1="86f2375181b9247049d9c9205fad2b71b274b568", provenance="sha1: GluonNLP")],
    "cifar10": [Source("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz",
                       size=170498071, md5="c58f30108f718f92721af3b95e74349a",
                       provenance="md5 published by the dataset's page; used by torchvision")],
    # image-net.org serves these only after login, and publishes no checksum: download them by hand.
    "imagenet64": [Source(IMAGENET + name, name) for name in (
        "Imagenet64_train_part1_npz.zip", "Imagenet64_train_part2_npz.zip", "Imagenet64_val_npz.zip")],
}


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    description: str
    metric: str
    from_file: str  # what --from-file accepts


DATASETS: dict[str, DatasetInfo] = {d.name: d for d in (
    DatasetInfo("stdlib", "built-in: this Python's standard library source, bytes (no network)", "bpc",
                "any text/binary file, used instead of the standard library"),
    DatasetInfo("enwik8", "first 100M bytes of English Wikipedia XML, bytes, 90M/5M/5M", "bpc",
                "enwik8.zip or the extracted enwik8 (any file: split 90/5/5)"),
    DatasetInfo("text8", "100M characters of cleaned Wikipedia (a-z and space), 90M/5M/5M", "bpc",
                "text8.zip or the extracted text8 (any file: split 90/5/5)"),
    DatasetInfo("wikitext103", "Wikitext-103, word level (vocabulary of the training split)", "ppl",
                "wikitext-103-v1.zip or a folder with wiki.{train,valid,test}.tokens"),
    DatasetInfo("wikitext103_bytes", "Wikitext-103 raw text, bytes", "bpc",
                "wikitext-103-raw-v1.zip or a folder with wiki.{train,valid,test}.raw"),
    DatasetInfo("pg19", "PG-19 books, byte-level BPE (32768) trained on the training split", "ppl",
                "a folder with train/, validation/, test/ of .txt books"),
    DatasetInfo("cifar10", "CIFAR-10 images as 3072 pixel values (HWC raster, RGB adjacent)", "bpd",
                "cifar-10-python.tar.gz or its extracted folder"),
    DatasetInfo("imagenet64", "downsampled ImageNet 64x64 as 12288 pixel values (HWC raster)", "bpd",
                "the Imagenet64_*_npz.zip files (or their .npz) in a folder"),
)}


# Datasets whose --from-file is one file (a folder is an error, not something to read).
_SINGLE_FILE = ("stdlib", "enwik8", "text8")


def get_dataset_info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        close = difflib.get_close_matches(name, list(DATASETS), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}{hint} Known datasets: {', '.join(DATASETS)}")
    return DATASETS[name]


# Checksums of the extracted text where the page that hosts the archive publishes one: enwik8's
# 100,000,000 bytes (mattmahoney.net/dc/textdata.html lists size, md5 and sha1). text8 has none.
CONTENT_MD5 = {"enwik8": "a1fa5ffddb56f4953e226637dabbb36a"}


def _verify_content(name: str, data: bytes) -> None:
    expected = CONTENT_MD5.get(name)
    if expected is not None and hashlib.md5(data).hexdigest() != expected:
        raise DownloadError(f"the downloaded {name} has md5 {hashlib.md5(data).hexdigest()}, not the published "
                            f"{expected}: delete the download and try again, or pass a copy you trust with "
                            "--from-file")


def _obtain(name: str, from_file: Path | None, cache: Path) -> list[Path]:
    if from_file is not None:
        if not from_file.exists():
            raise FileNotFoundError(f"--from-file {from_file} does not exist")
        return [from_file]
    if name == "imagenet64":
        raise ValueError(
            "ImageNet-64 cannot be downloaded automatically: image-net.org requires a login. Download "
            + ", ".join(s.url for s in SOURCES["imagenet64"]) + " and pass their folder with --from-file DIR"
        )
    if name == "pg19":
        return [pg19.download(cache / "pg19")]
    return [fetch(source, cache) for source in SOURCES[name]]


def prepare(name: str, out: str | Path, *, from_file: str | Path | None = None,
            cache: str | Path | None = None, max_bytes: int | None = None) -> Path:
    """Build the prepared dataset `name` in `out` (see stream.py for the layout). Returns `out`.

    from_file: use this local file/folder instead of downloading. cache: where downloads go (default
    OUT/../downloads). max_bytes: cap of the built-in stdlib corpus.
    """
    get_dataset_info(name)
    out = Path(out)
    from_file = Path(from_file) if from_file is not None else None
    if max_bytes is not None:
        # Refused rather than ignored: a cap that silently does nothing reads as if it had worked.
        if name != "stdlib" or from_file is not None:
            raise ValueError(f"--max-bytes caps only the built-in stdlib corpus (no --from-file); "
                             f"drop it, or cut {from_file or 'the input'} to size yourself")
        if max_bytes < 1:
            raise ValueError(f"--max-bytes must be a positive number of bytes, got {max_bytes}; leave it out "
                             f"for the default cap ({corpus.DEFAULT_MAX_BYTES:,})")
    if from_file is not None:
        if not from_file.exists():
            raise FileNotFoundError(f"--from-file {from_file} does not exist: check the path")
        if from_file.is_dir() and name in _SINGLE_FILE:
            raise ValueError(f"--from-file {from_file} is a directory, but {name} reads one file "
                             f"({DATASETS[name].from_file}): pass that file")
        if from_file.is_file() and from_file.stat().st_size == 0:
            raise ValueError(f"--from-file {from_file} is empty")
    extra: dict = {"source": str(from_file) if from_file else "download"}
    if name == "stdlib":
        if from_file is not None:
            return text.write_char_splits(out, "stdlib", from_file.read_bytes(), extra)
        data, info = corpus.stdlib_corpus(corpus.DEFAULT_MAX_BYTES if max_bytes is None else max_bytes)
        if len(data) < text.MIN_CHARS:  # write_char_splits would say "use a larger file": there is none
            raise ValueError(f"--max-bytes {max_bytes} keeps {len(data)} bytes of the corpus, fewer than the "
                             f"{text.MIN_CHARS} a 90/5/5 split needs: raise --max-bytes")
        return text.write_char_splits(out, "stdlib", data, {**extra, **info})
    paths = _obtain(name, from_file, Path(cache) if cache else out.parent / "downloads")
    if from_file is None:
        extra["sources"] = [s.url for s in SOURCES.get(name, [])]
    if name in ("enwik8", "text8"):
        data = text.read_member(paths[0], name)
        if from_file is None:
            _verify_content(name, data)
        return text.write_char_splits(out, name, data, extra)
    if name == "wikitext103":
        return text.write_wikitext_words(out, text.wikitext_files(paths[0], "tokens"), extra)
    if name == "wikitext103_bytes":
        return text.write_byte_splits(out, name, text.wikitext_files(paths[0], "raw"), extra)
    if name == "pg19":
        return pg19.write_pg19(out, paths[0], extra)
    if name == "cifar10":
        return images.write_cifar10(out, paths[0], extra)
    return images.write_imagenet64(out, paths, extra)


@dataclass
class Codec:
    """Text <-> token ids of one prepared dataset (images: ids are pixel values, no text)."""

    encode: Callable[[str], list[int]]
    decode: Callable[[list[int]], str]
    is_text: bool = True


def load_codec(dataset: PreparedDataset) -> Codec:
    meta = dataset.meta
    if meta.metric == "bpd":
        return Codec(lambda s: [int(v) for v in s.split()], lambda ids: " ".join(map(str, ids)), is_text=False)
    if (dataset.path / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(dataset.path / "tokenizer.json"))
        return Codec(lambda s: tok.encode(s).ids, lambda ids: tok.decode(list(ids)))
    if (dataset.path / "vocab.json").is_file():
        vocab = json.loads((dataset.path / "vocab.json").read_text())
        index = {w: i for i, w in enumerate(vocab)}
        unk = index.get("<unk>", 0)
        return Codec(lambda s: [index.get(w, unk) for w in s.split()],
                     lambda ids: " ".join(vocab[i] for i in ids).replace(" <eos> ", "\n"))
    return Codec(lambda s: list(s.encode("utf-8")), lambda ids: bytes(ids).decode("utf-8", errors="replace"))

