"""scripts/slurm/pretrain.sbatch under a real Slurm (one node on 127.0.0.1, CPU mode, 2 ranks
with EP=2): a complete run; a run stopped by the time-limit signal (SIGUSR1 to the batch
shell, as --signal=B:USR1@300 sends it, or to the job step) that checkpoints, requeues itself
and resumes to the same losses, bit for bit; a dependency chain (scripts/slurm/chain.sh) whose first link stops
on training.exit_after_iters; and a two-"node" torchrun rendezvous through
scripts/slurm/node.sh and scripts/pretrain.sh."""

from __future__ import annotations

import re

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.distributed import find_free_port
from tests.slurm.conftest import REPO

# Real jobs of real training: the waits below hold on a machine loaded by other work (they
# are limits, not expectations; an idle machine finishes each job in well under a minute).
pytestmark = [pytest.mark.slurm, pytest.mark.timeout(2400)]

SBATCH_SCRIPT = REPO / "scripts/slurm/pretrain.sbatch"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
            "BOOT_FAIL", "DEADLINE", "PREEMPTED")
ITERATIONS = 40


def train_losses(run_dir: Path) -> list[tuple[int, float]]:
    """(iteration, lm loss) of every training record, in the order written."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [(r["iteration"], r["lm_loss"]) for r in records if "lm_loss" in r]


def latest_iteration(run_dir: Path) -> int | None:
    tracker = Path(run_dir) / "checkpoints" / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text()) if tracker.exists() else None


def submit(slurm, workdir: Path, name: str, config: Path, *overrides: str, env=None) -> int:
    """sbatch the generic script on one node, 2 processes; the log is <workdir>/<name>-<id>.out."""
    run_env = {"NPROC_PER_NODE": "2", "MASTER_PORT": str(find_free_port()), **(env or {})}
    return slurm.sbatch("--nodes=1", f"--job-name={name}", str(SBATCH_SCRIPT), str(config),
                        f"run_dir={workdir / name}", *overrides, env=run_env, cwd=workdir)


def job_log(workdir: Path, name: str, job_id: int) -> str:
    path = workdir / f"{name}-{job_id}.out"
    return path.read_text(errors="replace") if path.exists() else f"<no log {path}>"


@pytest.fixture(scope="module")
def reference(slurm, slurm_workdir, tiny_config):
    """One uninterrupted run through sbatch: (job id, scontrol info, run dir, log)."""
    start = time.monotonic()
    job = submit(slurm, slurm_workdir, "moepp-reference", tiny_config)
    info = slurm.wait_for(job, TERMINAL, timeout=900)
    run_dir = slurm_workdir / "moepp-reference"
    log = job_log(slurm_workdir, "moepp-reference", job)
    print(f"reference job took {time.monotonic() - start:.1f} s")
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    return job, info, run_dir, log


def test_sbatch_runs_training_to_the_end(reference, slurm, slurm_workdir, tiny_config):
    job, info, run_dir, log = reference
    assert info["Restarts"] == "0"
    # The default log name (%x-%j.out, in the submission directory), the repository found
    # from the submitted script's path, one node, two ranks.
    assert f"job {job} (restart 0) on 1 node(s): localhost" in log
    assert f"repository {REPO}" in log
    assert re.search(r"node 0 of 1, \S+ process\(es\), rendezvous \S+:\d+", log), log
    assert f"training iterations 1 to {ITERATIONS}" in log
    assert f"training step exited with 0; checkpoint at iteration {ITERATIONS} of {ITERATIONS}" in log
    assert "run complete" in log
    losses = train_losses(run_dir)
    assert [it for it, _ in losses] == list(range(1, ITERATIONS + 1))
    assert losses[-1][1] < losses[0][1]
    assert latest_iteration(run_dir) == ITERATIONS
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*")) == ["iter_0000030", "iter_0000040"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert sum("valid" in r for r in records) == ITERATIONS // 10
    assert all("load_balancing_loss" in r and "routing" in r for r in records if "lm_loss" in r)

    # Submitting a finished run again costs nothing: it exits 0 before starting training.
    again = submit(slurm, slurm_workdir, "moepp-reference", tiny_config)
    info = slurm.wait_for(again, TERMINAL, timeout=180)
    log = job_log(slurm_workdir, "moepp-reference", again)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert "the run is already complete; nothing to do" in log
    assert "node.sh" not in log
    assert latest_iteration(run_dir) == ITERATIONS


@pytest.mark.parametrize("to", ["batch", "steps"])
def test_usr1_checkpoints_requeues_and_resumes_bitwise(reference, slurm, slurm_workdir, tiny_config, to):
    """SIGUSR1 to the batch shell (--signal=B:USR1@T) or to the job step only (--signal=USR1@T,
    or a site's preemption): either way the job checkpoints, requeues and resumes."""
    name = f"moepp-preempted-{to}"
    run_dir = slurm_workdir / name
    job = submit(slurm, slurm_workdir, name, tiny_config)
    deadline = time.monotonic() + 540
    while len(train_losses(run_dir)) < 3:
        state = slurm.job(job)["JobState"]
        assert state in ("PENDING", "RUNNING"), job_log(slurm_workdir, name, job)
        assert time.monotonic() < deadline, f"no training progress\n{job_log(slurm_workdir, name, job)}"
        time.sleep(0.2)
    # What --signal=B:USR1@300 does before the time limit: SIGUSR1 to the batch shell only;
    # --signal=USR1@300: to the processes of the job step only.
    slurm.command("scancel", "--signal=USR1", *(["--batch"] if to == "batch" else []), str(job))
    info = slurm.wait_for(job, ("PENDING",) + TERMINAL, timeout=360, what="the requeue")
    assert info["JobState"] == "PENDING" and info["Restarts"] == "1", f"{info}\n{job_log(slurm_workdir, name, job)}"
    stopped_at = latest_iteration(run_dir)
    assert stopped_at is not None and 3 <= stopped_at < ITERATIONS
    # Slurm holds a requeued job for ~2 minutes (BeginTime); release it sooner, once the node
    # has cleaned up after its first run, and not within the second of the requeue: slurmd
    # revoked the job's credential then, and it refuses ("Job credential revoked") a new
    # credential for the same job id issued in that same second (whole-second timestamps).
    slurm.wait_for_idle_node(timeout=360)
    time.sleep(3)
    slurm.command("scontrol", "update", f"JobId={job}", "StartTime=now")
    info = slurm.wait_for(job, TERMINAL, timeout=900)
    log = job_log(slurm_workdir, name, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{log}"
    assert info["Restarts"] == "1"

    if to == "batch":
        assert "SIGUSR1 received: forwarding it to the training step" in log
    else:  # scripts/pretrain.sh turned the stop with a checkpoint into 75
        assert f"training step exited with 75; checkpoint at iteration {stopped_at}" in log
    assert f"stopping at iteration {stopped_at} (SIGUSR1)" in log
    assert f"not finished (iteration {stopped_at} of {ITERATIONS}): requeueing job {job}" in log
    assert f"job {job} (restart 1) on 1 node(s)" in log
    assert f"iteration {stopped_at} of {ITERATIONS}" in log
    assert f"resumed from {run_dir / 'checkpoints'} at iteration {stopped_at}" in log
    assert "run complete" in log
    assert latest_iteration(run_dir) == ITERATIONS

    # Every iteration logged once, and the same losses as the uninterrupted run, bitwise.
    losses = train_losses(run_dir)
    assert [it for it, _ in losses] == list(range(1, ITERATIONS + 1))
    assert losses == train_losses(reference[2])


def test_dependency_chain_resumes_bitwise(reference, slurm, slurm_workdir, tiny_config):
    name = "moepp-chain"
    run_dir = slurm_workdir / name
    env = {**slurm.env, "NPROC_PER_NODE": "2", "MASTER_PORT": str(find_free_port())}
    out = subprocess.run(
        ["bash", str(REPO / "scripts/slurm/chain.sh"), "2", "--nodes=1", f"--job-name={name}",
         str(SBATCH_SCRIPT), str(tiny_config), f"run_dir={run_dir}",
         f"training.exit_after_iters={ITERATIONS // 2}"],
        env=env, cwd=slurm_workdir, capture_output=True, text=True, timeout=60, check=True,
    )
    first, second = map(int, out.stdout.split())
    assert slurm.job(second)["Dependency"] == f"afterany:{first}(unfulfilled)"
    info = slurm.wait_for(second, TERMINAL, timeout=1080)
    first_info, first_log = slurm.job(first), job_log(slurm_workdir, name, first)
    second_log = job_log(slurm_workdir, name, second)
    # Link 1 stops on its step budget; not finished and not requeueing: exit 75.
    assert first_info["JobState"] == "FAILED" and first_info["ExitCode"] == "75:0", first_log
    assert f"checkpoint at iteration {ITERATIONS // 2} of {ITERATIONS}" in first_log
    assert "MOEPP_REQUEUE=0: exiting 75" in first_log
    # Link 2 continues from the checkpoint to the end.
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", second_log
    assert f"resumed from {run_dir / 'checkpoints'} at iteration {ITERATIONS // 2}" in second_log
    assert train_losses(run_dir) == train_losses(reference[2])


def test_two_node_rendezvous_through_node_script(reference, slurm_workdir, tiny_config):
    """Two torchrun agents ("nodes") with one process each, as srun starts them: node.sh
    maps SLURM_NODEID / SLURM_JOB_NUM_NODES to scripts/pretrain.sh's NODE_RANK / NNODES.
    Same global ranks as the 2-process reference, so the same losses, bitwise."""
    run_dir = slurm_workdir / "moepp-two-nodes"
    port = find_free_port()
    agents = []
    for node in (0, 1):
        env = {
            **os.environ, "SLURM_NODEID": str(node), "SLURM_JOB_NUM_NODES": "2",
            "NPROC_PER_NODE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            # torchrun sets this itself only for several processes per node; the reference had it.
            "OMP_NUM_THREADS": "1",
        }
        log = open(slurm_workdir / f"two-nodes-{node}.log", "w")
        agents.append((subprocess.Popen(
            ["bash", "scripts/slurm/node.sh", str(tiny_config), f"run_dir={run_dir}"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ), log))
    try:
        codes = [proc.wait(timeout=900) for proc, _ in agents]
    finally:
        for proc, log in agents:
            if proc.poll() is None:
                os.killpg(proc.pid, 9)
            log.close()
    logs = [(slurm_workdir / f"two-nodes-{n}.log").read_text(errors="replace") for n in (0, 1)]
    assert codes == [0, 0], "\n".join(logs)
    assert "node 0 of 2, 1 process(es), rendezvous 127.0.0.1" in logs[0]
    assert "node 1 of 2, 1 process(es)" in logs[1]
    assert latest_iteration(run_dir) == ITERATIONS
    assert train_losses(run_dir) == train_losses(reference[2])
