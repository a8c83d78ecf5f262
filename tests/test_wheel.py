"""Installed like a library: a wheel in a fresh virtual environment, run from a directory
outside the repository, finds the packaged configs (a preset by name, its ``base:``, a
recipe and the data mixture as the README writes them)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moepp_megatron.config.packaged import CONFIGS_DIR
from tests.fixtures import tiny_sentencepiece

REPO = Path(__file__).resolve().parents[1]
# Without PYTHONPATH the checkout is not importable: only the wheel and the system's
# site-packages (torch, megatron-core) are.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def run(argv: list, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def install_wheel(tmp_path: Path) -> Path:
    """The venv's bin directory. The build reads a copy of the project, so that it leaves no
    build/ behind in the checkout; the venv sees the system's packages, where an editable
    moepp-megatron may be installed too: --force-reinstall puts the wheel in the venv."""
    source = tmp_path / "source"
    shutil.copytree(REPO / "moepp_megatron", source / "moepp_megatron", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", tmp_path / "wheel", source], tmp_path)
    run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", tmp_path / "venv"], tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("moepp_megatron-*.whl")
    run([*pip, "--python", tmp_path / "venv/bin/python", "install", "--no-deps", "--no-index", "--force-reinstall",
         wheel], tmp_path)
    return tmp_path / "venv" / "bin"


def mixture_data(root: Path) -> Path:
    """A tokenizer, and one small indexed dataset linked at every prefix of mixture S1."""
    from moepp_megatron.data.preprocess import preprocess

    tokenizer = tiny_sentencepiece(root)
    raw = root / "doc.jsonl"
    raw.write_text(json.dumps({"text": "zero computation experts " * 40}) + "\n")
    preprocess([str(raw)], root / "doc", tokenizer)
    for source in yaml.safe_load((CONFIGS_DIR / "data/mix-s1.yaml").read_text())["sources"]:
        prefix = root / source["prefix"]
        prefix.parent.mkdir(parents=True, exist_ok=True)
        for suffix in (".bin", ".idx"):
            prefix.with_name(prefix.name + suffix).symlink_to(root / f"doc{suffix}")
    return tokenizer


@pytest.mark.slow
def test_wheel_finds_packaged_configs_from_any_directory(tmp_path):
    bin_dir = install_wheel(tmp_path)
    work = tmp_path / "elsewhere"
    work.mkdir()
    probe = "import moepp_megatron.demo as d; print(d.__file__); print(d.CONFIG.is_file())"
    module, demo_config_found = run([bin_dir / "python", "-c", probe], work).stdout.split()
    assert Path(module).is_relative_to(tmp_path / "venv") and demo_config_found == "True"
    assert "usage: moepp-demo" in run([bin_dir / "moepp-demo", "--help"], work).stdout

    data = tmp_path / "data"
    tokenizer = mixture_data(data)
    plan = run([bin_dir / "moepp-train", "--dry-run", "--config", "moepp-0.6b-8+4e",
                "--config", "configs/recipes/strategy1.yaml", "parallel.cpu_mode=true",
                f"data.root={data}", f"data.tokenizer_model={tokenizer}"], work).stdout
    assert "12 layers, hidden 768, 8 FFN experts + 1 zero / 1 copy / 2 constant" in plan  # preset and base
    assert "100.00B tokens" in plan  # the recipe
    assert "7 training source(s)" in plan and "61.3%" in plan and f"{data}/dolma/dolma_text_document" in plan
