"""What makes a checkpoint directory trustworthy.

Every file of a checkpoint is recorded with its size and SHA-256 in ``checksums.json`` once
every rank has finished writing; the manifest is written last (before the tracker moves),
so its presence marks a complete checkpoint, and a checkpoint is loaded only when every
recorded file still has its recorded size and checksum. A shard damaged on disk (bytes
overwritten, truncated, deleted) is then named instead of loading as NaN weights two steps
later.

The hashing is spread over the ranks (each takes every world_size-th file), so saving or
verifying costs one extra read of the checkpoint divided by the number of ranks; each rank
flushes the files it hashes on save to disk.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch.distributed as dist

from moepp_megatron.files import sha256_of, write_durably

MANIFEST = "checksums.json"


def _digest(path: Path, sync: bool) -> dict:
    return {"bytes": path.stat().st_size, "sha256": sha256_of(path, sync=sync)}


def _files(directory: Path) -> list[str]:
    return sorted(
        str(p.relative_to(directory)) for p in directory.rglob("*")
        if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")
    )


def on_first_rank(action) -> None:
    """Collective: ``action()`` on rank 0 (a write to the shared directory); if it raises an
    OSError, every rank raises it (a rank failing alone would leave the others waiting)."""
    error = [None]
    if dist.get_rank() == 0:
        try:
            action()
        except OSError as e:
            error[0] = e
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise error[0]


def _my_share(names: list[str]) -> list[str]:
    return names[dist.get_rank()::dist.get_world_size()]


def _gather(value) -> list:
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def write_manifest(directory: Path) -> None:
    """Collective, after every rank has written its part: record (and flush) every file."""
    names = [None]
    if dist.get_rank() == 0:
        names[0] = _files(directory)
    dist.broadcast_object_list(names, src=0)
    mine = {name: _digest(directory / name, sync=True) for name in _my_share(names[0])}
    entries = {}
    for part in _gather(mine):
        entries.update(part)
    manifest = json.dumps({"files": dict(sorted(entries.items()))}, indent=1)
    on_first_rank(lambda: write_durably(directory / MANIFEST, manifest))


def is_complete(directory: Path) -> bool:
    return (directory / MANIFEST).is_file()


def recorded_bytes(directory: Path) -> int:
    """The checkpoint's size according to its manifest (0 without one)."""
    try:
        return sum(e["bytes"] for e in _read_manifest(directory).values())
    except (OSError, ValueError):
        return 0


def _read_manifest(directory: Path) -> dict:
    content = json.loads((directory / MANIFEST).read_text())
    files = content.get("files") if isinstance(content, dict) else None
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("bytes"), int) and isinstance(e.get("sha256"), str)
        for e in files.values()
    ):
        raise ValueError("not a table of files with 'bytes' and 'sha256'")
    return files


def _problem(directory: Path, name: str, entry: dict) -> Optional[str]:
    path = directory / name
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{path} has {size} bytes, {entry['bytes']} were saved"
    if sha256_of(path) != entry["sha256"]:
        return f"{path} is damaged (its SHA-256 differs from the one recorded when it was saved)"
    return None


def verify(directory: Path) -> list[str]:
    """Collective: what is wrong with the checkpoint, the same list on every rank (empty
    when every recorded file is intact)."""
    try:
        entries = _read_manifest(directory)
    except FileNotFoundError:
        problems = [f"{directory} is incomplete: no {MANIFEST} (its save did not finish)"]
    except (OSError, ValueError, UnicodeDecodeError) as e:
        problems = [f"{directory / MANIFEST} is unreadable ({e})"]
    else:
        problems = [p for name in _my_share(sorted(entries))
                    if (p := _problem(directory, name, entries[name])) is not None]
    return sorted({p for part in _gather(problems) for p in part})
