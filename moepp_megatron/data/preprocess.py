"""moepp-preprocess: raw corpora -> one Megatron indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

    moepp-preprocess --input raw/pile/train --output-prefix data/pile/pile_text_document \\
        --tokenizer-model tokenizer.model --workers 32

Every record is one document (megatron's document boundaries), its text tokenized with the
sentencepiece model and followed by EOS (``--no-append-eos`` drops it). A record whose text
tokenizes to nothing is not written (counted as empty). Inputs are files, directories
(searched recursively) or globs of ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, ``.json.gz`` and
``.parquet`` files, read in sorted order; see :mod:`moepp_megatron.data.readers` for what a
malformed record is and how ``--strict`` treats it.

Reading happens in this process; tokenizing in ``--workers`` processes, a bounded number of
chunks ahead of the writer and written back in input order, so the output is byte-identical
for any worker count. (``Pool.imap`` would do the same ordering, but its feeder thread reads
the whole input ahead of the workers, into memory.) The files are written under temporary
names next to the output and renamed at the very end: an error or Ctrl-C leaves neither the
new output nor temporary files behind.

Exit status: 0 on success, 1 with a one-line message on error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import signal
import sys
import secrets
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from moepp_megatron.data.cli import add_input_arguments, run
from moepp_megatron.data.readers import (
    Document,
    SkipLog,
    check_readers,
    expand_inputs,
    read_documents,
)
from moepp_megatron.known_warnings import ignore_known_warnings

__all__ = ["PreprocessSummary", "main", "preprocess"]

# A chunk (the unit of work of a tokenizer process) closes at this many characters or
# documents, whichever comes first; at most 2 chunks per worker are in flight.
_CHUNK_CHARS = 1 << 20
_CHUNK_DOCS = 1024


@dataclass
class PreprocessSummary:
    prefix: str
    files: list[str]
    documents: int = 0
    tokens: int = 0
    empty: int = 0
    skipped: SkipLog = field(default_factory=SkipLog)
    seconds: float = 0.0

    def format(self) -> str:
        lines = [
            f"wrote {self.prefix}.bin and {self.prefix}.idx in {self.seconds:.1f} s",
            f"  files: {len(self.files)}, documents: {self.documents:,}, tokens: {self.tokens:,}",
        ]
        if self.empty:
            lines.append(f"  empty documents (no tokens, not written): {self.empty:,}")
        lines += [f"  {line}" for line in self.skipped.report()]
        return "\n".join(lines)


def preprocess(
    inputs: Sequence[str],
    output_prefix: str | os.PathLike,
    tokenizer_model: str | os.PathLike,
    *,
    text_field: str = "text",
    workers: int = 1,
    strict: bool = False,
    append_eos: bool = True,
    progress: bool = False,
) -> PreprocessSummary:
    """Tokenize ``inputs`` into ``output_prefix``.bin/.idx (see the module docstring)."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    start = time.monotonic()
    # Missing inputs, readers or tokenizer are reported before megatron-core's import (seconds).
    files = expand_inputs(inputs)
    check_readers(files)
    if not Path(tokenizer_model).expanduser().is_file():
        raise FileNotFoundError(f"tokenizer model not found: {Path(tokenizer_model).expanduser().resolve()}")
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    from moepp_megatron.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_model)  # fail on a bad model before reading anything
    prefix = Path(output_prefix).expanduser().absolute()
    prefix.parent.mkdir(parents=True, exist_ok=True)
    summary = PreprocessSummary(prefix=str(prefix), files=[str(f) for f in files])
    meter = _Progress(len(files), enabled=progress)

    def documents() -> Iterator[Document]:
        for number, path in enumerate(files, start=1):
            meter.file = number
            yield from read_documents(
                path, text_field=text_field, strict=strict, skipped=summary.skipped
            )

    encoder = _Encoder(tokenizer, append_eos, DType.optimal_dtype(tokenizer.vocab_size))
    with _atomic_outputs(prefix) as (bin_path, idx_path):
        builder = IndexedDatasetBuilder(bin_path, dtype=encoder.dtype)
        try:
            for tokens, lengths in _encode_in_order(_chunks(documents()), encoder, workers):
                _add_documents(builder, tokens, lengths, summary)
                meter.show(summary)
            if summary.documents == 0:
                raise ValueError(
                    f"no documents with text in {len(files)} input file(s) (skipped records: "
                    f"{summary.skipped.count}, empty: {summary.empty}); is --text-field right?"
                )
        except BaseException:
            builder.data_file.close()
            raise
        builder.finalize(idx_path)
    meter.close(summary)
    summary.seconds = time.monotonic() - start
    return summary


