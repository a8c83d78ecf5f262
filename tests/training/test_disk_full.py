"""A disk that fills up during a save (a real 14 MiB tmpfs; a checkpoint of the tiny model
takes about 5.6 MiB): the job stops with one message naming the directory and the space
needed, the partial save is removed, the tracker stays on the previous checkpoint, and once
there is space the run resumes from it exactly."""

from __future__ import annotations

import subprocess

import pytest

from moepp_megatron.checkpoint.checkpointer import TRACKER
from tests.training.runs import Job, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=14m", "tmpfs", str(mount)],
                            capture_output=True, text=True)
    if result.returncode:
        pytest.fail(f"this test needs root to mount a small tmpfs: {result.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(run_config, tmp_path, small_disk):
    run_dir = small_disk / "job"
    config = run_config("job", run_dir=str(run_dir), training={"train_iters": 6, "eval_interval": 100},
                        checkpoint={"save_interval": 2, "keep_last": 3})
    job = Job.ranks(config, [], tmp_path / "full")
    try:
        assert job.wait(timeout=240) == [1, 1], job.tail()
    finally:
        job.kill()
    output = job.output()
    checkpoints = run_dir / "checkpoints"
    message = f"error: no space left on the device while saving {checkpoints / 'iter_0000006'}"
    assert output.count(message) == 1, job.tail()
    assert f"{checkpoints / 'iter_0000004'} is still the latest checkpoint" in output
    assert "Traceback" not in output
    assert (checkpoints / TRACKER).read_text().strip() == "4"
    assert sorted(p.name for p in checkpoints.glob("iter_*")) == ["iter_0000002", "iter_0000004"]
    before = train_losses(run_dir)
    assert sorted(before) == [1, 2, 3, 4, 5, 6]

    subprocess.run(["mount", "-o", "remount,size=40m", str(small_disk)], check=True)
    job = Job.ranks(config, [], tmp_path / "resumed")
    try:
        assert job.wait(timeout=240) == [0, 0], job.tail()
    finally:
        job.kill()
    assert f"resumed from {checkpoints} at iteration 4" in job.output()
    assert train_losses(run_dir) == before  # iterations 5 and 6 again, bit for bit
    assert (checkpoints / TRACKER).read_text().strip() == "6"
