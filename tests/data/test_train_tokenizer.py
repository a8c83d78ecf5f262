"""moepp-tokenizer train: raw corpora -> a sentencepiece model that the package takes."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import sentencepiece as spm

from moepp_megatron.data.readers import read_documents
from moepp_megatron.data.tokenizer import load_tokenizer
from moepp_megatron.data.train_tokenizer import train_sentencepiece, train_tokenizer
from tests.data.corpora import TEXTS, cut_short, write_texts

REPO = Path(__file__).resolve().parents[2]
CODE = "def f(x):\n    return x"
# Real code: standard-library sources.
SOURCES = [inspect.getsource(module) for module in (argparse, dataclasses, textwrap)]


def _cli(*args, cwd, python_options=(), python_path=()):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, python_path), str(REPO)])}
    return subprocess.run(
        [sys.executable, *python_options, "-m", "moepp_megatron.data.train_tokenizer", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_cli_trains_a_lossless_model_that_training_loads(tmp_path):
    write_texts(tmp_path / "raw" / "code.jsonl.gz", SOURCES)
    write_texts(tmp_path / "raw" / "prose.parquet")
    result = _cli(
        "train", "--input", "raw", "--output-prefix", "out/tok", "--vocab-size", "400", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == [
        f"read raw/code.jsonl.gz (1/2): {len(SOURCES)} documents",
        f"read raw/prose.parquet (2/2): {len(TEXTS)} documents",
        f"training a 400-piece tokenizer on {len(SOURCES) + len(TEXTS)} documents "
        f"({sum(map(len, SOURCES + TEXTS)):,} characters), 1 thread(s)",
    ]
    assert f"wrote {tmp_path}/out/tok.model and {tmp_path}/out/tok.vocab" in result.stdout
    assert "400 pieces (BPE, whitespace kept)" in result.stdout
    assert _entries(tmp_path / "out") == ["tok.model", "tok.vocab"]
    assert (tmp_path / "out/tok.vocab").read_text().startswith("<unk>\t0\n<s>\t0\n</s>\t0\n")

    tokenizer = load_tokenizer(tmp_path / "out/tok.model")
    assert tokenizer.vocab_size == 400
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, -1)
    for text in [CODE, "\tx = 1\r\n\n  y  ", *TEXTS, SOURCES[2]]:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    reference = spm.SentencePieceProcessor(model_file=str(tmp_path / "out/tok.model"))
    assert "▁▁▁▁" in reference.encode(CODE, out_type=str)  # indentation is one piece


def test_fold_whitespace_loses_newlines_and_indentation(tmp_path):
    model = train_sentencepiece(SOURCES, tmp_path / "folded.model", 400, keep_whitespace=False)
    folded = spm.SentencePieceProcessor(model_file=str(model))
    assert folded.decode(folded.encode(CODE)) == "def f(x): return x"


def test_the_hugging_face_export_takes_the_model(tmp_path):
    from moepp_megatron.conversion.tokenizer import build_tokenizer, write_hf_tokenizer

    model = train_sentencepiece(SOURCES, tmp_path / "tok.model", 400)
    ids = write_hf_tokenizer(model, tmp_path, model_max_length=64)
    assert (ids.unk_id, ids.bos_id, ids.eos_id, ids.vocab_size) == (0, 1, 2, 400)
    reference = spm.SentencePieceProcessor(model_file=str(model))
    assert build_tokenizer(model).encode(CODE, add_special_tokens=False).ids == reference.encode(CODE)


@pytest.mark.parametrize(
    "limits, sample",
    [
        # (max_documents, max_chars) -> (documents, characters, files read). Every file takes
        # its share of what is left (rounded up); a document may pass the character budget.
        ((6, 10**6), (6, 3000, 3)),
        ((2, 10**6), (2, 1000, 2)),
        ((None, 2400), (5, 2500, 3)),
    ],
)
def test_the_sample_spreads_over_the_files(tmp_path, limits, sample):
    text = ("the quick brown fox jumps over the lazy dog; " * 12)[:500]
    inputs = [str(write_texts(tmp_path / f"{name}.jsonl", [text] * 20)) for name in "abc"]
    max_documents, max_chars = limits
    summary = train_tokenizer(
        inputs, tmp_path / "tok", vocab_size=300, max_documents=max_documents, max_chars=max_chars
    )
    assert (summary.documents, summary.chars, summary.files_read) == sample


@pytest.mark.parametrize("suffix, fraction", [(".jsonl.gz", 0.5), (".jsonl.zst", 0.75)])
def test_cli_reports_a_damaged_file_and_strict_stops_at_it(tmp_path, suffix, fraction):
    write_texts(tmp_path / "a.jsonl", SOURCES)
    texts = [f"text {i} " * 30 for i in range(200)]
    damaged = cut_short(write_texts(tmp_path / f"b{suffix}", texts), fraction)
    kept = len(list(read_documents(damaged)))
    args = ("train", "--input", "a.jsonl", damaged.name, "--vocab-size", "400")
    result = _cli(*args, "--output-prefix", "tok", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"from {len(SOURCES) + kept} documents" in result.stdout
    assert "  skipped records: 1\n  damaged files, read up to the damage: 1\n" in result.stdout
    assert f"    {damaged.name}:{kept + 1}: damaged compressed file (" in result.stdout

    strict = _cli(*args, "--output-prefix", "strict", "--strict", cwd=tmp_path)
    assert strict.returncode == 1
    error = strict.stderr.splitlines()[-1]
    assert error.startswith(f"moepp-tokenizer: error: {damaged.name}:{kept + 1}: damaged compressed file")
    assert not (tmp_path / "strict.model").exists()


def test_cli_errors_are_one_line_and_leave_nothing(tmp_path):
    write_texts(tmp_path / "a.jsonl")
    too_big = _cli("train", "--input", "a.jsonl", "--output-prefix", "out/tok", cwd=tmp_path)
    assert too_big.returncode == 1
    error = too_big.stderr.splitlines()[-1]
    assert error.startswith("moepp-tokenizer: error: sentencepiece: Vocabulary size too high (32000).")
    assert _entries(tmp_path / "out") == []

    wrong_field = _cli(
        "train", "--input", "a.jsonl", "--output-prefix", "tok", "--text-field", "body", cwd=tmp_path
    )
    assert wrong_field.returncode == 1
    assert wrong_field.stderr.splitlines()[-1] == (
        "moepp-tokenizer: error: no documents with text in 1 input file(s) (skipped records: "
        f"{len(TEXTS)}); is --text-field right?"
    )
    usage = _cli("--input", "a.jsonl", cwd=tmp_path)
    assert usage.returncode == 2 and "COMMAND" in usage.stderr


def test_cli_refuses_parquet_without_pyarrow_before_reading(tmp_path):
    write_texts(tmp_path / "a.jsonl")
    write_texts(tmp_path / "b.parquet")
    fake = tmp_path / "site" / "pyarrow"  # what Python finds first: a pyarrow that is not there
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'pyarrow'\")\n")
    result = _cli(
        "train", "--input", "a.jsonl", "b.parquet", "--output-prefix", "tok", cwd=tmp_path,
        python_path=[tmp_path / "site"],
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [  # one line, and no "read a.jsonl"
        'moepp-tokenizer: error: b.parquet: reading parquet needs pyarrow, in the data extra: '
        'pip install -e ".[data]" (or pip install pyarrow)'
    ]


@pytest.mark.parametrize("command", ["help", "train"])
def test_cli_imports_neither_torch_nor_megatron(tmp_path, command):
    write_texts(tmp_path / "a.jsonl", SOURCES)
    training = ["--input", "a.jsonl", "--output-prefix", "tok", "--vocab-size", "400"]
    args = ["--help"] if command == "help" else training
    result = _cli("train", *args, cwd=tmp_path, python_options=["-X", "importtime"])
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {
        line.rsplit("|", 1)[-1].strip().split(".")[0]
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "moepp_megatron" in imported
    assert ("sentencepiece" in imported) == (command == "train")
    assert not imported & {"torch", "megatron", "numpy"}
