"""Preemption: SIGTERM / SIGUSR1 sent to every process of a 2-rank ``moepp-train`` job (as
Slurm signals every process of a job step: DataLoader workers and dist_checkpointing's helper
processes included) finish the current step, save a checkpoint for it and exit with code 75;
running the job again resumes from that checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moepp_megatron.training.checkpointing import TRACKER, iteration_dir
from moepp_megatron.training.trainer import EXIT_PREEMPTED
from tests.distributed import find_free_port
from tests.training.runs import metric_records

REPO = Path(__file__).resolve().parents[2]
WORLD_SIZE = 2


def _launch(config: Path, overrides: list[str], logs: Path) -> list[subprocess.Popen]:
    """``python -m moepp_megatron.training.train`` once per rank, as torchrun would start them;
    each rank leads its own process group (the rank and every process it starts)."""
    port = find_free_port()
    ranks = []
    for rank in range(WORLD_SIZE):
        env = dict(
            os.environ, RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), MOEPP_CPU_MODE="1", OMP_NUM_THREADS="1",
        )
        with open(logs / f"rank{rank}.log", "w") as log:
            ranks.append(subprocess.Popen(
                [sys.executable, "-m", "moepp_megatron.training.train", "--config", str(config), *overrides],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))
    return ranks


def _signal_groups(ranks: list[subprocess.Popen], signum: int) -> None:
    for process in ranks:
        try:
            os.killpg(process.pid, signum)
        except ProcessLookupError:
            pass


def _wait(ranks: list[subprocess.Popen], logs: Path, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [process.wait(timeout=max(0.1, deadline - time.monotonic())) for process in ranks]
    except subprocess.TimeoutExpired:
        pytest.fail(f"the job did not exit within {timeout:.0f} s\n{_tail(logs)}")


def _tail(logs: Path) -> str:
    return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text().splitlines()[-25:])
                     for p in sorted(logs.glob("rank*.log")))


def _train_iterations(run_dir: Path) -> list[int]:
    return [r["iteration"] for r in metric_records(run_dir) if "lm_loss" in r]


def _logged(run_dir: Path, iteration: int) -> bool:
    try:
        return iteration in _train_iterations(run_dir)
    except (FileNotFoundError, ValueError):  # not written yet, or a line half-written
        return False


def _wait_for_iteration(run_dir: Path, iteration: int, ranks, logs: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _logged(run_dir, iteration):
            return
        if any(process.poll() is not None for process in ranks):
            pytest.fail(f"a rank exited before iteration {iteration}\n{_tail(logs)}")
        time.sleep(0.1)
    pytest.fail(f"iteration {iteration} not logged within {timeout:.0f} s\n{_tail(logs)}")


def _preempt(run_config, tmp_path, signum) -> tuple[Path, Path, int]:
    """Start the job and signal every process of it after iteration 3; check the exit codes
    and the checkpoint. Returns the config, the run directory and the last iteration."""
    # A periodic save before the signal (its helper process is running) and DataLoader workers:
    # both get the signal too, and neither may break the final checkpoint.
    config = run_config(
        "job", training={"train_iters": 200, "eval_interval": 1000},
        checkpoint={"save_interval": 2}, data={"num_workers": 1},
    )
    run_dir, logs = tmp_path / "job", tmp_path / "logs"
    logs.mkdir()
    ranks = _launch(config, [], logs)
    try:
        _wait_for_iteration(run_dir, 3, ranks, logs, timeout=120)
        _signal_groups(ranks, signum)
        assert _wait(ranks, logs, timeout=120) == [EXIT_PREEMPTED] * WORLD_SIZE, _tail(logs)
    finally:
        _signal_groups(ranks, signal.SIGKILL)

    last = max(_train_iterations(run_dir))
    assert 3 <= last < 200
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / TRACKER).read_text().strip() == str(last)
    assert (iteration_dir(checkpoints, last) / "config.yaml").is_file()
    name = signal.Signals(signum).name
    assert f"stopping at iteration {last} ({name})" in (logs / f"rank{WORLD_SIZE - 1}.log").read_text()
    return config, run_dir, last


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_the_job_resumes(run_config, tmp_path):
    config, run_dir, last = _preempt(run_config, tmp_path, signal.SIGTERM)
    logs = tmp_path / "resumed_logs"
    logs.mkdir()
    ranks = _launch(config, [f"training.train_iters={last + 2}"], logs)
    try:
        assert _wait(ranks, logs, timeout=120) == [0] * WORLD_SIZE, _tail(logs)
    finally:
        _signal_groups(ranks, signal.SIGKILL)
    checkpoints = run_dir / "checkpoints"
    assert f"resumed from {checkpoints} at iteration {last}" in (logs / f"rank{WORLD_SIZE - 1}.log").read_text()
    assert _train_iterations(run_dir) == list(range(1, last + 3))
    assert (checkpoints / TRACKER).read_text().strip() == str(last + 2)


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits_75(run_config, tmp_path):
    _preempt(run_config, tmp_path, signal.SIGUSR1)
