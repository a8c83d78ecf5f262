"""Resuming from what disks and people do to a run directory, on 2 ranks (EP=2).

A job saves checkpoints at iterations 2, 4 and 6; each scenario copies its run directory,
damages the copy as a failing disk or a careless hand would, and resumes there:

======================================  =============================================
fault                                   outcome
======================================  =============================================
4 KiB of random bytes in a shard        resumes from iteration 4; warning names the file
truncated shard / deleted shard         resumes from 4; warning names the file
deleted .metadata / common.pt           resumes from 4; warning names the file
emptied iteration directory             resumes from 4 (incomplete: no checksums.json)
garbage tracker / deleted tracker       resumes from 6 (the newest that verifies), warning
damaged shard, checkpoint.on_damaged=stop  DamagedCheckpointError naming the file
every checkpoint damaged                DamagedCheckpointError, never a silent restart
tracker but no checkpoint directory     DamagedCheckpointError
checkpoint.load_iteration=2             resumes from 2
partial directory below the tracker     not counted by keep_last, removed
NaN weights reaching a save             NonFiniteWeightsError, tracker unchanged
======================================  =============================================

The fallback resume continues exactly: iterations 5 and 6 again give the job's losses, bit
for bit, and metrics.jsonl holds each iteration once. All scenarios run in one 2-process
launch (module fixture)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import pytest

from tests.distributed import run_distributed
from tests.training.runs import metric_records, run_config_writer, train_losses

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def _shard(checkpoint: Path) -> Path:
    return sorted(checkpoint.glob("*.distcp"))[0]


def _random_bytes(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(os.urandom(4096))


# name -> (what it does to the copy of the run directory, overrides of the resume).
DAMAGE = {
    "random_bytes": (lambda c: _random_bytes(_shard(c / "iter_0000006")), []),
    "truncated": (lambda c: os.truncate(_shard(c / "iter_0000006"), 1000), []),
    "deleted_shard": (lambda c: _shard(c / "iter_0000006").unlink(), []),
    "deleted_metadata": (lambda c: (c / "iter_0000006" / ".metadata").unlink(), []),
    "deleted_common": (lambda c: (c / "iter_0000006" / "common.pt").unlink(), []),
    "emptied": (lambda c: [p.unlink() for p in (c / "iter_0000006").iterdir()], []),
    "garbage_tracker": (lambda c: (c / "latest_checkpointed_iteration.txt").write_bytes(b"\xff\xfe6"), []),
    "deleted_tracker": (lambda c: (c / "latest_checkpointed_iteration.txt").unlink(), []),
    "strict": (lambda c: _random_bytes(_shard(c / "iter_0000006")), ["checkpoint.on_damaged=stop"]),
    "all_damaged": (lambda c: [_random_bytes(_shard(c / f"iter_000000{i}")) for i in (2, 4, 6)], []),
    "no_checkpoints": (lambda c: [shutil.rmtree(c / f"iter_000000{i}") for i in (2, 4, 6)], []),
    "load_iteration": (lambda c: None, ["checkpoint.load_iteration=2"]),
}


def _worker(job: str, root: str) -> dict:
    import torch
    import torch.distributed as dist

    from moepp_megatron.checkpoint.checkpointer import TRACKER, CheckpointError
    from moepp_megatron.config import load_config
    from moepp_megatron.training.trainer import NonFiniteWeightsError, Trainer

    def copy(name: str) -> Path:
        run_dir = Path(root) / name
        if dist.get_rank() == 0:
            shutil.copytree(Path(load_config(job).run_dir), run_dir)
        dist.barrier()
        return run_dir

    def resume(run_dir: Path, overrides: list[str]):
        """(trainer or None, its start-up output or the error message)."""
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                trainer = Trainer(load_config(job, [f"run_dir={run_dir}", *overrides]))
        except CheckpointError as e:
            return None, f"{type(e).__name__}: {e}"
        return trainer, out.getvalue()

    Trainer(load_config(job)).run()
    results = {}
    for name, (damage, overrides) in DAMAGE.items():
        run_dir = copy(name)
        if dist.get_rank() == 0:
            damage(run_dir / "checkpoints")
        dist.barrier()
        trainer, output = resume(run_dir, overrides)
        results[name] = {"iteration": trainer and trainer.state.iteration, "output": output}
        if name == "random_bytes":  # the fallback resume continues exactly
            results[name]["exit"] = trainer.run()
            results[name]["losses"] = train_losses(run_dir)
            results[name]["iterations"] = [r["iteration"] for r in metric_records(run_dir) if "lm_loss" in r]

    # A partial save below the tracker does not count for keep_last (3) and goes.
    run_dir = copy("partial_below_tracker")
    if dist.get_rank() == 0:
        (run_dir / "checkpoints" / "iter_0000005").mkdir()
        (run_dir / "checkpoints" / "iter_0000005" / "__0_0.distcp").write_bytes(b"half")
    dist.barrier()
    trainer, _ = resume(run_dir, ["training.train_iters=7", "checkpoint.save_interval=1"])
    trainer.run()
    results["partial_below_tracker"] = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))

    # Weights that turned NaN never replace the last good checkpoint.
    run_dir = copy("nan_weights")
    trainer, _ = resume(run_dir, ["training.train_iters=8"])
    with torch.no_grad():
        next(iter(trainer.chunks.parameters())).fill_(float("nan"))
    try:
        trainer.save()
    except NonFiniteWeightsError as e:
        results["nan_weights"] = {"error": str(e), "tracker": (run_dir / "checkpoints" / TRACKER).read_text().strip()}
    return results


@pytest.fixture(scope="module")
def results(tiny_data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("damaged")
    write = run_config_writer(tiny_data, directory)
    job = write("job", training={"train_iters": 6}, checkpoint={"save_interval": 2, "keep_last": 3})
    ranks = run_distributed(_worker, 2, str(job), str(directory), timeout=800)
    return ranks[1], directory  # rank 1 is the logging rank


@pytest.mark.parametrize("name, named", [
    ("random_bytes", "is damaged (its SHA-256 differs"),
    ("truncated", "has 1000 bytes"),
    ("deleted_shard", "is missing"),
    ("deleted_metadata", "iter_0000006/.metadata is missing"),
    ("deleted_common", "iter_0000006/common.pt is missing"),
    ("emptied", "iter_0000006 is incomplete: no checksums.json"),
])
def test_damaged_latest_checkpoint_falls_back_naming_the_file(results, name, named):
    out, directory = results
    result = out[name]
    assert result["iteration"] == 4, result["output"]
    assert f"WARNING: checkpoint {directory / name / 'checkpoints' / 'iter_0000006'} fails verification" in result["output"]
    assert named in result["output"]
    if name in ("random_bytes", "truncated", "deleted_shard"):
        assert str(directory / name / "checkpoints" / "iter_0000006" / "__") in result["output"]


def test_fallback_resume_continues_bitwise_and_logs_each_iteration_once(results):
    out, directory = results
    assert out["random_bytes"]["exit"] == 0
    assert out["random_bytes"]["losses"] == train_losses(directory / "job")
    assert out["random_bytes"]["iterations"] == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("name, warning", [
    ("garbage_tracker", "expected an iteration number"),
    ("deleted_tracker", "no latest_checkpointed_iteration.txt"),
])
def test_unreadable_tracker_resumes_from_the_newest_verified_checkpoint(results, name, warning):
    result = results[0][name]
    assert result["iteration"] == 6, result["output"]
    assert warning in result["output"] and "resuming from the newest checkpoint that verifies" in result["output"]


def test_strict_mode_stops_naming_the_damaged_file(results):
    output = results[0]["strict"]["output"]
    assert results[0]["strict"]["iteration"] is None
    assert output.startswith("DamagedCheckpointError: checkpoint ")
    assert "is damaged" in output and "checkpoint.on_damaged=stop" in output
    assert "checkpoint.load_iteration=N (found: 2, 4, 6)" in output


@pytest.mark.parametrize("name, message", [
    ("all_damaged", "verifies; refusing to start the run over"),
    ("no_checkpoints", "names iteration 6, but"),
])
def test_never_starts_over_silently(results, name, message):
    result = results[0][name]
    assert result["iteration"] is None
    assert result["output"].startswith("DamagedCheckpointError") and message in result["output"]


def test_load_iteration_picks_a_checkpoint(results):
    assert results[0]["load_iteration"]["iteration"] == 2


def test_keep_last_counts_only_complete_checkpoints(results):
    assert results[0]["partial_below_tracker"] == ["iter_0000004", "iter_0000006", "iter_0000007"]


def test_nan_weights_never_replace_the_last_good_checkpoint(results):
    result = results[0]["nan_weights"]
    assert "hold NaN/Inf; not saving over the last good checkpoint (iteration 6" in result["error"]
    assert result["tracker"] == "6"
