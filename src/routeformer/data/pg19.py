"""PG-19 (Rae et al. 2020): 28,752 Project Gutenberg books, in train/validation/test folders.

Download: the canonical copy is the public Google Cloud Storage bucket gs://deepmind-gutenberg. Its
JSON listing gives every object's size and md5, and every book is verified against them.

Tokens: a byte-level BPE of HuggingFace `tokenizers`, vocabulary 32768 (the authors used a ~32k t2t
subword vocabulary), trained on the training books in sorted order; id 0 is <eos>, appended after each
book. Each split records its whitespace-separated word count, so evaluation of a whole split also
reports word-level perplexity exp(total NLL / words) (the authors' README: multiply the subword
log-perplexity by 1.248); of part of a split, an estimate (training/evaluate.py).
"""
from __future__ import annotations

import json
import urllib.parse
from pathlib import Path
from typing import Iterator

import numpy as np

from .download import Source, fetch, md5_from_gcs, read_url
from .stream import DatasetMeta, DatasetWriter

BUCKET = "deepmind-gutenberg"
LISTING = "https://storage.googleapis.com/storage/v1/b/{bucket}/o?prefix={prefix}&fields=items(name,size,md5Hash),nextPageToken"
OBJECT = "https://storage.googleapis.com/{bucket}/{name}"
SPLIT_DIRS = {"train": "train", "valid": "validation", "test": "test"}
VOCAB_SIZE = 32768
EOS = "<eos>"


def list_bucket(prefix: str) -> list[Source]:
    sources, token = [], None
    while True:
        url = LISTING.format(bucket=BUCKET, prefix=urllib.parse.quote(prefix))
        if token:
            url += "&pageToken=" + urllib.parse.quote(token)
        page = json.loads(read_url(url))
        for item in page.get("items", []):
            if item["name"].endswith(".txt"):
                sources.append(Source(
                    url=OBJECT.format(bucket=BUCKET, name=urllib.parse.quote(item["name"])),
                    filename=item["name"], size=int(item["size"]), md5=md5_from_gcs(item["md5Hash"]),
                    provenance="GCS listing of gs://deepmind-gutenberg",
                ))
        token = page.get("nextPageToken")
        if not token:
            return sources


def download(dest: Path) -> Path:
    """Mirror the three split folders of the bucket into dest (verified; already-verified files kept)."""
    for folder in SPLIT_DIRS.values():
        for source in list_bucket(folder + "/"):
            fetch(source, dest,
                  from_file_hint="--from-file DIR (a folder holding train/, validation/ and test/ of PG-19)")
    return dest


def book_files(root: Path) -> dict[str, list[Path]]:
    out = {}
    for split, folder in SPLIT_DIRS.items():
        files = sorted((root / folder).glob("*.txt"))
        if not files:
            raise ValueError(
                f"{root / folder} holds no .txt books: --from-file must be a folder with train/, validation/ "
                "and test/ subfolders (the layout of gs://deepmind-gutenberg)"
            )
        out[split] = files
    return out


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def train_tokenizer(files: list[Path], vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )

    def texts() -> Iterator[str]:
        for path in files:
            yield _read(path)

    tokenizer.train_from_iterator(texts(), trainer=trainer, length=len(files))
    return tokenizer


def write_pg19(out: Path, root: Path, extra: dict, vocab_size: int = VOCAB_SIZE) -> Path:
    books = book_files(root)
    tokenizer = train_tokenizer(books["train"], vocab_size)
    eos = tokenizer.token_to_id(EOS)
    size = tokenizer.get_vocab_size()
    meta = DatasetMeta("pg19", size, "uint16" if size <= 2**16 else "uint32", "ppl", extra=extra)
    writer = DatasetWriter(out, meta)
    try:
        for split, files in books.items():
            words = 0
            for path in files:
                text = _read(path)
                words += len(text.split())
                writer.append(split, np.asarray(tokenizer.encode(text).ids + [eos], dtype=np.int64))
            meta.splits[split]["words"] = words
        writer.add_file("tokenizer.json", tokenizer.to_str())
        meta.extra["tokenizer"] = f"byte-level BPE ({size} ids, HuggingFace tokenizers); tokenizer.json"
        return writer.commit()
    except BaseException:
        writer.abort()
        raise