def _add_documents(
    builder, tokens: np.ndarray, lengths: np.ndarray, summary: PreprocessSummary
) -> None:
    offset = 0
    for length in lengths.tolist():
        if length == 0:
            summary.empty += 1
            continue
        builder.add_document(tokens[offset : offset + length], [length])
        offset += length
        summary.documents += 1
        summary.tokens += length


@contextlib.contextmanager
def _atomic_outputs(prefix: Path):
    """Temporary .bin/.idx paths next to ``prefix``; renamed into place only on success."""
    hidden = prefix.parent / f".{prefix.name}.{secrets.token_hex(4)}"
    bin_tmp, idx_tmp = f"{hidden}.bin.tmp", f"{hidden}.idx.tmp"
    try:
        yield bin_tmp, idx_tmp
    except BaseException:
        for path in (bin_tmp, idx_tmp):
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
        raise
    # An old .idx goes first, so readers see either a complete pair or a missing file
    # (megatron checks both exist), never a new .bin with an old .idx.
    with contextlib.suppress(FileNotFoundError):
        os.remove(f"{prefix}.idx")
    os.replace(bin_tmp, f"{prefix}.bin")
    os.replace(idx_tmp, f"{prefix}.idx")


def _chunks(documents: Iterable[Document]) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for document in documents:
        chunk.append(document.text)
        size += len(document.text)
        if size >= _CHUNK_CHARS or len(chunk) >= _CHUNK_DOCS:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


class _Encoder:
    """Texts -> (all token ids concatenated, length per text). Picklable (the tokenizer is)."""

    def __init__(self, tokenizer, append_eos: bool, dtype: type[np.number]) -> None:
        self.tokenizer = tokenizer
        self.eos = [tokenizer.eos_id] if append_eos else []
        self.dtype = dtype

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        flat: list[int] = []
        lengths = np.empty(len(texts), dtype=np.int64)
        for i, text in enumerate(texts):
            ids = self.tokenizer.encode(text)
            if ids:
                ids += self.eos
            flat += ids
            lengths[i] = len(ids)
        return np.asarray(flat, dtype=self.dtype), lengths


_worker_encoder: _Encoder | None = None


def _init_worker(encoder: _Encoder) -> None:
    # Ctrl-C reaches the whole process group; the parent alone handles it and ends the pool.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    global _worker_encoder
    _worker_encoder = encoder


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return _worker_encoder(texts)


def _encode_in_order(chunks: Iterator[list[str]], encoder: _Encoder, workers: int):
    if workers == 1:
        yield from map(encoder, chunks)
        return
    with multiprocessing.Pool(workers, initializer=_init_worker, initargs=(encoder,)) as pool:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 2 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class _Progress:
    """One status line on stderr: redrawn in place on a terminal, else every 30 s."""

    def __init__(self, num_files: int, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = enabled and sys.stderr.isatty()
        self.num_files = num_files
        self.file = 0
        self.start = self.last = time.monotonic()

    def show(self, summary: PreprocessSummary, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.5 if self.tty else 30.0)):
            return
        self.last = now
        rate = summary.documents / max(now - self.start, 1e-9)
        line = (
            f"file {self.file}/{self.num_files}  documents {summary.documents:,}  "
            f"tokens {summary.tokens:,}  skipped {summary.skipped.count:,}  {rate:,.0f} docs/s"
        )
        sys.stderr.write(f"\r{line}\033[K" if self.tty else f"{line}\n")
        sys.stderr.flush()

    def close(self, summary: PreprocessSummary) -> None:
        self.show(summary, force=True)
        if self.tty:
            sys.stderr.write("\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="moepp-preprocess",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_input_arguments(parser)
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    parser.add_argument("--tokenizer-model", required=True, help="sentencepiece .model file")
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    parser.add_argument(
        "--no-append-eos", dest="append_eos", action="store_false",
        help="do not end every document with the EOS token",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    ignore_known_warnings()
    return run("moepp-preprocess", lambda: preprocess(
        args.input,
        args.output_prefix,
        args.tokenizer_model,
        text_field=args.text_field,
        workers=args.workers,
        strict=args.strict,
        append_eos=args.append_eos,
        progress=True,
    ))


if __name__ == "__main__":
    sys.exit(main())
