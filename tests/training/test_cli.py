"""moepp-train as a user meets it, through real processes: --dry-run prints the plan and
starts nothing; a config mistake is one line and exit 1, once even with two ranks;
--print-config is the resolved config; no known warning and no traceback on the way."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from moepp_megatron.config import load_config
from tests.bench.test_cli import LAUNCH_VARIABLES
from tests.training.runs import REPO, Job

pytestmark = pytest.mark.slow


def moepp_train(*args: str, env=None) -> subprocess.CompletedProcess:
    # Not the launch variables the session-wide single_process fixture may have set in this
    # process (WORLD_SIZE=1 would decide the world size of a --dry-run).
    clean = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return subprocess.run([sys.executable, "-m", "moepp_megatron.training.train", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**clean, **(env or {})})


def test_dry_run_prints_the_plan_and_starts_nothing(run_config, tmp_path):
    out = moepp_train("--dry-run", "--config", run_config())
    assert out.returncode == 0, out.stderr
    for expected in ("layout     2 processes = TP 1 x PP 1 x DP 2; EP 2", "parameters ", "active per token",
                     "GFLOP per token", "per rank", "50.0%", "epochs", f"run dir    {tmp_path / 'run'} (new run)"):
        assert expected in out.stdout
    assert "Warning" not in out.stderr and "warn" not in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()


def test_a_config_mistake_is_one_line_before_anything_starts(run_config):
    started = time.monotonic()
    out = moepp_train("--check", "--world-size", 2, "--config", run_config(), "optim.warmup_iters=8")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "error: optim.warmup_iters=8 must be smaller than the decay length (training iterations = 8)"
    ]
    print(f"error after {time.monotonic() - started:.1f} s")


def test_two_ranks_report_a_mistake_once(run_config, tmp_path):
    job = Job.ranks(run_config(), ["training.micro_batch_size=3"], tmp_path / "logs")
    assert job.wait(timeout=300) == [1, 1]
    output = job.output()
    assert output.count("error: ") == 1 and "micro_batch_size (3)" in output, output
    assert "Traceback" not in output


def test_print_config_is_the_resolved_config(run_config, tmp_path):
    out = moepp_train("--print-config", "--config", run_config(), "optim.lr=3e-4")
    assert out.returncode == 0, out.stderr
    (tmp_path / "resolved.yaml").write_text(out.stdout)
    resolved = load_config(tmp_path / "resolved.yaml")
    assert resolved.optim.lr == 3e-4 and resolved.data.cache_dir == str(tmp_path / "run" / "data_cache")
    assert resolved == load_config(run_config(), ["optim.lr=3e-4", f"data.cache_dir={tmp_path / 'run' / 'data_cache'}"])
