"""Files that survive a power cut and files checked against what was written."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_CHUNK = 8 << 20


def fsync_path(path: Path) -> None:
    """Flush a file's or a directory's content (a directory: the names in it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durably(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` atomically: written to a temporary file, flushed,
    renamed over the target, and the rename flushed too (the parent directory)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def sha256_of(path: Path, sync: bool = False) -> str:
    """The file's SHA-256 (hex); ``sync`` also flushes it to disk."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_CHUNK):
            sha.update(block)
        if sync:
            os.fsync(f.fileno())
    return sha.hexdigest()
