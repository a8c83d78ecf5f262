"""Reading documents out of raw corpora, and what happens to records that cannot be used."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from moepp_megatron.data import readers
from moepp_megatron.data.readers import (
    MalformedRecordError,
    SkipLog,
    check_readers,
    expand_inputs,
    read_documents,
)
from tests.data.corpora import FORMATS, TEXTS, cut_short, write_lines, write_records, write_texts


@pytest.mark.parametrize("suffix", FORMATS)
def test_every_format_yields_its_texts_in_order(tmp_path, suffix):
    path = write_texts(tmp_path / f"corpus{suffix}")
    documents = list(read_documents(path))
    assert [d.text for d in documents] == TEXTS
    assert [d.line for d in documents] == list(range(1, len(TEXTS) + 1))
    assert {d.path for d in documents} == {str(path)}


def test_text_field_is_configurable(tmp_path):
    path = write_records(tmp_path / "c.jsonl", [{"content": "abc", "text": 1}])
    assert [d.text for d in read_documents(path, text_field="content")] == ["abc"]


# (line, content, reason) -- line numbers count blank lines too.
_BAD_LINES = [
    (2, "{not json", "not valid JSON"),
    (4, json.dumps({"body": "no text field"}), "no 'text' field"),
    (5, json.dumps({"text": 42}), "'text' is int, not a string"),
    (6, json.dumps({"text": None}), "'text' is NoneType, not a string"),
    (7, json.dumps(["a", "list"]), "not a JSON object"),
    (8, b'{"text": "\xff\xfe"}', "not valid JSON"),  # not UTF-8
]


def _corpus_with_bad_lines(path):
    lines = [json.dumps({"text": "good one"})] + [""] * 7 + [json.dumps({"text": "good two"})]
    for line, content, _ in _BAD_LINES:
        lines[line - 1] = content
    lines[2] = "   "  # a blank line is no record, hence not skipped either
    return write_lines(path, lines)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.zst"])
def test_malformed_lines_are_counted_with_file_and_line(tmp_path, suffix):
    path = _corpus_with_bad_lines(tmp_path / f"bad{suffix}")
    skipped = SkipLog(keep=3)
    documents = list(read_documents(path, skipped=skipped))
    assert [(d.line, d.text) for d in documents] == [(1, "good one"), (9, "good two")]
    assert skipped.count == len(_BAD_LINES)
    first_three = [(str(path), line) for line, _, _ in _BAD_LINES[:3]]
    assert [(r.path, r.line) for r in skipped.first] == first_three
    for record, (_, _, reason) in zip(skipped.first, _BAD_LINES):
        assert reason in record.reason
        assert str(record).startswith(f"{path}:{record.line}: ")


def test_strict_mode_raises_at_the_first_malformed_line(tmp_path):
    path = _corpus_with_bad_lines(tmp_path / "bad.jsonl.gz")
    reader = read_documents(path, strict=True)
    assert next(reader).text == "good one"
    with pytest.raises(MalformedRecordError, match=f"^{path}:2: not valid JSON"):
        next(reader)


def test_strict_mode_raises_on_missing_text_field(tmp_path):
    path = write_records(tmp_path / "c.jsonl", [{"text": "ok"}, {"title": "no text"}])
    with pytest.raises(MalformedRecordError, match=f"{path}:2: no 'text' field"):
        list(read_documents(path, strict=True))


# .zst: cut inside the second of its two frames.
@pytest.mark.parametrize("suffix, fraction", [(".jsonl.gz", 0.5), (".jsonl.zst", 0.75)])
def test_a_file_cut_short_keeps_the_records_before_the_cut(tmp_path, suffix, fraction):
    texts = [f"document {i} " * 20 for i in range(300)]
    path = cut_short(write_texts(tmp_path / f"c{suffix}", texts), fraction)
    skipped = SkipLog(keep=0)
    documents = list(read_documents(path, skipped=skipped))
    assert 0 < len(documents) < len(texts)
    assert [d.text for d in documents] == texts[: len(documents)]
    assert skipped.count == 1 and skipped.first == []  # listed whatever keep says
    [damaged] = skipped.damaged_files
    cut = len(documents) + 1
    assert str(damaged).startswith(f"{path}:{cut}: damaged compressed file (")
    assert skipped.report()[-2:] == ["damaged files, read up to the damage: 1", f"  {damaged}"]
    with pytest.raises(MalformedRecordError, match=f"^{path}:{cut}: damaged compressed file"):
        list(read_documents(path, strict=True))


def test_a_gzip_checksum_error_is_reported_after_the_records(tmp_path):
    path = write_texts(tmp_path / "c.jsonl.gz")
    data = bytearray(path.read_bytes())
    data[-8] ^= 0xFF  # the trailer's CRC-32
    path.write_bytes(data)
    skipped = SkipLog()
    assert [d.text for d in read_documents(path, skipped=skipped)] == TEXTS
    assert [r.line for r in skipped.damaged_files] == [len(TEXTS) + 1]
    assert "CRC check failed" in skipped.damaged_files[0].reason


# 3 bytes: frames span many reads; 1 MB: one read holds both frames.
@pytest.mark.parametrize("read_bytes", [3, 1 << 20])
def test_zstd_frames_whatever_the_read_size(tmp_path, monkeypatch, read_bytes):
    monkeypatch.setattr(readers, "_ZSTD_READ_BYTES", read_bytes)
    path = write_texts(tmp_path / "c.jsonl.zst")  # two frames
    skipped = SkipLog()
    assert [d.text for d in read_documents(path, skipped=skipped)] == TEXTS
    assert skipped.count == 0


def test_parquet_without_pyarrow_is_refused_before_reading(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # as if not installed
    check_readers([Path("a.jsonl")])
    with pytest.raises(ImportError, match=r'^b.parquet: .*pip install -e "\.\[data\]"'):
        check_readers([Path("a.jsonl"), Path("b.parquet")])


def test_parquet_with_many_row_groups(tmp_path):
    import pyarrow.parquet as pq

    texts = [f"document {i}" for i in range(2500)]
    path = write_texts(tmp_path / "c.parquet", texts, row_group_size=300)
    assert pq.ParquetFile(path).num_row_groups == 9
    documents = list(read_documents(path))
    assert [d.text for d in documents] == texts
    assert documents[-1].line == 2500


def test_parquet_null_text_is_skipped_with_row_number(tmp_path):
    path = write_records(tmp_path / "c.parquet", [{"text": "a"}, {"text": None}, {"text": "b"}])
    skipped = SkipLog()
    assert [d.text for d in read_documents(path, skipped=skipped)] == ["a", "b"]
    assert [str(r) for r in skipped.first] == [f"{path}:2: 'text' is null"]
    with pytest.raises(MalformedRecordError, match=f"{path}:2"):
        list(read_documents(path, strict=True))


def test_parquet_without_the_text_column_is_an_error(tmp_path):
    path = write_texts(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match=f"{path}: no column 'body'; columns: \\['text'\\]"):
        list(read_documents(path, text_field="body"))


def test_expand_inputs(tmp_path):
    for name in ("b.jsonl", "a.parquet", "sub/c.json.gz", "sub/notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    names = lambda paths: [str(p.relative_to(tmp_path)) for p in paths]  # noqa: E731
    assert names(expand_inputs([str(tmp_path)])) == ["a.parquet", "b.jsonl", "sub/c.json.gz"]
    assert names(expand_inputs([f"{tmp_path}/*.jsonl", str(tmp_path / "a.parquet")])) == [
        "b.jsonl",
        "a.parquet",
    ]
    assert names(expand_inputs([f"{tmp_path}/**/*.gz", str(tmp_path / "sub")])) == ["sub/c.json.gz"]
    with pytest.raises(FileNotFoundError, match="missing"):
        expand_inputs([str(tmp_path / "missing*.jsonl")])
    with pytest.raises(ValueError, match="unsupported file type"):
        expand_inputs([str(tmp_path / "sub/notes.txt")])
