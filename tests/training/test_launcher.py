"""scripts/pretrain.sh (torchrun, 2 CPU ranks) as a cluster and its users treat it.

- It is quiet and informative: one start-up block, progress in the log, a summary at the end.
- Its exit status says how the run ended: 75 when stopped by a signal with a checkpoint to
  resume from (torchrun alone would turn the workers' 75 into 1 and a failure report), 0
  when complete, and 0 again, at once, when a complete run is started again.
- A second job in the same run directory stops at once, naming the holder of the lock.
- Workers whose torchrun was killed stop (checkpoint, exit) instead of training on.
- A lock left by a dead job is taken over with a warning.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from moepp_megatron.checkpoint.checkpointer import TRACKER
from moepp_megatron.training.run_dir import LOCK_FILE
from moepp_megatron.training.trainer import EXIT_PREEMPTED
from tests.training.runs import Job, train_iterations

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _pids(*selection: str) -> list[str]:
    return subprocess.run(["pgrep", *selection], capture_output=True, text=True).stdout.split()


def _running(pid: str) -> bool:
    """Alive and not a zombie (an orphan's exit may wait for a reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _tracker(run_dir) -> int:
    return int((run_dir / "checkpoints" / TRACKER).read_text())


def test_exit_status_says_stopped_complete_and_already_complete(run_config, tmp_path):
    config, run_dir = run_config("job", training={"train_iters": 200, "eval_interval": 1000}), tmp_path / "job"
    job = Job.script(config, [], tmp_path / "first")
    try:
        job.wait_for_iteration(run_dir, 2, timeout=180)
        job.signal(signal.SIGUSR1, group=False)  # to the script alone: it forwards it
        assert job.wait(timeout=180) == [EXIT_PREEMPTED], job.tail()
    finally:
        job.kill()
    stopped = _tracker(run_dir)
    assert stopped >= 2 and "(SIGUSR1)" in job.output()
    # A stop is not a failure: no torchrun failure report, no traceback.
    assert "ChildFailedError" not in job.output() and "Traceback" not in job.output(), job.output()
    # Quiet and informative: one start-up block, progress in every log line, no known
    # warnings, the resolved config in the run directory rather than on the screen.
    assert job.output().count("layout     2 processes") == 1 and "| ETA " in job.output(), job.output()
    assert "Warning" not in job.output() and "resolved config" not in job.output(), job.output()
    assert (run_dir / "config.yaml").is_file()

    outputs = {}
    for name in ("second", "third"):
        job = Job.script(config, [f"training.train_iters={stopped + 1}"], tmp_path / name)
        try:
            assert job.wait(timeout=180) == [0], job.tail()
        finally:
            job.kill()
        outputs[name] = job.output()
    assert _tracker(run_dir) == stopped + 1
    assert train_iterations(run_dir) == list(range(1, stopped + 2))
    assert f"run complete: iteration {stopped + 1} of {stopped + 1}" in outputs["second"]
    assert f"the run is complete: iteration {stopped + 1} of {stopped + 1}" in outputs["third"]
    assert "Traceback" not in outputs["second"] + outputs["third"]


def test_one_job_per_run_directory_and_no_orphaned_workers(run_config, tmp_path):
    config, run_dir = run_config("job", training={"train_iters": 200, "eval_interval": 1000}), tmp_path / "job"
    first = Job.script(config, [], tmp_path / "first")
    try:
        first.wait_for_iteration(run_dir, 2, timeout=180)
        holder = json.loads((run_dir / LOCK_FILE).read_text())

        second = Job.script(config, [], tmp_path / "second")
        assert second.wait(timeout=180) == [1], second.tail()
        message = f"run directory {run_dir} is in use by another job (host {holder['host']}, pid {holder['pid']}"
        assert second.output().count(message) == 1, second.tail()
        assert "moepp_megatron/" not in second.output()  # no traceback of ours (torchrun prints its own)

        # kill -9 of the launcher alone (the script and torchrun, one session); its workers
        # live on in sessions of their own until they notice, then checkpoint and exit.
        launcher = _pids("-s", str(first.processes[0].pid))
        workers = [w for pid in launcher for w in _pids("-P", pid) if w not in launcher]
        assert len(workers) == 2, (launcher, workers)
        for pid in launcher:
            subprocess.run(["kill", "-9", pid], check=False)
        deadline = time.monotonic() + 120
        while any(_running(pid) for pid in workers):
            assert time.monotonic() < deadline, f"workers still running\n{first.tail()}"
            time.sleep(0.5)
    finally:
        first.kill()
    last = max(train_iterations(run_dir))
    assert _tracker(run_dir) == last  # they saved where they stopped
    assert f"stopping at iteration {last} (SIGTERM)" in first.output()
    assert not (run_dir / LOCK_FILE).exists()


def test_lock_of_a_dead_job_is_taken_over(run_config, tmp_path):
    config, run_dir = run_config("job", training={"train_iters": 3}), tmp_path / "job"
    gone = subprocess.Popen(["true"])
    gone.wait()
    run_dir.mkdir()
    (run_dir / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "since": "earlier"}))
    job = Job.ranks(config, [], tmp_path / "logs")
    try:
        assert job.wait(timeout=180) == [0, 0], job.tail()
    finally:
        job.kill()
    assert f"WARNING: took over {run_dir / LOCK_FILE}: its process {gone.pid} on this host is gone" in job.output()


def test_cpu_mode_from_the_environment_and_what_to_set_without_cuda(run_config, tmp_path):
    config = run_config("job", training={"train_iters": 3}, parallel={"expert": 1, "cpu_mode": False})
    job = Job.ranks(config, [], tmp_path / "no_cuda", world_size=1, env={"MOEPP_CPU_MODE": None})
    try:
        assert job.wait(timeout=180) == [1], job.tail()
    finally:
        job.kill()
    assert ("error: no CUDA device on this machine: to run on CPU with gloo (development only), set "
            "parallel.cpu_mode=true or MOEPP_CPU_MODE=1") in job.output()
    assert "Traceback" not in job.output()

    job = Job.ranks(config, [], tmp_path / "env", world_size=1)  # MOEPP_CPU_MODE=1
    try:
        assert job.wait(timeout=180) == [0], job.tail()
    finally:
        job.kill()
    assert train_iterations(tmp_path / "job") == [1, 2, 3]
