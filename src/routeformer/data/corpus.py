"""The built-in corpus: the running Python's standard library source, as bytes. Needs no network.

Files: every *.py under sysconfig.get_paths()["stdlib"], sorted by relative path (POSIX form), skipping
any path with a directory named test, tests, idle_test, site-packages, dist-packages or __pycache__.
Each file is preceded by the header line "# ==== file: <relative path> ====\n" and followed by "\n".
Whole files are taken in order until the next would pass `max_bytes` (default 16 MB; CPython 3.11 gives
about 12 MB). The split is 90/5/5 contiguous, like enwik8, so validation and test are files that were
not trained on. The corpus differs between Python versions: meta.json records the version and the
sha256 of the concatenation.
"""
from __future__ import annotations

import hashlib
import sys
import sysconfig
from pathlib import Path

EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
DEFAULT_MAX_BYTES = 16 * 2**20


def stdlib_files(root: str | Path | None = None) -> list[tuple[str, Path]]:
    root = Path(root or sysconfig.get_paths()["stdlib"])
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.isdisjoint(rel.parts[:-1]) and path.is_file():
            found.append((rel.as_posix(), path))
    return sorted(found)


def stdlib_corpus(max_bytes: int = DEFAULT_MAX_BYTES, root: str | Path | None = None) -> tuple[bytes, dict]:
    """(corpus bytes, provenance dict)."""
    parts, total, count = [], 0, 0
    files = stdlib_files(root)
    if not files:
        raise ValueError(f"found no Python files under {root or sysconfig.get_paths()['stdlib']}")
    for rel, path in files:
        chunk = f"# ==== file: {rel} ====\n".encode() + path.read_bytes() + b"\n"
        if total + len(chunk) > max_bytes:
            if not parts:
                raise ValueError(f"--max-bytes {max_bytes} is smaller than the corpus's first file ({rel}, "
                                 f"{len(chunk):,} bytes with its header): raise it to at least {len(chunk)}")
            break
        parts.append(chunk)
        total += len(chunk)
        count += 1
    data = b"".join(parts)
    info = {
        "source": "Python standard library",
        "python": sys.version.split()[0],
        "files": count,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }
    return data, info
