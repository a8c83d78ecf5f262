"""Checkpoint life cycle on 2 ranks (EP=2): a save that fails half-way leaves the tracker on the
previous checkpoint and the job resumes from it; only the ``keep_last`` newest complete
checkpoints stay; a checkpoint of a different model is refused with every differing field;
``checkpoint.init_from`` starts a new run from another run's weights.

All scenarios run one after the other in one 2-process launch (module fixture)."""

from __future__ import annotations

from pathlib import Path

import pytest

from moepp_megatron.checkpoint.checkpointer import TRACKER
from moepp_megatron.checkpoint.files import MANIFEST
from tests.distributed import run_distributed
from tests.training.runs import metric_records, run_config_writer


def _checkpoints(run_dir: Path) -> dict:
    """Tracker content and, per iter_* directory, whether its save completed (the checksum
    manifest is written after every rank has finished)."""
    directory = run_dir / "checkpoints"
    return {
        "tracker": (directory / TRACKER).read_text().strip(),
        "dirs": {p.name: (p / MANIFEST).is_file() for p in sorted(directory.glob("iter_*"))},
    }


def _worker(job: str, fresh: str) -> dict:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    from moepp_megatron.checkpoint.checkpointer import ConfigMismatchError
    from moepp_megatron.config import load_config
    from moepp_megatron.training.trainer import Trainer

    run_dir = Path(load_config(job).run_dir)
    out = {}

    # (a) The second save (iteration 4) writes part of the checkpoint, then fails.
    save, calls = dist_checkpointing.save, []

    def failing_save(state_dict, directory, *args, **kwargs):
        calls.append(directory)
        if len(calls) == 2:
            (Path(directory) / f"__{dist.get_rank()}_0.distcp").write_bytes(b"half a checkpoint")
            raise OSError(5, "Input/output error (simulated)")
        return save(state_dict, directory, *args, **kwargs)

    dist_checkpointing.save = failing_save
    try:
        Trainer(load_config(job)).run()
    except OSError as e:
        out["save_error"] = str(e)
    finally:
        dist_checkpointing.save = save
    out["after_failure"] = _checkpoints(run_dir)

    trainer = Trainer(load_config(job, ["training.train_iters=3", "checkpoint.save_interval=1"]))
    out["resumed_at"] = trainer.state.iteration
    out["resumed_exit"] = trainer.run()
    out["after_resume"] = _checkpoints(run_dir)

    # (b) keep_last=2 with a save every iteration (iteration 4 overwrites the failed save).
    source = Trainer(load_config(job, ["training.train_iters=6", "checkpoint.save_interval=1"]))
    out["source_exit"] = source.run()
    out["keep_last"] = _checkpoints(run_dir)

    # (c) Resuming with a different model.
    try:
        Trainer(load_config(job, ["training.train_iters=8", "model.hidden_size=128", "model.moe.tau=0.5"]))
    except ConfigMismatchError as e:
        out["mismatch"] = str(e)

    # (d) A new run from the source's last weights.
    new = Trainer(load_config(fresh))
    out["init_iteration"] = new.state.iteration
    out["init_consumed"] = new.state.consumed_samples
    out["init_same_weights"] = all(
        torch.equal(a, b) for a, b in zip(source.chunks.parameters(), new.chunks.parameters(), strict=True)
    )
    out["init_optimizer_states"] = sum(len(o.optimizer.state) for o in new.optimizer.chained_optimizers)
    out["init_scheduler_steps"] = new.scheduler.num_steps
    out["init_valid_loss"] = new.evaluate()["lm_loss"]
    out["init_exit"] = new.run()
    return out


@pytest.fixture(scope="module")
def results(tiny_data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("checkpointing")
    write = run_config_writer(tiny_data, directory)
    job = write("job", training={"train_iters": 6}, checkpoint={"save_interval": 2, "keep_last": 2})
    fresh = write("fresh", training={"train_iters": 3},
                  checkpoint={"init_from": str(directory / "job" / "checkpoints")})
    ranks = run_distributed(_worker, 2, str(job), str(fresh))
    assert ranks[0] == ranks[1]
    return ranks[0], directory


@pytest.mark.slow
def test_failed_save_leaves_tracker_on_previous_checkpoint(results):
    out, _ = results
    assert "Input/output error" in out["save_error"]
    assert out["after_failure"] == {
        "tracker": "2", "dirs": {"iter_0000002": True, "iter_0000004": False},
    }
    assert out["resumed_at"] == 2 and out["resumed_exit"] == 0
    # keep_last counts complete checkpoints: the failed save's leftover is not one of them.
    assert out["after_resume"] == {
        "tracker": "3", "dirs": {"iter_0000002": True, "iter_0000003": True, "iter_0000004": False},
    }


@pytest.mark.slow
def test_keep_last_keeps_the_newest_complete_checkpoints(results):
    out, directory = results
    assert out["source_exit"] == 0
    assert out["keep_last"] == {"tracker": "6", "dirs": {"iter_0000005": True, "iter_0000006": True}}
    iterations = [r["iteration"] for r in metric_records(directory / "job") if "lm_loss" in r]
    # 1-4, resumed at 2 -> 3, resumed at 3 -> 6: each iteration once, from its last run.
    assert iterations == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_different_model_is_refused_naming_every_field(results):
    out, directory = results
    message = out["mismatch"]
    assert str(directory / "job" / "checkpoints" / "iter_0000006") in message
    assert "model.hidden_size: checkpoint has 64, this run has 128" in message
    assert "model.moe.tau: checkpoint has 0.75, this run has 0.5" in message
    assert len([line for line in message.splitlines() if line.startswith("  model.")]) == 2


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_the_weights(results):
    out, directory = results
    assert out["init_iteration"] == 0 and out["init_consumed"] == 0
    assert out["init_same_weights"]
    assert out["init_optimizer_states"] == 0 and out["init_scheduler_steps"] == 0
    source = metric_records(directory / "job")
    source_valid = [r["valid"]["lm_loss"] for r in source if r["iteration"] == 6 and "valid" in r]
    assert out["init_valid_loss"] == source_valid[-1]  # same weights, same data, same layout

    assert out["init_exit"] == 0
    new = {r["iteration"]: r for r in metric_records(directory / "fresh") if "lm_loss" in r}
    first_source = next(r for r in source if r["iteration"] == 1 and "lm_loss" in r)
    assert sorted(new) == [1, 2, 3]
    assert new[1]["lr"] == first_source["lr"]  # the LR schedule starts over
    assert new[1]["consumed_tokens"] == first_source["consumed_tokens"]  # so does the data
    assert new[1]["lm_loss"] < first_source["lm_loss"] - 0.3  # from trained weights
