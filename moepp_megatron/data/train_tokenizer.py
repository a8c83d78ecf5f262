"""moepp-tokenizer train: a sentencepiece tokenizer for your own corpus (``PREFIX.model`` and
``PREFIX.vocab``).

    moepp-tokenizer train --input raw/code raw/web --output-prefix data/tokenizer \\
        --vocab-size 32000

Inputs are what moepp-preprocess reads: files, directories (searched recursively) or globs of
``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst``, ``.json.gz`` and ``.parquet`` files, ``--text-field``
naming the text, malformed records and damaged files counted and reported (``--strict`` makes
them fatal); see :mod:`moepp_megatron.data.readers`.

Reading stops at ``--max-chars`` characters of text or ``--max-documents`` documents:
sentencepiece holds about 20 bytes of memory per character it trains on. The budget is
spread over the files, each taking its share of what is left, so that the sample spans every
input rather than the first few.

The model is the kind the rest of the package takes (moepp-preprocess, training, the Hugging
Face export): LLaMA-2 style BPE with byte fallback (no text is unknown), unk/bos/eos ids
0/1/2 and no pad. By default it is lossless like LLaMA-2's, which code needs: no Unicode
normalisation, and spaces, tabs and newlines kept (runs of spaces become whitespace-only
pieces, so indentation is cheap), hence ``decode(encode(text)) == text``.
``--fold-whitespace`` gives sentencepiece's defaults instead (NFKC; newlines and runs of
spaces folded into one space): fine for prose, lossy for code.

The same inputs, options and ``--threads`` give the same model (the thread count changes it).
Both files are written under temporary names next to the output and renamed at the end.

Exit status: 0 on success, 1 with a one-line message on error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from moepp_megatron.data.cli import add_input_arguments, run
from moepp_megatron.data.readers import (
    Document,
    SkipLog,
    check_readers,
    expand_inputs,
    read_documents,
)

__all__ = ["TokenizerSummary", "main", "train_sentencepiece", "train_tokenizer"]

# LLaMA-2's layout, which megatron's tokenizer and the Hugging Face export expect.
_LLAMA_STYLE = dict(model_type="bpe", byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
# No normaliser (sentencepiece's default one turns newlines into spaces), no whitespace
# folding; split_by_whitespace stays on, so indentation and words are separate pieces.
_KEEP_WHITESPACE = dict(
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    allow_whitespace_only_pieces=True,
)
# sentencepiece drops a "sentence" over 4192 bytes (max_sentence_length); text is fed in
# pieces of at most this many characters, 4 bytes each at most in UTF-8.
_SENTENCE_CHARS = 1024


def train_sentencepiece(
    texts: Iterable[str],
    model_path: str | os.PathLike,
    vocab_size: int,
    *,
    keep_whitespace: bool = True,
    threads: int = 1,
) -> Path:
    """Train on ``texts`` and write ``model_path`` (a ``.model``) and the ``.vocab`` beside it."""
    import sentencepiece as spm

    model_path = Path(model_path)
    model_path.parent.mkdir(parents=True, exist_ok=True)
    options = {**_LLAMA_STYLE, **(_KEEP_WHITESPACE if keep_whitespace else {})}
    sentences = (piece for text in texts for piece in _sentences(text, keep_whitespace))
    with tempfile.TemporaryDirectory(prefix=f".{model_path.name}.", dir=model_path.parent) as scratch:
        model_tmp, vocab_tmp = Path(scratch) / "sp.model", Path(scratch) / "sp.vocab"
        # A model_writer rather than a model_prefix, which the model file would record.
        with open(model_tmp, "wb") as model_file:
            try:
                spm.SentencePieceTrainer.train(
                    sentence_iterator=sentences, model_writer=model_file, vocab_size=vocab_size,
                    num_threads=threads, minloglevel=2, **options,
                )
            except RuntimeError as err:
                raise ValueError(f"sentencepiece: {_without_source_location(err)}") from err
        _write_vocab(spm.SentencePieceProcessor(model_file=str(model_tmp)), vocab_tmp)
        os.replace(vocab_tmp, model_path.with_suffix(".vocab"))
        os.replace(model_tmp, model_path)
    return model_path


def _write_vocab(processor, path: Path) -> None:
    """sentencepiece's ``.vocab``: "piece<TAB>score" per piece (C++ stream formatting)."""
    with open(path, "w", encoding="utf-8") as vocab:
        for i in range(processor.get_piece_size()):
            vocab.write(f"{processor.id_to_piece(i)}\t{processor.get_score(i):g}\n")


def _sentences(text: str, keep_whitespace: bool) -> Iterator[str]:
    if not keep_whitespace:
        # The normaliser turns newlines into spaces anyway: lines, as the recorded study's
        # tokenizer was trained (a line over the limit is dropped by sentencepiece).
        yield from (line for line in text.splitlines() if line.strip())
        return
    # Whole lines with their line ends, so that newlines and indentation are learnt.
    piece = ""
    for line in text.splitlines(keepends=True):
        if piece and len(piece) + len(line) > _SENTENCE_CHARS:
            yield piece
            piece = ""
        while len(line) > _SENTENCE_CHARS:
            yield line[:_SENTENCE_CHARS]
            line = line[_SENTENCE_CHARS:]
        piece += line
    if piece:
        yield piece


