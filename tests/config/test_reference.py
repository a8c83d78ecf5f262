"""docs/config.md: generated from the schema, every field explained, never stale."""

from __future__ import annotations

import dataclasses
import difflib
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal, Optional

import pytest

from moepp_megatron.config import reference
from moepp_megatron.config.reference import (
    DOC_PATH,
    REGENERATE,
    field_comments,
    fields_without_meaning,
    reference_markdown,
    sections,
    type_name,
)

REPO = Path(__file__).resolve().parents[2]


def test_docs_config_md_is_what_the_schema_generates():
    expected = reference_markdown()
    actual = DOC_PATH.read_text() if DOC_PATH.is_file() else ""
    if actual != expected:
        diff = difflib.unified_diff(
            actual.splitlines(), expected.splitlines(), "docs/config.md", "generated", lineterm="", n=1
        )
        pytest.fail(f"docs/config.md is stale; regenerate it with `{REGENERATE}`\n" + "\n".join(list(diff)[:40]))


def test_every_field_has_a_meaning_and_every_section_an_introduction():
    assert fields_without_meaning() == [], "write a comment directly above each of these fields in schema.py"


def test_sections_cover_the_tree_in_schema_order():
    paths = [", ".join(s.paths) for s in sections()]
    assert paths == [
        "", "model", "model.moe", "parallel", "data", "data.sources[], data.valid_sources[]",
        "optim", "training", "checkpoint", "logging",
    ]
    markdown = reference_markdown()
    assert markdown.index("`run_dir`") < markdown.index("`model.num_layers`") < markdown.index("`logging.wandb_mode`")


def test_rows_give_type_default_and_meaning():
    markdown = reference_markdown()
    assert "| `model.moe.capacity_factor` | `float \\| null` | `null` | gamma of Eq. 8" in markdown
    assert "| `model.moe.routing` | `one of paper, release` | `paper` |" in markdown
    assert "| `parallel.recompute` | `one of full, selective, null` | `null` |" in markdown
    assert "| `parallel.recompute_modules` | `list[str]` | `[moe]` |" in markdown
    assert "| `data.sources[].prefix` | `str` | `required` |" in markdown
    assert "| `optim.warmup_init_lr` | `float` | `1.0e-07` |" in markdown
    # The run's default, not the section class's: RunConfig() trains 1000 iterations.
    assert "| `training.train_iters` | `int \\| null` | `1000` |" in markdown


def test_type_names():
    assert type_name(int | list[int]) == "int | list[int]"
    assert type_name(Optional[float]) == "float | null"
    assert type_name(Literal["a", "b"]) == "one of a, b"
    assert type_name(Optional[Literal["a", "b"]]) == "one of a, b, null"
    assert type_name(list[str]) == "list[str]"


@dataclasses.dataclass
class _Commented:
    """For the comment parser."""

    # Two lines,
    # one meaning.
    joined: int = 1
    trailing: int = 2  # a comment at the end of a line is not a meaning
    # Detached by the blank line below.

    detached: int = 3
    text: str = """
    # inside a string"""
    after_string: int = 4
    # Above a method, not a field.

    def method(self) -> None:
        pass

    # The last one.
    last: Optional[int] = None


def test_field_comments_take_only_the_comment_lines_directly_above():
    assert field_comments(_Commented) == {
        "joined": "Two lines, one meaning.",
        "trailing": "",
        "detached": "",
        "text": "",
        "after_string": "",
        "last": "The last one.",
    }


def test_generator_imports_no_torch_and_regenerates_the_file(tmp_path, monkeypatch):
    code = (
        "import sys; from moepp_megatron.config.reference import reference_markdown; reference_markdown(); "
        "print(sorted(m for m in ('torch', 'megatron') if m in sys.modules))"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"

    target = tmp_path / "docs" / "config.md"
    monkeypatch.setattr(reference, "DOC_PATH", target)
    reference.main(["--write"])
    assert target.read_text() == reference_markdown()
