"""moepp-preprocess: raw corpora -> megatron indexed datasets, read back with megatron."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from moepp_megatron.data import preprocess as preprocess_module
from moepp_megatron.data.preprocess import preprocess
from moepp_megatron.data.readers import MalformedRecordError
from tests.data.corpora import FORMATS, TEXTS, cut_short, write_lines, write_records, write_texts

EOS = 2


def _documents(prefix) -> list[list[int]]:
    dataset = IndexedDataset(str(prefix))
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))  # 1 sequence per doc
    return [dataset[i].tolist() for i in range(len(dataset))]


def _expected(sp_reference, texts, eos=True) -> list[list[int]]:
    encoded = [sp_reference.encode(t) for t in texts]
    return [ids + [EOS] * eos for ids in encoded if ids]


@pytest.mark.parametrize("suffix", FORMATS)
def test_round_trip_every_format(tmp_path, sp_model, sp_reference, suffix):
    texts = TEXTS + ["   "]  # whitespace only: no tokens, so not written
    path = write_texts(tmp_path / f"corpus{suffix}", texts)
    summary = preprocess([str(path)], tmp_path / "out" / "doc", sp_model)
    assert _documents(tmp_path / "out" / "doc") == _expected(sp_reference, texts)
    assert (summary.documents, summary.empty, summary.skipped.count) == (len(TEXTS), 1, 0)
    assert summary.tokens == sum(map(len, _expected(sp_reference, texts)))
    assert IndexedDataset(str(tmp_path / "out" / "doc")).index.dtype == np.uint16  # vocab 400


def test_several_inputs_no_eos_and_other_text_field(tmp_path, sp_model, sp_reference):
    first = write_records(tmp_path / "a.jsonl", [{"body": t} for t in TEXTS[:3]])
    second = write_records(tmp_path / "b.jsonl.zst", [{"body": t} for t in TEXTS[3:]])
    preprocess(
        [str(second), str(first)], tmp_path / "doc", sp_model, text_field="body", append_eos=False
    )
    expected = _expected(sp_reference, TEXTS[3:] + TEXTS[:3], eos=False)
    assert _documents(tmp_path / "doc") == expected


def test_malformed_lines_are_skipped_and_reported(tmp_path, sp_model, sp_reference):
    path = write_lines(
        tmp_path / "c.jsonl", ['{"text": "one"}', "{oops", '{"title": "x"}', '{"text": "two"}']
    )
    summary = preprocess([str(path)], tmp_path / "doc", sp_model)
    assert _documents(tmp_path / "doc") == _expected(sp_reference, ["one", "two"])
    assert summary.skipped.count == 2
    report = summary.format()
    assert f"{path}:2: not valid JSON" in report and f"{path}:3: no 'text' field" in report


def test_output_identical_for_any_worker_count(tmp_path, sp_model, monkeypatch):
    # Small chunks, so that 3 workers really share the work and can finish out of order.
    monkeypatch.setattr(preprocess_module, "_CHUNK_DOCS", 7)
    texts = [f"{TEXTS[i % len(TEXTS)]} number {i}" * (1 + i % 5) for i in range(400)]
    inputs = [
        str(write_texts(tmp_path / "a.jsonl", texts[:250])),
        str(write_texts(tmp_path / "b.parquet", texts[250:])),
    ]
    preprocess(inputs, tmp_path / "one", sp_model, workers=1)
    preprocess(inputs, tmp_path / "three", sp_model, workers=3)
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"one{suffix}").read_bytes()
        assert one == (tmp_path / f"three{suffix}").read_bytes()
    assert len(_documents(tmp_path / "three")) == 400


def _entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.mark.parametrize("workers", [1, 2])
def test_failure_late_in_the_input_leaves_nothing(tmp_path, sp_model, monkeypatch, workers):
    monkeypatch.setattr(preprocess_module, "_CHUNK_DOCS", 5)
    lines = [f'{{"text": "document {i}"}}' for i in range(200)] + ["{broken"]
    path = write_lines(tmp_path / "in" / "c.jsonl", lines)
    out = tmp_path / "out"
    with pytest.raises(MalformedRecordError, match=f"{path}:201"):
        preprocess([str(path)], out / "doc", sp_model, strict=True, workers=workers)
    assert _entries(out) == []


def test_interrupt_leaves_nothing_and_keeps_the_previous_output(tmp_path, sp_model, monkeypatch):
    path = write_texts(tmp_path / "c.jsonl")
    preprocess([str(path)], tmp_path / "out" / "doc", sp_model)
    before = {n: (tmp_path / "out" / n).read_bytes() for n in ("doc.bin", "doc.idx")}

    def interrupted(*args, **kwargs):
        yield from []
        raise KeyboardInterrupt

    monkeypatch.setattr(preprocess_module, "read_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess([str(path)], tmp_path / "out" / "doc", sp_model)
    assert _entries(tmp_path / "out") == ["doc.bin", "doc.idx"]
    assert {n: (tmp_path / "out" / n).read_bytes() for n in before} == before


def test_no_documents_is_an_error(tmp_path, sp_model):
    path = write_records(tmp_path / "c.jsonl", [{"title": "no text"}])
    with pytest.raises(ValueError, match="no documents with text"):
        preprocess([str(path)], tmp_path / "out" / "doc", sp_model)
    assert _entries(tmp_path / "out") == []


def _cli(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(
        [sys.executable, "-m", "moepp_megatron.data.preprocess", *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )


def test_cli_end_to_end(tmp_path, sp_model, sp_reference):
    write_texts(tmp_path / "raw" / "a.jsonl.gz")
    write_texts(tmp_path / "raw" / "b.parquet", TEXTS[:2])
    result = _cli(
        "--input", "raw", "--output-prefix", "data/src/src_text_document",
        "--tokenizer-model", str(sp_model), "--workers", "2", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "files: 2, documents: 8" in result.stdout
    assert "Warning" not in result.stderr
    prefix = tmp_path / "data" / "src" / "src_text_document"
    assert _documents(prefix) == _expected(sp_reference, TEXTS + TEXTS[:2])


def test_cli_a_file_cut_short_is_reported_and_strict_stops_at_it(tmp_path, sp_model, sp_reference):
    texts = [f"document {i} " * 20 for i in range(300)]
    cut = cut_short(write_texts(tmp_path / "cut.jsonl.gz", texts))
    write_texts(tmp_path / "whole.jsonl")
    kept = texts[: len(list(preprocess_module.read_documents(cut)))]
    damage = f"{len(kept) + 1}: damaged compressed file (Compressed file ended"
    result = _cli(
        "--input", "cut.jsonl.gz", "whole.jsonl", "--tokenizer-model", str(sp_model),
        "--output-prefix", "out/doc", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert f"    cut.jsonl.gz:{damage}" in result.stdout
    assert _documents(tmp_path / "out" / "doc") == _expected(sp_reference, kept + TEXTS)
    with pytest.raises(MalformedRecordError, match=f"^{re.escape(f'{cut}:{damage}')}"):
        preprocess([str(cut)], tmp_path / "strict" / "doc", sp_model, strict=True)
    assert _entries(tmp_path / "strict") == []


def test_cli_errors_are_one_line_with_nonzero_status(tmp_path, sp_model):
    write_texts(tmp_path / "a.jsonl")
    missing_model = _cli(
        "--input", "a.jsonl", "--output-prefix", "out", "--tokenizer-model", "no.model",
        cwd=tmp_path,
    )
    assert missing_model.returncode == 1
    assert missing_model.stderr.strip().splitlines() == [
        f"moepp-preprocess: error: tokenizer model not found: {tmp_path / 'no.model'}"
    ]
    usage = _cli("--input", "a.jsonl", cwd=tmp_path)
    assert usage.returncode == 2 and "--output-prefix" in usage.stderr
    assert _entries(tmp_path) == ["a.jsonl"]
