"""What a resumed run keeps and what it changes, said at start-up, with Megatron-LM's choices
(2 ranks): a changed LR, length or data seed is listed with its consequence; the LR
schedule stays the checkpoint's unless ``checkpoint.override_scheduler``; the optimizer
state can be left behind (``checkpoint.load_optimizer=false``), which is also the way out
of a layout change the distributed optimizer cannot reshard (PP=2 -> EP=2: an
``OptimizerReshardError`` naming both layouts, never a raw ``KeyError``)."""

from __future__ import annotations

import contextlib
import io

import pytest

from moepp_megatron.training.resume import changed_settings
from tests.distributed import run_distributed
from tests.training.runs import run_config_writer

CHANGES = ["optim.lr=0.001", "training.train_iters=6", "data.seed=7"]


def _worker(job: str, pipelined: str) -> dict:
    from moepp_megatron.checkpoint.checkpointer import OptimizerReshardError
    from moepp_megatron.config import load_config
    from moepp_megatron.training.trainer import Trainer

    def resume(config: str, overrides: list[str]):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            trainer = Trainer(load_config(config, overrides))
        return trainer, out.getvalue()

    results = {}
    for config in (job, pipelined):
        Trainer(load_config(config)).run()
    for name, overrides in {
        "kept": CHANGES,
        "override": [*CHANGES, "checkpoint.override_scheduler=true"],
        "fresh_optimizer": ["checkpoint.load_optimizer=false", "checkpoint.load_rng=false"],
    }.items():
        trainer, output = resume(job, overrides)
        s = trainer.scheduler
        results[name] = {
            "output": output, "iteration": trainer.state.iteration,
            "schedule": (s.max_lr, s.lr_decay_steps, s.num_steps),
            "optimizer_states": sum(len(o.optimizer.state) for o in trainer.optimizer.chained_optimizers),
        }
    layout_change = ["parallel.pipeline=1", "parallel.expert=2"]
    try:
        resume(pipelined, layout_change)
    except OptimizerReshardError as e:
        results["reshard_error"] = str(e)
    trainer, output = resume(pipelined, [*layout_change, "checkpoint.load_optimizer=false"])
    results["reshard_without_optimizer"] = trainer.state.iteration
    return results


@pytest.fixture(scope="module")
def results(tiny_data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("resume_settings")
    write = run_config_writer(tiny_data, directory)
    job = write("job", training={"train_iters": 4})
    pipelined = write("pipelined", training={"train_iters": 2}, checkpoint={"save_interval": 2},
                      parallel={"pipeline": 2, "expert": 1},
                      optim={"use_distributed_optimizer": True, "warmup_iters": 1})
    return run_distributed(_worker, 2, str(job), str(pipelined), timeout=600)[1]  # the logging rank


@pytest.mark.slow
def test_changed_settings_are_listed_and_the_schedule_is_kept(results):
    result = results["kept"]
    assert result["iteration"] == 4
    assert result["schedule"] == (3e-3, 4, 4)  # the checkpoint's lr and decay length
    output = result["output"]
    assert "kept from the checkpoint: weights, LR schedule position, data position, optimizer state, RNG states" in output
    assert "optim.lr: 0.003 -> 0.001  [LR schedule: the checkpoint's is kept; checkpoint.override_scheduler=true takes the config's]" in output
    assert "training.train_iters: 4 -> 6  [LR schedule: the checkpoint's is kept" in output
    assert "data.seed: None -> 7  [data: the new order, continuing at sample 64]" in output


@pytest.mark.slow
def test_override_scheduler_takes_the_config_schedule(results):
    assert results["override"]["schedule"] == (1e-3, 6, 4)
    assert "LR schedule: the config's (checkpoint.override_scheduler=true)" in results["override"]["output"]


@pytest.mark.slow
def test_resume_without_optimizer_and_rng_state(results):
    result = results["fresh_optimizer"]
    assert result["iteration"] == 4 and result["schedule"] == (3e-3, 4, 4)
    assert result["optimizer_states"] == 0
    assert "fresh (checkpoint.load_optimizer / load_rng = false): optimizer state, RNG states" in result["output"]


@pytest.mark.slow
def test_distributed_optimizer_layout_change_is_refused_with_the_way_out(results):
    message = results["reshard_error"]
    assert "saved with TP=1 PP=2 EP=1 DP=1, this run has TP=1 PP=1 EP=2 DP=2" in message
    assert "checkpoint.load_optimizer=false" in message
    assert results["reshard_without_optimizer"] == 2


def test_changed_settings_ignore_where_the_run_is():
    saved = {"run_dir": "/a", "optim": {"lr": 1.0}, "model": {"hidden_size": 8}, "seed": 1}
    now = {"run_dir": "/b", "optim": {"lr": 2.0}, "model": {"hidden_size": 16}, "seed": 1}
    assert changed_settings(saved, now) == {"optim.lr": (1.0, 2.0)}
