"""Downloads with integrity checks, and the errors a user sees when they fail.

`fetch` is the single place that touches the network (urllib; file:// URLs work too, which the tests
use). It writes to DEST.part and renames only after the size and checksum match.
"""
from __future__ import annotations

import base64
import hashlib
import os
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 20


class DownloadError(ValueError):
    """A download failed or did not verify; the message says how to proceed without the network."""


@dataclass(frozen=True)
class Source:
    """One canonical file. Checksums are those published with the file or used by well-known loaders;
    `size` alone where no checksum could be found (the docs say so)."""

    url: str
    filename: str
    size: int | None = None
    md5: str | None = None
    sha1: str | None = None
    sha256: str | None = None
    provenance: str = ""  # where the checksum comes from


def file_digest(path: str | os.PathLike, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def md5_from_gcs(value: str) -> str:
    """Google Cloud Storage lists md5Hash base64-encoded; hex is what file_digest returns."""
    return base64.b64decode(value).hex()


def verify(path: str | os.PathLike, source: Source) -> None:
    """Raise DownloadError unless the file at `path` has the source's size and checksums."""
    path = Path(path)
    size = path.stat().st_size
    if source.size is not None and size != source.size:
        raise DownloadError(
            f"{path} has {size} bytes but {source.filename} should have {source.size}: the file is "
            "truncated or a different version; delete it and download again"
        )
    for algorithm in ("md5", "sha1", "sha256"):
        expected = getattr(source, algorithm)
        if expected is not None:
            got = file_digest(path, algorithm)
            if got != expected.lower():
                raise DownloadError(
                    f"{path}: {algorithm} {got} does not match the expected {expected} of {source.filename}; "
                    "delete it and download again"
                )


# Some hosts (the Wikitext mirror among them) answer urllib's default "Python-urllib/3.x" with 403.
USER_AGENT = "routeformer/0.1 (dataset download)"


def _urlopen(url: str, timeout: float = 60.0):
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    return urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 (http(s) and file URLs by design)


def fetch(source: Source, dest_dir: str | os.PathLike, *, from_file_hint: str = "--from-file PATH") -> Path:
    """Download `source` into dest_dir (skipped when a verified copy is there) and return its path."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / source.filename
    dest.parent.mkdir(parents=True, exist_ok=True)  # filenames may hold folders (PG-19's train/123.txt)
    if dest.is_file():
        verify(dest, source)
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        with _urlopen(source.url) as response, open(part, "wb") as out:
            for chunk in iter(lambda: response.read(CHUNK), b""):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        part.unlink(missing_ok=True)
        reason = getattr(err, "reason", err)
        raise DownloadError(
            f"could not download {source.url} ({reason}). If this machine is offline, fetch the file "
            f"elsewhere and pass it with {from_file_hint}"
        ) from None
    try:
        verify(part, source)
    except DownloadError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def read_url(url: str) -> bytes:
    """Small reads (listings) with the same offline error as fetch."""
    try:
        with _urlopen(url) as response:
            return response.read()
    except (urllib.error.URLError, OSError, TimeoutError) as err:
        raise DownloadError(
            f"could not read {url} ({getattr(err, 'reason', err)}). If this machine is offline, fetch the "
            "data elsewhere and pass it with --from-file PATH"
        ) from None
