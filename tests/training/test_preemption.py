"""Stop signals to a 2-rank ``moepp-train`` job, sent to every process of it (as Slurm signals
every process of a job step: DataLoader workers and dist_checkpointing's helper processes
included). SIGTERM, SIGUSR1 and a first SIGINT (Ctrl-C) finish the current step, save a
checkpoint for it and exit with code 75; running the job again resumes from that
checkpoint. A second SIGINT exits at once, without a traceback. A signal during start-up
is not lost: the job stops right after restoring."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from moepp_megatron.checkpoint.checkpointer import TRACKER, iteration_dir
from moepp_megatron.checkpoint.files import MANIFEST
from moepp_megatron.training.trainer import EXIT_PREEMPTED
from tests.training.runs import Job, train_iterations

WORLD_SIZE = 2


def _long_job(run_config):
    # A periodic save before the signal (its helper process is running) and DataLoader workers:
    # both get the signal too, and neither may break the final checkpoint.
    return run_config(
        "job", training={"train_iters": 200, "eval_interval": 1000},
        checkpoint={"save_interval": 2}, data={"num_workers": 1},
    )


def _preempt(run_config, tmp_path, signum) -> tuple[Path, Path, int]:
    """Start the job and signal every process of it after iteration 3; check the exit codes
    and the checkpoint. Returns the config, the run directory and the last iteration."""
    config, run_dir = _long_job(run_config), tmp_path / "job"
    job = Job.ranks(config, [], tmp_path / "logs")
    try:
        job.wait_for_iteration(run_dir, 3, timeout=120)
        job.signal(signum)
        assert job.wait(timeout=120) == [EXIT_PREEMPTED] * WORLD_SIZE, job.tail()
    finally:
        job.kill()

    last = max(train_iterations(run_dir))
    assert 3 <= last < 200
    checkpoints = run_dir / "checkpoints"
    assert (checkpoints / TRACKER).read_text().strip() == str(last)
    assert (iteration_dir(checkpoints, last) / MANIFEST).is_file()
    name = signal.Signals(signum).name
    assert f"stopping at iteration {last} ({name})" in (tmp_path / "logs" / f"rank{WORLD_SIZE - 1}.log").read_text()
    assert "Traceback" not in job.output()
    return config, run_dir, last


@pytest.mark.slow
def test_sigterm_checkpoints_exits_75_and_the_job_resumes(run_config, tmp_path):
    config, run_dir, last = _preempt(run_config, tmp_path, signal.SIGTERM)
    job = Job.ranks(config, [f"training.train_iters={last + 2}"], tmp_path / "resumed_logs")
    try:
        assert job.wait(timeout=120) == [0] * WORLD_SIZE, job.tail()
    finally:
        job.kill()
    checkpoints = run_dir / "checkpoints"
    log = (tmp_path / "resumed_logs" / f"rank{WORLD_SIZE - 1}.log").read_text()
    assert f"resumed from {checkpoints} at iteration {last}" in log
    # The shorter run keeps the checkpoint's LR schedule, and says so.
    assert "training.train_iters: 200 -> " in log and "the checkpoint's is kept" in log
    assert train_iterations(run_dir) == list(range(1, last + 3))
    assert (checkpoints / TRACKER).read_text().strip() == str(last + 2)


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGUSR1, signal.SIGINT], ids=["SIGUSR1", "SIGINT"])
def test_sigusr1_and_first_ctrl_c_checkpoint_and_exit_75(run_config, tmp_path, signum):
    _preempt(run_config, tmp_path, signum)


@pytest.mark.slow
def test_second_ctrl_c_exits_at_once(run_config, tmp_path):
    # During start-up (seconds of imports and set-up): a window a test can hit every time.
    # One rank: signals that arrive while a process is inside one long C call reach its
    # Python handler as one, so the second is sent once the first was seen (rank 0 says so).
    job = Job.ranks(_long_job(run_config), ["parallel.expert=1"], tmp_path / "logs", world_size=1)
    first = "SIGINT received: stopping after this step with a checkpoint (Ctrl-C again: exit at once"
    try:
        time.sleep(2)
        job.signal(signal.SIGINT)
        deadline = time.monotonic() + 60
        while first not in job.output():
            assert time.monotonic() < deadline, job.tail()
            time.sleep(0.05)
        job.signal(signal.SIGINT)
        assert job.wait(timeout=60) == [-signal.SIGINT], job.tail()
    finally:
        job.kill()
    output = job.output()
    assert output.count("second interrupt: exiting now, without a checkpoint") == 1  # rank 0's
    assert "Traceback" not in output and "KeyboardInterrupt" not in output


@pytest.mark.slow
def test_signal_during_start_up_stops_after_restore(run_config, tmp_path):
    run_dir = tmp_path / "job"
    job = Job.ranks(_long_job(run_config), [], tmp_path / "logs")
    try:
        time.sleep(2)  # importing torch and megatron, long before the first step
        job.signal(signal.SIGUSR1)
        assert job.wait(timeout=120) == [EXIT_PREEMPTED] * WORLD_SIZE, job.tail()
    finally:
        job.kill()
    log = (tmp_path / "logs" / f"rank{WORLD_SIZE - 1}.log").read_text()
    assert "SIGUSR1 arrived during start-up: stopping at iteration 0 before training" in log
    assert not (run_dir / "metrics.jsonl").exists() or train_iterations(run_dir) == []
