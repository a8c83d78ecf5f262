"""Checkpoints with megatron dist_checkpointing (torch_dist), in Megatron-LM's layout:

    <dir>/iter_0000100/...                 one checkpoint (any TP/PP/EP layout can load it)
    <dir>/latest_checkpointed_iteration.txt

The tracker file is replaced atomically, and only after every rank has finished writing,
so a crash during a save leaves ``latest`` on the previous complete checkpoint. A
checkpoint holds the model, optimizer, LR scheduler, every rank's RNG states, the
training state (iteration, consumed samples) and the resolved config.

The weights load in any layout. The optimizer state loads where megatron-core 0.16.1 can
reshard it; elsewhere resuming fails with :class:`OptimizerReshardError` (``init_from``
loads the weights only).
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from moepp_megatron.training.signals import stop_signals_deferred

TRACKER = "latest_checkpointed_iteration.txt"
# megatron 0.16.1's default distributed-optimizer sharding ("fully_sharded_model_space")
# cannot be loaded back; dp_reshardable can (see MEGATRON_NOTES.md).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_nonfinite_steps: int = 0


class ConfigMismatchError(ValueError):
    pass


class OptimizerReshardError(RuntimeError):
    """The checkpoint's optimizer state cannot be loaded in this run's layout."""


# Model fields that change how the same weights are computed, not what they are.
IMPLEMENTATION_CHOICES = {
    "model.moe.token_dispatcher",
    "model.moe.grouped_gemm",
    "model.moe.compile_routing",
}


def iteration_dir(directory: Path, iteration: int) -> Path:
    return directory / f"iter_{iteration:07d}"


def read_latest_iteration(directory: Path) -> Optional[int]:
    tracker = directory / TRACKER
    if not tracker.is_file():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise ValueError(f"{tracker}: expected an iteration number, found {text!r}")
    return int(text)


def _rng_state() -> dict:
    return {
        "random": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }


def _set_rng_state(state: dict) -> None:
    random.setstate(state["random"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _layout() -> dict:
    return {
        "world_size": dist.get_world_size(),
        "tensor": parallel_state.get_tensor_model_parallel_world_size(),
        "pipeline": parallel_state.get_pipeline_model_parallel_world_size(),
        "expert": parallel_state.get_expert_model_parallel_world_size(),
    }


def _rng_sharded_object() -> ShardedObject:
    # One entry per global rank: a resumed job with the same layout gets its own stream back.
    rank, world = dist.get_rank(), dist.get_world_size()
    return ShardedObject("rng_state", _rng_state(), (world,), (rank,), replica_id=0)


class Checkpointer:
    def __init__(self, directory: str | Path, keep_last: int) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last

    def latest_iteration(self) -> Optional[int]:
        return read_latest_iteration(self.directory)

    def _state_dict(self, model, optimizer, scheduler, state, config, is_loading):
        model_sd = model.sharded_state_dict()
        sd = {"model": model_sd, "train_state": asdict(state), "config": config, "layout": _layout()}
        if optimizer is not None:
            sd["optimizer"] = optimizer.sharded_state_dict(
                model_sd, is_loading=is_loading, metadata=OPTIMIZER_METADATA
            )
            sd["scheduler"] = scheduler.state_dict()
            sd["rng_state"] = _rng_sharded_object()
        return sd

    def save(self, iteration: int, model, optimizer, scheduler, state: TrainState, config: dict) -> Path:
        target = iteration_dir(self.directory, iteration)
        if dist.get_rank() == 0:
            # A leftover of a save that crashed; the tracker never pointed at it.
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)
        dist.barrier()
        sd = self._state_dict(model, optimizer, scheduler, state, config, is_loading=False)
        with stop_signals_deferred():  # it may start its writer-queue manager process
            dist_checkpointing.save(sd, str(target))
        dist.barrier()
        if dist.get_rank() == 0:
            (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            self._write_tracker(iteration)
            self._remove_old()
        dist.barrier()
        return target

    def _write_tracker(self, iteration: int) -> None:
        tmp = self.directory / f".{TRACKER}.tmp"
        tmp.write_text(f"{iteration}\n")
        with open(tmp) as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.directory / TRACKER)

    def _remove_old(self) -> None:
        # Directories after the latest one are leftovers of a failed save (the next save of
        # that iteration replaces them): they are not among the checkpoints kept.
        latest = iteration_dir(self.directory, self.latest_iteration())
        complete = sorted(p for p in self.directory.glob("iter_*") if p.name <= latest.name)
        for old in complete[: max(0, len(complete) - self.keep_last)]:
            shutil.rmtree(old, ignore_errors=True)

    def load(
        self, model, optimizer, scheduler, config: dict, iteration: Optional[int] = None
    ) -> TrainState:
        """Restore everything in place; returns the training state to continue from.

        ``optimizer=None`` loads the weights only (a new run initialised from a checkpoint).
        """
        iteration = self.latest_iteration() if iteration is None else iteration
        if iteration is None:
            raise FileNotFoundError(f"no {TRACKER} in {self.directory}")
        source = iteration_dir(self.directory, iteration)
        if not source.is_dir():
            raise FileNotFoundError(f"checkpoint {source} does not exist")
        saved = dist_checkpointing.load_common_state_dict(str(source))
        check_model_config(saved.get("config", {}), config, source)
        # Weights first, on their own: they reshard to any layout; the optimizer may not.
        loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(source))
        model.load_state_dict(loaded["model"])
        if optimizer is None:
            return TrainState()
        loaded = self._load_optimizer(source, saved, model, optimizer, scheduler, config)
        scheduler.load_state_dict(loaded["scheduler"])
        if "rng_state" in loaded:
            _set_rng_state(loaded["rng_state"])
        return TrainState(**loaded["train_state"])

    def _load_optimizer(self, source: Path, saved: dict, model, optimizer, scheduler, config: dict) -> dict:
        _allocate_distributed_optimizer_states(optimizer)
        sd = self._state_dict(model, optimizer, scheduler, TrainState(), config, is_loading=True)
        del sd["model"]
        if saved.get("layout") != _layout():
            # RNG streams belong to ranks of the saving layout; a new layout reseeds.
            sd.pop("rng_state")
        error = None
        try:
            loaded = dist_checkpointing.load(sd, str(source))
            _restore_adam_steps(loaded["optimizer"])
            with torch.no_grad():  # the distributed optimizer copies into views of the params
                optimizer.load_state_dict(loaded["optimizer"])
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            error = e
        # Every rank raises (a rank that fails alone would leave the others in a collective).
        failed = torch.tensor([0.0 if error is None else 1.0], device=_device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if not failed.item():
            return loaded
        reason = _optimizer_layout_change(saved, config)
        if reason is not None:
            rule = _RESHARD_RULES[bool(config["optim"]["use_distributed_optimizer"])]
            raise OptimizerReshardError(
                f"cannot resume from {source}: {reason}; in megatron-core 0.16.1 {rule}. Resume "
                f"with the saving layout, or start a new run from these weights with "
                f"checkpoint.init_from={self.directory} (weights only: fresh optimizer and LR "
                f"schedule, iteration 0)."
            ) from error
        if error is not None:
            raise error
        raise RuntimeError(f"another rank failed to load the optimizer state from {source}")


# What megatron-core 0.16.1 can reshard, measured (tests/training/test_resharding.py).
_RESHARD_RULES = {
    False: "the non-distributed optimizer's state reshards across TP, PP, EP and DP changes as "
           "long as EP stays 1 or stays > 1 (expert parameters have an optimizer of their own "
           "only when EP > 1)",
    True: "the distributed optimizer's state (dp_reshardable) reshards across data-parallel "
          "size changes only, with the same TP, PP and EP",
}


def _describe_layout(layout: dict) -> str:
    data = layout["world_size"] // (layout["tensor"] * layout["pipeline"])
    return f"TP={layout['tensor']} PP={layout['pipeline']} EP={layout['expert']} DP={data}"


def _optimizer_layout_change(saved: dict, config: dict) -> Optional[str]:
    """What differs between the saving run and this one for the optimizer state, if anything."""
    was = saved.get("config", {}).get("optim", {}).get("use_distributed_optimizer")
    now = config.get("optim", {}).get("use_distributed_optimizer")
    if was != now:
        return f"optim.use_distributed_optimizer was {was} when it was saved, this run has {now}"
    if saved.get("layout") != _layout():
        kind = "distributed" if now else "non-distributed"
        return (
            f"its {kind} optimizer state was saved with {_describe_layout(saved['layout'])}, "
            f"this run has {_describe_layout(_layout())}"
        )
    return None


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _allocate_distributed_optimizer_states(optimizer) -> None:
    # Without Apex/TE the inner optimizer is torch Adam, whose states (and 'step') appear at
    # its first step; megatron's DistributedOptimizer.state_dict() asserts on a single step,
    # so a fresh one cannot build its loading state dict. Dummy states, replaced by the load.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(tree) -> None:
    # dp_reshardable buckets carry torch Adam's per-parameter 'step' as a non-persistent
    # object: the value before loading (the dummy states above). DistributedOptimizer.
    # load_state_dict restores the step from param_groups, then copies the bucket entries
    # over the states, which would put that stale step back (measured: 1 instead of 3).
    if isinstance(tree, dict) and tree.get("param_state_sharding_type") == "dp_reshardable":
        steps = {group["step"] for group in tree["optimizer"]["param_groups"] if "step" in group}
        if steps:
            (step,) = steps
            _set_bucket_steps(tree["param_state"], step)
    elif isinstance(tree, dict):
        for value in tree.values():
            _restore_adam_steps(value)


def _set_bucket_steps(tree, step) -> None:
    if isinstance(tree, dict):
        if "step" in tree and "padding" in tree:
            tree["step"] = torch.tensor(step, dtype=torch.float)
        for value in tree.values():
            _set_bucket_steps(value, step)
    elif isinstance(tree, list):
        for value in tree:
            _set_bucket_steps(value, step)


def check_model_config(saved: dict, current: dict, source: Path) -> None:
    """The model must be the one that was saved; list every field that differs."""
    diffs = []

    def walk(a, b, path):
        if path in IMPLEMENTATION_CHOICES:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                walk(a.get(key), b.get(key), f"{path}.{key}")
        elif a != b:
            diffs.append(f"{path}: checkpoint has {a!r}, this run has {b!r}")

    walk(saved.get("model", {}), current.get("model", {}), "model")
    if diffs:
        raise ConfigMismatchError(
            f"checkpoint {source} was saved for a different model:\n  " + "\n  ".join(diffs)
        )
