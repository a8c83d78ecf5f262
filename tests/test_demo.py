"""The README's first command, shortened: the offline demo builds its data, trains with
EP=2 on 2 processes, stops half-way, resumes from the checkpoint and summarises."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "moepp_megatron.demo", "--workdir", str(tmp_path), "--steps", "40",
         "training.eval_interval=20", "checkpoint.save_interval=20", "logging.interval=5"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "resumed from" in result.stdout and "at iteration 20" in result.stdout
    assert "=== MoE++ demo summary ===" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "lm_loss" in r]
    assert [r["iteration"] for r in train] == list(range(5, 41, 5))
    assert train[-1]["lm_loss"] < train[0]["lm_loss"] - 1.0
    assert (tmp_path / "run/checkpoints/latest_checkpointed_iteration.txt").read_text().strip() == "40"
    for name in ("reference", "library", "builtins"):
        assert (tmp_path / f"data/{name}.bin").stat().st_size > 0
