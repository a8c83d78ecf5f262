"""Non-finite losses: a step whose loss is NaN (here on one data-parallel rank only) is skipped
on every rank, without an optimizer or LR-schedule update, and counted; training goes on with
finite losses; ``training.max_nonfinite_steps`` such steps in a row stop the job with a
``NonFiniteLossError`` naming the limit."""

from __future__ import annotations

from contextlib import contextmanager

import pytest

from tests.distributed import run_distributed
from tests.training.runs import metric_records, run_config_writer


@contextmanager
def _nan_on_rank0(trainer, iterations: set[int]):
    """Make rank 0's training loss NaN on ``iterations`` (the forward step looks the loss
    function up in its module at every call)."""
    import torch
    import torch.distributed as dist

    from moepp_megatron.training import forward_step

    loss_fn = forward_step.masked_token_loss

    def poisoned(loss_mask, output_tensor):
        loss, logged = loss_fn(loss_mask, output_tensor)
        training = torch.is_grad_enabled()  # validation runs under no_grad
        if training and dist.get_rank() == 0 and trainer.state.iteration + 1 in iterations:
            loss = loss * float("nan")
            logged = {"lm loss": loss.detach().clone()}
        return loss, logged

    forward_step.masked_token_loss = poisoned
    try:
        yield
    finally:
        forward_step.masked_token_loss = loss_fn


def _worker(skipped_config: str, stopped_config: str) -> dict:
    import torch

    from moepp_megatron.config import load_config
    from moepp_megatron.training.trainer import NonFiniteLossError, Trainer

    out = {}
    trainer = Trainer(load_config(skipped_config))
    snapshots, train_step = {}, trainer.train_step

    def step_and_snapshot():
        result = train_step()
        snapshots[trainer.state.iteration] = [p.detach().clone() for p in trainer.chunks.parameters()]
        return result

    trainer.train_step = step_and_snapshot
    with _nan_on_rank0(trainer, {3, 4}):
        out["exit_code"] = trainer.run()
    same = lambda a, b: all(torch.equal(x, y) for x, y in zip(snapshots[a], snapshots[b]))
    out["params_unchanged"] = {it: same(it, it - 1) for it in range(2, 7)}
    out["skipped"] = trainer.state.skipped_nonfinite_steps
    out["scheduler_steps"] = trainer.scheduler.num_steps
    out["adam_steps"] = sorted({float(s["step"]) for opt in trainer.optimizer.chained_optimizers
                                for s in opt.optimizer.state.values()})

    trainer = Trainer(load_config(stopped_config))
    try:
        with _nan_on_rank0(trainer, set(range(3, 100))):
            trainer.run()
    except NonFiniteLossError as e:
        out["error"] = str(e)
    out["stopped_at"] = trainer.state.iteration
    return out


@pytest.fixture(scope="module")
def results(tiny_data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("nonfinite")
    write = run_config_writer(tiny_data, directory)
    skipped = write("skipped", training={"train_iters": 6, "max_nonfinite_steps": 3},
                    checkpoint={"save_interval": 100})
    stopped = write("stopped", training={"train_iters": 8, "max_nonfinite_steps": 2},
                    checkpoint={"save_interval": 2})
    ranks = run_distributed(_worker, 2, str(skipped), str(stopped))
    assert ranks[0]["params_unchanged"] == ranks[1]["params_unchanged"]
    return ranks[0], directory


@pytest.mark.slow
def test_nan_steps_are_skipped_without_update(results):
    out, _ = results
    assert out["exit_code"] == 0
    # Iterations 3 and 4 (NaN) leave every parameter as it was; the others change them.
    assert out["params_unchanged"] == {2: False, 3: True, 4: True, 5: False, 6: False}
    assert out["skipped"] == 2
    assert out["scheduler_steps"] == 4  # the LR schedule advances on applied updates only
    assert out["adam_steps"] == [4.0]


@pytest.mark.slow
def test_skipped_steps_are_logged_and_training_goes_on(results):
    _, directory = results
    # Strict JSON: the NaN loss of a skipped step is written as null.
    train = {r["iteration"]: r for r in metric_records(directory / "skipped") if "valid" not in r}
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    assert [it for it, r in train.items() if r.get("skipped")] == [3, 4]
    assert train[3]["lm_loss"] is None and train[4]["lm_loss"] is None
    finite = [train[it]["lm_loss"] for it in (1, 2, 5, 6)]
    assert all(isinstance(loss, float) for loss in finite)
    assert finite[3] < finite[0]  # still learning after the skipped steps


@pytest.mark.slow
def test_consecutive_nan_steps_stop_the_job(results):
    out, directory = results
    assert out["stopped_at"] == 4
    assert "2 consecutive steps with a non-finite loss" in out["error"]
    assert "training.max_nonfinite_steps=2" in out["error"]
    assert "the last checkpoint is iteration 2" in out["error"]
    logged = [r for r in metric_records(directory / "stopped") if "valid" not in r]
    assert [r["iteration"] for r in logged if r.get("skipped")] == [3]