def _without_source_location(err: RuntimeError) -> str:
    """sentencepiece's message without its "INTERNAL: file.cc(123) [condition] " head."""
    return re.sub(r"^\w+: \S+\(\d+\) \[.*?\] ", "", str(err))


@dataclass
class TokenizerSummary:
    prefix: str
    files: list[str]
    vocab_size: int
    keep_whitespace: bool
    files_read: int = 0
    documents: int = 0
    chars: int = 0
    skipped: SkipLog = field(default_factory=SkipLog)
    seconds: float = 0.0

    def format(self) -> str:
        whitespace = "kept" if self.keep_whitespace else "folded"
        lines = [
            f"wrote {self.prefix}.model and {self.prefix}.vocab in {self.seconds:.1f} s",
            f"  {self.vocab_size:,} pieces (BPE, whitespace {whitespace}) from {self.documents:,} "
            f"documents, {self.chars:,} characters; files read: {self.files_read} of {len(self.files)}",
        ]
        lines += [f"  {line}" for line in self.skipped.report()]
        return "\n".join(lines)


def train_tokenizer(
    inputs: Sequence[str],
    output_prefix: str | os.PathLike,
    *,
    vocab_size: int = 32000,
    text_field: str = "text",
    max_documents: int | None = None,
    max_chars: int = 200_000_000,
    keep_whitespace: bool = True,
    strict: bool = False,
    threads: int = 1,
    progress: bool = False,
) -> TokenizerSummary:
    """Sample documents from ``inputs`` and train ``output_prefix``.model/.vocab on them."""
    for name, value in (("max_documents", max_documents), ("max_chars", max_chars), ("threads", threads)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    start = time.monotonic()
    files = expand_inputs(inputs)
    check_readers(files)
    prefix = Path(output_prefix).expanduser().absolute()
    summary = TokenizerSummary(str(prefix), [str(f) for f in files], vocab_size, keep_whitespace)
    texts = _sample(files, max_documents or sys.maxsize, max_chars, summary, text_field, strict, progress)
    if not texts:
        raise ValueError(
            f"no documents with text in {len(files)} input file(s) (skipped records: "
            f"{summary.skipped.count}); is --text-field right?"
        )
    if progress:
        print(
            f"training a {vocab_size:,}-piece tokenizer on {summary.documents:,} documents "
            f"({summary.chars:,} characters), {threads} thread(s)",
            file=sys.stderr,
        )
    train_sentencepiece(
        texts, f"{prefix}.model", vocab_size, keep_whitespace=keep_whitespace, threads=threads
    )
    summary.seconds = time.monotonic() - start
    return summary


def _sample(
    files: list[Path], max_documents: int, max_chars: int, summary: TokenizerSummary,
    text_field: str, strict: bool, progress: bool,
) -> list[str]:
    """Texts from the start of each file, every file taking its share of what is left."""
    texts: list[str] = []
    for number, path in enumerate(files, start=1):
        documents_left, chars_left = max_documents - summary.documents, max_chars - summary.chars
        if documents_left <= 0 or chars_left <= 0:
            break
        files_left = len(files) - number + 1
        documents = read_documents(path, text_field=text_field, strict=strict, skipped=summary.skipped)
        read = _take(documents, -(-documents_left // files_left), -(-chars_left // files_left))
        texts += read
        summary.files_read += 1
        summary.documents += len(read)
        summary.chars += sum(map(len, read))
        if progress:
            print(f"read {path} ({number}/{len(files)}): {len(read):,} documents", file=sys.stderr)
    return texts


def _take(documents: Iterator[Document], max_documents: int, max_chars: int) -> list[str]:
    """Texts until either count is reached (the last text may pass ``max_chars``)."""
    texts, chars = [], 0
    with contextlib.closing(documents):  # closes the file when the share ends early
        for document in documents:
            texts.append(document.text)
            chars += len(document.text)
            if len(texts) >= max_documents or chars >= max_chars:
                break
    return texts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="moepp-tokenizer", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = commands.add_parser(
        "train",
        help="train a sentencepiece BPE tokenizer on a corpus",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_input_arguments(train)
    train.add_argument(
        "--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab"
    )
    train.add_argument("--vocab-size", type=int, default=32000, help="pieces (default: %(default)s)")
    train.add_argument(
        "--max-chars", type=int, default=200_000_000,
        help="characters of text to train on, at most (default: %(default)s, about 4 GB of memory)",
    )
    train.add_argument("--max-documents", type=int, help="documents to train on, at most")
    train.add_argument(
        "--fold-whitespace", dest="keep_whitespace", action="store_false",
        help="NFKC-normalise and fold newlines and runs of spaces (prose only: lossy for code)",
    )
    train.add_argument(
        "--threads", type=int, default=1,
        help="sentencepiece training threads (the count changes the model; default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run("moepp-tokenizer", lambda: train_tokenizer(
        args.input,
        args.output_prefix,
        vocab_size=args.vocab_size,
        text_field=args.text_field,
        max_documents=args.max_documents,
        max_chars=args.max_chars,
        keep_whitespace=args.keep_whitespace,
        strict=args.strict,
        threads=args.threads,
        progress=True,
    ))


if __name__ == "__main__":
    sys.exit(main())
