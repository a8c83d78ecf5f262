"""Documents out of raw corpora: JSON lines (plain, gzip, zstd) and parquet.

``read_documents(path)`` yields one :class:`Document` per record, streaming: a JSON-lines
file is read line by line, a parquet file a batch of rows at a time, never whole. Dolma
ships JSON lines under a ``.json.gz`` name, so that suffix reads as JSON lines too.

A record that cannot be used (a line that is not JSON, not an object, or has no string in
the text field) is skipped and noted in a :class:`SkipLog` with its file and line; with
``strict=True`` it raises :class:`MalformedRecordError` naming ``file:line`` instead.
Blank lines are not records. A parquet file without the text column, or whose column is
not a string column, is an error whatever ``strict`` says: no row of it could be used.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Document",
    "MalformedRecordError",
    "SkipLog",
    "SkippedRecord",
    "expand_inputs",
    "read_documents",
]

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".parquet")

# Rows per parquet batch: bounded memory whatever the row-group size of the file.
_PARQUET_BATCH_ROWS = 1024

_MISSING = object()


@dataclass(frozen=True)
class Document:
    """One record's text. ``line`` counts from 1: the line of a JSON-lines file, the row of a
    parquet file."""

    path: str
    line: int
    text: str


@dataclass(frozen=True)
class SkippedRecord:
    path: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.reason}"


class MalformedRecordError(ValueError):
    """A record that strict mode refuses; the message starts with ``file:line``."""

    def __init__(self, record: SkippedRecord) -> None:
        super().__init__(str(record))
        self.record = record


@dataclass
class SkipLog:
    """How many records were skipped, and the first ``keep`` of them with their reasons."""

    keep: int = 10
    count: int = 0
    first: list[SkippedRecord] = field(default_factory=list)

    def add(self, record: SkippedRecord) -> None:
        self.count += 1
        if len(self.first) < self.keep:
            self.first.append(record)


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files named by each input: a file, a directory (searched recursively for supported
    files) or a glob. Sorted within each input, duplicates dropped, order of inputs kept."""
    files: dict[Path, None] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _is_supported(p))
            if not found:
                raise FileNotFoundError(
                    f"{item}: directory holds no {'/'.join(SUPPORTED_SUFFIXES)} files"
                )
        elif path.is_file():
            if not _is_supported(path):
                raise ValueError(f"{item}: unsupported file type; supported: {SUPPORTED_SUFFIXES}")
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True))
            found = [p for p in found if p.is_file() and _is_supported(p)]
            if not found:
                raise FileNotFoundError(f"{item}: no such file, directory or matching glob")
        files.update(dict.fromkeys(found))
    return list(files)


def read_documents(
    path: str | os.PathLike,
    *,
    text_field: str = "text",
    strict: bool = False,
    skipped: SkipLog | None = None,
) -> Iterator[Document]:
    """Yield the documents of one file, in file order (see the module docstring)."""
    path = Path(path)
    if not _is_supported(path):
        raise ValueError(f"{path}: unsupported file type; supported: {SUPPORTED_SUFFIXES}")
    skipped = SkipLog() if skipped is None else skipped
    if path.name.endswith(".parquet"):
        yield from _read_parquet(path, text_field, strict, skipped)
        return
    with _open_binary(path) as stream:
        for number, raw in enumerate(stream, start=1):
            if not raw.strip():
                continue
            text, problem = _text_of_line(raw, text_field)
            if problem is None:
                yield Document(str(path), number, text)
            else:
                _skip(SkippedRecord(str(path), number, problem), strict, skipped)


def _is_supported(path: Path) -> bool:
    return path.name.endswith(SUPPORTED_SUFFIXES)


def _skip(record: SkippedRecord, strict: bool, skipped: SkipLog) -> None:
    if strict:
        raise MalformedRecordError(record)
    skipped.add(record)


def _text_of_line(raw: bytes, text_field: str) -> tuple[str | None, str | None]:
    """(text, None) for a usable line, else (None, why not)."""
    try:
        record = json.loads(raw)
    except ValueError as err:  # JSONDecodeError and UnicodeDecodeError
        return None, f"not valid JSON ({err})"
    if not isinstance(record, dict):
        return None, f"not a JSON object (a {type(record).__name__})"
    return _check_text(record.get(text_field, _MISSING), text_field)



def _check_text(value, text_field: str) -> tuple[str | None, str | None]:
    if value is _MISSING:
        return None, f"no {text_field!r} field"
    if not isinstance(value, str):
        return None, f"{text_field!r} is {type(value).__name__}, not a string"
    return value, None


def _open_binary(path: Path) -> BinaryIO:
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        try:
            import zstandard
        except ImportError as err:
            raise ImportError(
                f"{path}: reading .zst files needs zstandard: pip install zstandard"
            ) from err
        # Multi-frame files are common (concatenated shards); long-window ones too (zstd --long).
        reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(
            open(path, "rb"), read_across_frames=True, closefd=True
        )
        return io.BufferedReader(reader)
    return open(path, "rb")


def _read_parquet(
    path: Path, text_field: str, strict: bool, skipped: SkipLog
) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError(
            f"{path}: reading parquet needs pyarrow: pip install pyarrow "
            "(or pip install 'moepp-megatron[data]')"
        ) from err
    with pq.ParquetFile(path) as parquet:
        schema = parquet.schema_arrow
        if text_field not in schema.names:
            raise ValueError(f"{path}: no column {text_field!r}; columns: {schema.names}")
        column_type = schema.field(text_field).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise ValueError(f"{path}: column {text_field!r} holds {column_type}, not strings")
        number = 0
        for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
            for text in batch.column(0).to_pylist():
                number += 1
                if text is None:
                    null = SkippedRecord(str(path), number, f"{text_field!r} is null")
                    _skip(null, strict, skipped)
                else:
                    yield Document(str(path), number, text)
