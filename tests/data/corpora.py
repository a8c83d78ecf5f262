"""Tiny raw corpora in every supported format, written by the tests themselves."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

# Varied on purpose: non-ASCII (byte fallback), newlines and quotes inside the text, a
# whitespace-only text (tokenizes to nothing), long and short documents.
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Zero-computation experts: zero, copy and constant.\nSecond line, with \"quotes\".",
    "Überprüfung – naïve café, 東京, emoji 🙂.",
    "a",
    "Mixture-of-Experts " * 40,
    "def f(x):\n    return x + 1\n",
]

FORMATS = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".parquet")


def write_lines(path: Path, lines: list[str | bytes]) -> Path:
    """Write raw JSON lines, compressed as the suffix says (.zst as two frames)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    if path.name.endswith(".gz"):
        data = gzip.compress(data)
    elif path.name.endswith(".zst"):
        import zstandard

        half = len(data) // 2  # two concatenated frames, like sharded zstd dumps
        compressor = zstandard.ZstdCompressor()
        data = compressor.compress(data[:half]) + compressor.compress(data[half:])
    path.write_bytes(data)
    return path


def write_records(path: Path, records: list[dict], row_group_size: int | None = None) -> Path:
    """Write records in the format of ``path``'s suffix (parquet: ``text`` column)."""
    if path.name.endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        path.parent.mkdir(parents=True, exist_ok=True)
        table = pa.table({"text": [r.get("text") for r in records]})
        pq.write_table(table, path, row_group_size=row_group_size)
        return path
    return write_lines(path, [json.dumps(r) for r in records])


def write_texts(path: Path, texts: list[str] = TEXTS, **kwargs) -> Path:
    return write_records(path, [{"text": t, "id": i} for i, t in enumerate(texts)], **kwargs)


def cut_short(path: Path, fraction: float = 0.5) -> Path:
    """Keep the first ``fraction`` of the file's bytes, like a download that stopped."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path
