"""Documents out of raw corpora: JSON lines (plain, gzip, zstd) and parquet.

``read_documents(path)`` yields one :class:`Document` per record, streaming: a JSON-lines
file is read line by line, a parquet file a batch of rows at a time, never whole. Dolma
ships JSON lines under a ``.json.gz`` name, so that suffix reads as JSON lines too.

A record that cannot be used (a line that is not JSON, not an object, or has no string in
the text field) is skipped and noted in a :class:`SkipLog` with its file and line; with
``strict=True`` it raises :class:`MalformedRecordError` naming ``file:line`` instead.
Blank lines are not records. A compressed file that ends early or does not decompress (a
download cut short, a bad CRC) keeps the records read before the damage and is noted as
damaged, naming the line where it happened (with ``strict=True``, the same error). A parquet
file without the text column, or whose column is not a string column, is an error whatever
``strict`` says: no row of it could be used.

Parquet needs pyarrow (the ``data`` extra): ``check_readers`` says so before anything is read.
"""

from __future__ import annotations

import glob
import gzip
import io
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

__all__ = [
    "SUPPORTED_SUFFIXES",
    "Document",
    "MalformedRecordError",
    "SkipLog",
    "SkippedRecord",
    "check_readers",
    "expand_inputs",
    "read_documents",
]

SUPPORTED_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz", ".parquet")

# Rows per parquet batch: bounded memory whatever the row-group size of the file.
_PARQUET_BATCH_ROWS = 1024
# Compressed bytes per zstd read.
_ZSTD_READ_BYTES = 1 << 17

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
    """How many records were skipped, the first ``keep`` of them with their reasons, and every
    damaged file (one skipped record each: the rest of the file)."""

    keep: int = 10
    count: int = 0
    first: list[SkippedRecord] = field(default_factory=list)
    damaged_files: list[SkippedRecord] = field(default_factory=list)

    def add(self, record: SkippedRecord, *, damaged_file: bool = False) -> None:
        self.count += 1
        if damaged_file:
            self.damaged_files.append(record)
        elif len(self.first) < self.keep:
            self.first.append(record)

    def report(self) -> list[str]:
        """The lines a command prints about what it skipped (none when nothing was)."""
        lines = []
        if self.count:
            lines.append(f"skipped records: {self.count:,}" + ("; the first ones:" if self.first else ""))
            lines += [f"  {record}" for record in self.first]
        if self.damaged_files:
            lines.append(f"damaged files, read up to the damage: {len(self.damaged_files)}")
            lines += [f"  {record}" for record in self.damaged_files]
        return lines


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


def check_readers(files: Iterable[Path]) -> None:
    """Raise ``ImportError`` with the install command when a file needs a missing package."""
    parquet = next((path for path in files if path.name.endswith(".parquet")), None)
    if parquet is not None:
        _import_pyarrow(parquet)


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
    number = 0
    with _open_binary(path) as stream:
        try:
            for number, raw in enumerate(stream, start=1):
                if not raw.strip():
                    continue
                text, problem = _text_of_line(raw, text_field)
                if problem is None:
                    yield Document(str(path), number, text)
                else:
                    _skip(SkippedRecord(str(path), number, problem), strict, skipped)
        except (EOFError, gzip.BadGzipFile, zlib.error, _ZstdDataError) as err:
            damage = f"damaged compressed file ({err}); nothing after this line is read"
            _skip(SkippedRecord(str(path), number + 1, damage), strict, skipped, damaged_file=True)


def _is_supported(path: Path) -> bool:
    return path.name.endswith(SUPPORTED_SUFFIXES)


def _skip(record: SkippedRecord, strict: bool, skipped: SkipLog, damaged_file: bool = False) -> None:
    if strict:
        raise MalformedRecordError(record)
    skipped.add(record, damaged_file=damaged_file)


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
        return io.BufferedReader(_ZstdFrames(open(path, "rb"), zstandard))
    return open(path, "rb")


class _ZstdDataError(Exception):
    """A zstd file that ends inside a frame or does not decompress."""


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of a file of zstd frames, one after another (concatenated
    shards are common). zstandard's own ``stream_reader`` ends quietly where a cut-short file
    ends, in the middle of a frame; this raises :class:`_ZstdDataError` there instead."""

    def __init__(self, file: BinaryIO, zstandard) -> None:
        self._file = file
        self._error = zstandard.ZstdError
        # Long-window files are common (zstd --long).
        self._decompressor = zstandard.ZstdDecompressor(max_window_size=2**31)
        self._frame = self._decompressor.decompressobj()
        self._inside_frame = False
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self._pending:
            compressed = self._file.read(_ZSTD_READ_BYTES)
            if not compressed:
                if self._inside_frame:
                    raise _ZstdDataError("the file ends inside a zstd frame")
                return 0
            self._pending = memoryview(self._decompress(compressed))
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def _decompress(self, compressed: bytes) -> bytes:
        output = []
        while compressed:
            try:
                output.append(self._frame.decompress(compressed))
            except self._error as err:
                raise _ZstdDataError(str(err)) from err
            self._inside_frame = not self._frame.eof
            if self._frame.eof:  # a decompressobj takes one frame; what follows starts the next
                compressed = self._frame.unused_data
                self._frame = self._decompressor.decompressobj()
            else:
                compressed = b""
        return b"".join(output)

    def close(self) -> None:
        self._file.close()
        super().close()


def _import_pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as err:
        raise ImportError(
            f"{path}: reading parquet needs pyarrow, in the data extra: "
            "pip install -e \".[data]\" (or pip install pyarrow)"
        ) from err
    return pyarrow, pyarrow.parquet


def _read_parquet(
    path: Path, text_field: str, strict: bool, skipped: SkipLog
) -> Iterator[Document]:
    pa, pq = _import_pyarrow(path)
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
