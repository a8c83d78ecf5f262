"""Loading a checkpoint saved with EP=2 on 2 ranks (DP=2) in other layouts.

Model weights load in every layout. Optimizer state loads where megatron-core 0.16.1 can
reshard it, and elsewhere the resume fails with an ``OptimizerReshardError`` that names both
layouts and points at ``checkpoint.init_from`` (weights only):

=====================  ===========  ============================  ============================
layout loaded          weights      non-distributed optimizer     distributed optimizer
=====================  ===========  ============================  ============================
EP=2 DP=2 (same)       exact        exact                         exact
EP=1 DP=1 (1 rank)     exact        error (EP>1 -> EP=1)          error
TP=2 + SP, EP=1        exact        error (EP>1 -> EP=1)          error
EP=4 DP=4 (4 ranks)    exact        exact                         error (EP change)
EP=2 DP=4 (4 ranks)    exact        exact                         exact (DP change only)
TP=2 + SP, EP=2 DP=2   exact        exact                         error (TP change)
PP=2, EP=2 DP=2        exact        exact                         error (PP change)
=====================  ===========  ============================  ============================

"exact": the state loaded in the new layout, saved again in a layout-independent form (every
tensor whole, per parameter; ``fully_reshardable`` for the distributed optimizer), equals
the state the source run saved in that form, bit for bit: weights, Adam moments, fp32 main
parameters, step counts and param-group settings.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed import run_distributed
from tests.training.runs import run_config_writer

# The export format: every tensor whole, per parameter, without the chained-optimizer prefix.
EXPORT_METADATA = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
OPTIMIZERS = ("plain", "distributed")
TP2_SP = ["parallel.tensor=2", "parallel.sequence_parallel=true"]
# name -> (world size, overrides of the source config).
LAYOUTS = {
    "same": (2, []),
    "ep1": (1, ["parallel.expert=1"]),
    "tp2_sp_ep1": (2, [*TP2_SP, "parallel.expert=1"]),
    "ep4": (4, ["parallel.expert=4"]),
    "ep2_dp4": (4, []),
    "tp2_sp_ep2": (4, TP2_SP),
    "pp2_ep2": (4, ["parallel.pipeline=2"]),
}
OPTIMIZER_LOADS = {
    "plain": {"same", "ep4", "ep2_dp4", "tp2_sp_ep2", "pp2_ep2"},
    "distributed": {"same", "ep2_dp4"},
}


def _export(trainer, directory: Path, with_optimizer: bool) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    if dist.get_rank() == 0:
        directory.mkdir(parents=True)
    dist.barrier()
    model = trainer.chunks.sharded_state_dict()
    state = {"model": model}
    if with_optimizer:
        state["optimizer"] = trainer.optimizer.sharded_state_dict(model, metadata=EXPORT_METADATA)
    dist_checkpointing.save(state, str(directory))


def _train_sources_then_load(configs: dict[str, str], layouts: dict[str, list[str]], exports: str) -> dict:
    """Train the sources (EP=2 on 2 ranks, 3 iterations, checkpoint at 3), then load them in
    the other 2-rank layouts."""
    from moepp_megatron.config import load_config
    from moepp_megatron.training.trainer import Trainer

    for optimizer, config in configs.items():
        trainer = Trainer(load_config(config))
        assert trainer.run() == 0
        _export(trainer, Path(exports) / f"{optimizer}-source", with_optimizer=True)
    return _load_in_layouts(configs, layouts, exports)


def _load_in_layouts(configs: dict[str, str], layouts: dict[str, list[str]], exports: str) -> dict:
    """For each optimizer kind and layout: build the trainer in that layout and restore the
    source's checkpoint as its resume path does; export what was loaded. Returns the error
    message (None: loaded) per case."""
    from moepp_megatron.checkpoint.checkpointer import OptimizerReshardError
    from moepp_megatron.config import load_config
    from moepp_megatron.training.trainer import Trainer

    errors = {}
    for optimizer, config in configs.items():
        for layout, overrides in layouts.items():
            name = f"{optimizer}-{layout}"
            if layout == "same":  # the real resume path
                trainer = Trainer(load_config(config))
                assert trainer.state.iteration == 3
                errors[name] = None
            else:
                trainer = Trainer(load_config(config, [*overrides, "checkpoint.resume=false"]))
                try:
                    trainer.state = trainer.checkpointer.load(3, trainer.resolved)
                    errors[name] = None
                except OptimizerReshardError as e:
                    errors[name] = str(e)
            _export(trainer, Path(exports) / name, with_optimizer=errors[name] is None)
    if "ep1" in layouts:  # and the trainer's own resume path refuses it too
        try:
            Trainer(load_config(configs["plain"], layouts["ep1"]))
        except OptimizerReshardError as e:
            errors["resume-plain-ep1"] = str(e)
    return errors


@pytest.fixture(scope="module")
def resharded(tiny_data, tmp_path_factory):
    directory = tmp_path_factory.mktemp("resharding")
    write = run_config_writer(tiny_data, directory)
    configs = {
        optimizer: str(write(optimizer, training={"train_iters": 3},
                             optim={"use_distributed_optimizer": optimizer == "distributed"}))
        for optimizer in OPTIMIZERS
    }
    exports = directory / "exports"
    layouts = {world: {name: overrides for name, (size, overrides) in LAYOUTS.items() if size == world}
               for world in (1, 2, 4)}
    errors = run_distributed(_train_sources_then_load, 2, configs, layouts[2], str(exports))[0]
    for world in (4, 1):
        errors.update(run_distributed(_load_in_layouts, world, configs, layouts[world], str(exports))[0])
    return errors, exports, directory


def _plain_tensors(directory: Path) -> dict:
    from megatron.core import dist_checkpointing

    def flatten(tree, prefix=""):
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from flatten(value, f"{prefix}{key}/")
            elif "_extra_state" not in str(key):
                yield f"{prefix}{key}", value

    return dict(flatten(dist_checkpointing.load_plain_tensors(str(directory))))


def _weights(tensors: dict) -> dict:
    return {key: value for key, value in tensors.items() if not key.startswith("optimizer")}


def _differences(expected: dict, actual: dict) -> list[str]:
    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return a == b

    missing = sorted(set(expected) ^ set(actual))
    return missing + [key for key in sorted(set(expected) & set(actual)) if not same(expected[key], actual[key])]


CASES = [(optimizer, layout) for optimizer in OPTIMIZERS for layout in LAYOUTS]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, layout", CASES, ids=[f"{o}-{l}" for o, l in CASES])
def test_weights_load_in_every_layout(single_process, resharded, optimizer, layout):
    _, exports, _ = resharded
    source = _weights(_plain_tensors(exports / f"{optimizer}-source"))
    loaded = _weights(_plain_tensors(exports / f"{optimizer}-{layout}"))
    assert len(source) >= 10
    assert _differences(source, loaded) == []


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, layout", CASES, ids=[f"{o}-{l}" for o, l in CASES])
def test_optimizer_state_reshards_or_fails_clearly(single_process, resharded, optimizer, layout):
    errors, exports, directory = resharded
    error = errors[f"{optimizer}-{layout}"]
    if layout in OPTIMIZER_LOADS[optimizer]:
        assert error is None
        source = _plain_tensors(exports / f"{optimizer}-source")
        assert len([k for k in source if "exp_avg_sq" in k]) > 10
        assert _differences(source, _plain_tensors(exports / f"{optimizer}-{layout}")) == []
    else:
        assert error is not None, "the optimizer state loaded in a layout it cannot be resharded to"
        assert str(directory / optimizer / "checkpoints" / "iter_0000003") in error
        assert "saved with TP=1 PP=1 EP=2 DP=2" in error
        assert f"checkpoint.init_from={directory / optimizer / 'checkpoints'}" in error


@pytest.mark.slow
def test_resume_in_unsupported_layout_is_refused(resharded):
    errors, _, _ = resharded
    refused = errors["resume-plain-ep1"]
    assert "non-distributed optimizer state was saved with TP=1 PP=1 EP=2 DP=2" in refused
    assert "this run has TP=1 PP=1 EP=1 DP=1" in refused
