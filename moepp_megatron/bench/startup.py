"""Start-up time of every command: how long until ``--help`` prints, and until a mistake is
reported, each in a fresh process (median wall time of a few runs).

Commands are the package's console scripts (its installed entry points); the "mistake"
cases are what a new user runs into first: a config key that does not exist, a warmup
longer than the run, and a tokenizer file that is not there.
"""

from __future__ import annotations

import importlib.metadata
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from moepp_megatron.config.packaged import CONFIGS_DIR

TINY_CONFIG = str(CONFIGS_DIR / "tiny-cpu.yaml")


def mistakes(work_dir: Path) -> dict[str, list[str]]:
    corpus = work_dir / "corpus.jsonl"
    corpus.write_text('{"text": "a document"}\n')
    return {
        "moepp-train: unknown config key": ["moepp-train", "--config", TINY_CONFIG, "model.moe.nope=1"],
        "moepp-train: warmup longer than the run": [
            "moepp-train", "--check", "--config", TINY_CONFIG, "training.train_iters=10", "optim.warmup_iters=10",
        ],
        "moepp-preprocess: missing tokenizer": [
            "moepp-preprocess", "--input", str(corpus), "--output-prefix", str(work_dir / "out"),
            "--tokenizer-model", str(work_dir / "missing.model"),
        ],
    }


def console_scripts() -> list[str]:
    return sorted(
        ep.name for ep in importlib.metadata.distribution("moepp-megatron").entry_points
        if ep.group == "console_scripts"
    )


def time_command(argv: list[str], repeats: int) -> dict:
    """Median wall seconds of ``argv`` in fresh processes, and its exit status."""
    if shutil.which(argv[0]) is None:
        return {"argv": argv, "missing": True}
    times, code = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        code = subprocess.run(argv, capture_output=True).returncode
        times.append(time.perf_counter() - start)
    return {"argv": argv, "exit_code": code, "seconds": statistics.median(times), "runs": times}


def bench(repeats: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        cases = {f"{name} --help": [name, "--help"] for name in console_scripts()} | mistakes(Path(tmp))
        return [_time_case(case, argv, repeats) for case, argv in cases.items()]


def _time_case(case: str, argv: list[str], repeats: int) -> dict:
    row = {"case": case, **time_command(argv, repeats)}
    shown = "not installed" if row.get("missing") else f"{row['seconds']:.2f} s (exit {row['exit_code']})"
    print(f"{case:45s} {shown}", flush=True)
    return row
