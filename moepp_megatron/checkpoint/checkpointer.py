"""Checkpoints with megatron dist_checkpointing (torch_dist), in Megatron-LM's layout:

    <dir>/iter_0000100/...                 one checkpoint (any TP/PP/EP layout can load it)
    <dir>/latest_checkpointed_iteration.txt

A save is complete when every rank has written its part and ``checksums.json`` records
every file (see files.py); only then does the tracker move (replaced atomically,
everything flushed to disk first), so a crash during a save leaves ``latest`` on the
previous complete checkpoint. A checkpoint holds the model, optimizer, LR scheduler, every
rank's RNG states, the training state (iteration, consumed samples) and the resolved config.

Resuming takes the newest checkpoint whose files all verify; the tracker is a hint. A newer
one that fails verification is skipped with a warning naming the damaged file (or, with
``checkpoint.on_damaged=stop``, stops the run); a directory with checkpoints none of which
verifies never starts over silently.

The weights load in any layout. The optimizer state loads where megatron-core 0.16.1 can
reshard it; elsewhere resuming fails with :class:`OptimizerReshardError` (``init_from``
loads the weights only).
"""

from __future__ import annotations

import errno
import random
import re
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
from torch.distributed.checkpoint.api import CheckpointException

from moepp_megatron.checkpoint.files import (
    is_complete,
    on_first_rank,
    recorded_bytes,
    verify,
    write_manifest,
)
from moepp_megatron.compat.megatron_internals import (
    allocate_optimizer_states_for_loading,
    load_optimizer_state,
)
from moepp_megatron.config.loader import to_dict, to_yaml
from moepp_megatron.config.schema import CheckpointConfig, RunConfig
from moepp_megatron.files import write_durably
from moepp_megatron.signals import stop_signals_deferred

TRACKER = "latest_checkpointed_iteration.txt"
# megatron 0.16.1's default distributed-optimizer sharding ("fully_sharded_model_space")
# cannot be loaded back; dp_reshardable can (see docs/MEGATRON_NOTES.md).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainState:
    iteration: int = 0
    consumed_samples: int = 0
    skipped_nonfinite_steps: int = 0


class CheckpointError(RuntimeError):
    """A checkpoint cannot be saved or resumed; the message says why and what to do."""


class ConfigMismatchError(CheckpointError, ValueError):
    pass


class OptimizerReshardError(CheckpointError):
    """The checkpoint's optimizer state cannot be loaded in this run's layout."""


class DamagedCheckpointError(CheckpointError):
    pass


class DiskFullError(CheckpointError):
    pass


# Model fields that change how the same weights are computed, not what they are.
IMPLEMENTATION_CHOICES = {
    "model.moe.token_dispatcher",
    "model.moe.grouped_gemm",
    "model.moe.compile_routing",
}


_ITERATION_DIR = re.compile(r"iter_(\d{7})")


def iteration_dir(directory: Path, iteration: int) -> Path:
    return directory / f"iter_{iteration:07d}"


def saved_iterations(directory: Path) -> list[int]:
    """Iterations of the ``iter_NNNNNNN`` directories, complete or not, ascending."""
    if not directory.is_dir():
        return []
    return sorted(int(m.group(1)) for p in directory.iterdir() if (m := _ITERATION_DIR.fullmatch(p.name)))


def read_latest_iteration(directory: Path) -> Optional[int]:
    tracker = directory / TRACKER
    if not tracker.is_file():
        return None
    try:
        text = tracker.read_text().strip()
    except UnicodeDecodeError:
        text = None
    if text is None or not text.isdigit():
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
    """The checkpoints in ``directory`` of one model (its chunks, as one module), and, for a
    training run, of its optimizer and LR scheduler; ``config`` is the run's checkpoint
    section (how many to keep, what to do with a damaged one, what a resume restores).
    Without an optimizer it saves and loads the weights only (conversion, ``init_from``)."""

    def __init__(self, directory: str | Path, config: CheckpointConfig, model, optimizer=None, scheduler=None):
        self.directory = Path(directory)
        self.config = config
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler

    def latest_iteration(self) -> Optional[int]:
        return read_latest_iteration(self.directory)

    def _state_dict(self, state: TrainState, run: dict) -> dict:
        model_sd = self.model.sharded_state_dict()
        sd = {"model": model_sd, "train_state": asdict(state), "config": run, "layout": _layout()}
        if self.optimizer is not None:
            sd["optimizer"] = self.optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)
            sd["scheduler"] = self.scheduler.state_dict()
            sd["rng_state"] = _rng_sharded_object()
        return sd

    def save(self, iteration: int, state: TrainState, run: RunConfig) -> Path:
        """Collective: checkpoint ``iteration`` with the training ``state``; ``run`` (the
        resolved config) is saved with it."""
        target = iteration_dir(self.directory, iteration)
        previous = self.latest_iteration()
        try:
            self._write(target, state, to_dict(run))
            on_first_rank(lambda: self._publish(iteration))
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            # Every rank is here: dist_checkpointing raises on all of them, on_first_rank too.
            if not self._out_of_space(e, previous):
                raise
            if dist.get_rank() == 0:
                shutil.rmtree(target, ignore_errors=True)  # the partial save, and its space
            raise DiskFullError(self._disk_full_message(target, previous)) from e
        return target

    def _write(self, target: Path, state: TrainState, run: dict) -> None:
        def fresh_directory():
            # A leftover of a save that crashed, or a damaged checkpoint resumed around.
            shutil.rmtree(target, ignore_errors=True)
            target.mkdir(parents=True)

        on_first_rank(fresh_directory)
        sd = self._state_dict(state, run)
        with stop_signals_deferred():  # it may start its writer-queue manager process
            dist_checkpointing.save(sd, str(target))
        on_first_rank(lambda: write_durably(target / "config.yaml", to_yaml(run)))
        write_manifest(target)

    def _publish(self, iteration: int) -> None:
        write_durably(self.directory / TRACKER, f"{iteration}\n")
        self._remove_old(iteration)

    def _out_of_space(self, error: BaseException, previous: Optional[int]) -> bool:
        """Collective: whether a failed save ran out of space. Only rank 0 sees the writers'
        errors (the others' CheckpointException is empty), and a full disk does not always
        say ENOSPC (torch's zip writer: "unexpected pos"), so the free space decides too:
        less than the last checkpoint took."""
        need = recorded_bytes(iteration_dir(self.directory, previous)) if previous is not None else 0
        full = _is_disk_full(error) or shutil.disk_usage(self.directory).free < max(need, 2**20)
        flag = torch.tensor([1.0 if full else 0.0], device=_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def _disk_full_message(self, target: Path, previous: Optional[int]) -> str:
        free = shutil.disk_usage(self.directory).free
        if previous is None:
            need, kept = "as much as one checkpoint of this run", "no checkpoint has been saved yet"
        else:
            last = iteration_dir(self.directory, previous)
            need = f"about {_size(recorded_bytes(last))} (the size of {last.name})"
            kept = f"{last} is still the latest checkpoint and resumes as before"
        return (
            f"no space left on the device while saving {target}: {_size(free)} free in "
            f"{self.directory}, a checkpoint needs {need}. The partial save was removed; {kept}. "
            f"Free space (or lower checkpoint.keep_last) and run again."
        )

    def _remove_old(self, latest: int) -> None:
        # Only complete checkpoints count. Directories after the latest one are leftovers
        # of a failed save (the next save of that iteration replaces them); incomplete ones
        # before it can never be resumed from.
        below = [iteration_dir(self.directory, i) for i in saved_iterations(self.directory) if i <= latest]
        complete = [p for p in below if is_complete(p)]
        doomed = [p for p in below if not is_complete(p)] + complete[: max(0, len(complete) - self.config.keep_last)]
        for old in doomed:
            shutil.rmtree(old, ignore_errors=True)

    def select(self, iteration: Optional[int] = None) -> tuple[Optional[int], list[str]]:
        """Collective: the checkpoint to resume from and warnings about the ones skipped.

        ``iteration`` (or ``checkpoint.load_iteration``) given: that one, which must verify.
        Otherwise the newest complete one that verifies (``checkpoint.on_damaged=stop``: the
        newest complete one, which must verify); None when the directory holds no
        checkpoint at all.
        """
        iteration = self.config.load_iteration if iteration is None else iteration
        strict = self.config.on_damaged == "stop"
        found = saved_iterations(self.directory)
        if iteration is not None:
            self._verify_or_raise(iteration, found)
            return iteration, []
        warnings = []
        try:
            tracker = self.latest_iteration()
        except ValueError as e:
            tracker = None
            warnings.append(f"WARNING: {e}; resuming from the newest checkpoint that verifies")
        if not found:
            if tracker is not None:
                raise DamagedCheckpointError(
                    f"{self.directory / TRACKER} names iteration {tracker}, but {self.directory} "
                    f"holds no iter_NNNNNNN directory; refusing to start the run over. Restore the "
                    f"checkpoints, or delete the tracker to start from iteration 0."
                )
            return None, warnings
        if tracker is None and not warnings:
            warnings.append(f"WARNING: no {TRACKER} in {self.directory}; resuming from the newest "
                            f"checkpoint that verifies")
        for candidate in reversed(found):
            path = iteration_dir(self.directory, candidate)
            if not is_complete(path) and (tracker is None or candidate > tracker):
                warnings.append(f"skipping {path}: a save that did not finish")
                continue
            problems = verify(path)
            if not problems:
                if tracker is not None and tracker != candidate:
                    warnings.append(f"{TRACKER} names iteration {tracker}; resuming from {candidate}")
                return candidate, warnings
            message = _verification_failure(path, problems)
            if strict:
                raise DamagedCheckpointError(
                    f"{message}\nStopping (checkpoint.on_damaged=stop). Resume from an earlier "
                    f"one with checkpoint.load_iteration=N (found: {_listing(found)}), or set "
                    f"checkpoint.on_damaged=fallback to take the newest that verifies."
                )
            warnings.append(f"WARNING: {message}\n  skipped; trying the checkpoint before it")
        raise DamagedCheckpointError(
            "\n".join(warnings) + f"\nno checkpoint in {self.directory} verifies; refusing to start "
            f"the run over. Restore a checkpoint, or use a new run directory."
        )

    def _verify_or_raise(self, iteration: int, found: list[int]) -> None:
        path = iteration_dir(self.directory, iteration)
        if iteration not in found:
            raise DamagedCheckpointError(
                f"checkpoint {path} does not exist (found: {_listing(found) or 'none'})"
            )
        problems = verify(path)
        if problems:
            raise DamagedCheckpointError(_verification_failure(path, problems))

    def load(self, iteration: int, run: RunConfig) -> TrainState:
        """Restore in place from a checkpoint :meth:`select` chose, for the run ``run`` (the
        model must be the saved one); returns the training state to continue from. The LR
        schedule and the data position always come back; ``checkpoint.load_optimizer=false``
        leaves the optimizer's moments fresh, ``load_rng=false`` the RNG streams as seeded.
        Without an optimizer: the weights only (a new run initialised from a checkpoint).
        """
        source = iteration_dir(self.directory, iteration)
        saved = dist_checkpointing.load_common_state_dict(str(source))
        check_model_config(saved.get("config", {}), to_dict(run), source)
        # Weights first, on their own: they reshard to any layout; the optimizer may not.
        loaded = dist_checkpointing.load({"model": self.model.sharded_state_dict()}, str(source))
        self.model.load_state_dict(loaded["model"])
        if self.optimizer is None:
            return TrainState()
        loaded = self._load_training_state(source, saved, run)
        self.scheduler.load_state_dict(saved["scheduler"])
        if "rng_state" in loaded:
            _set_rng_state(loaded["rng_state"])
        return TrainState(**saved["train_state"])

    def saved_config(self, iteration: int) -> dict:
        """The resolved config the checkpoint was saved with."""
        return yaml.safe_load((iteration_dir(self.directory, iteration) / "config.yaml").read_text())

    def _load_training_state(self, source: Path, saved: dict, run: RunConfig) -> dict:
        """The sharded parts of the training state: optimizer and RNG states, as asked."""
        model, optimizer = self.model, self.optimizer
        load_optimizer, load_rng = self.config.load_optimizer, self.config.load_rng
        error = None
        try:
            # Inside the try: building the loading state dict already fails (KeyError) for
            # some layout changes with the distributed optimizer.
            sharded = {}
            if load_optimizer:
                allocate_optimizer_states_for_loading(optimizer)
                sharded["optimizer"] = optimizer.sharded_state_dict(
                    model.sharded_state_dict(), is_loading=True, metadata=OPTIMIZER_METADATA
                )
            # RNG streams belong to ranks of the saving layout; a new layout reseeds.
            if load_rng and saved.get("layout") == _layout():
                sharded["rng_state"] = _rng_sharded_object()
            loaded = dist_checkpointing.load(sharded, str(source)) if sharded else {}
            if load_optimizer:
                load_optimizer_state(optimizer, loaded["optimizer"])
        except (Exception, CheckpointException) as e:  # CheckpointException is a BaseException
            error = e
        # Every rank raises (a rank that fails alone would leave the others in a collective).
        failed = torch.tensor([0.0 if error is None else 1.0], device=_device())
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if not failed.item():
            return loaded
        reason = _optimizer_layout_change(saved, run) if load_optimizer else None
        if reason is not None:
            rule = _RESHARD_RULES[run.optim.use_distributed_optimizer]
            raise OptimizerReshardError(
                f"cannot resume from {source}: {reason}; in megatron-core 0.16.1 {rule}. Resume "
                f"with the saving layout; or resume without the optimizer state "
                f"(checkpoint.load_optimizer=false: fresh Adam moments, the LR schedule and data "
                f"position kept); or start a new run from these weights with "
                f"checkpoint.init_from={self.directory} (weights only: iteration 0)."
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


def _optimizer_layout_change(saved: dict, run: RunConfig) -> Optional[str]:
    """What differs between the saving run and this one for the optimizer state, if anything."""
    was = saved.get("config", {}).get("optim", {}).get("use_distributed_optimizer")
    now = run.optim.use_distributed_optimizer
    if was != now:
        return f"optim.use_distributed_optimizer was {was} when it was saved, this run has {now}"
    if saved.get("layout") != _layout():
        kind = "distributed" if now else "non-distributed"
        return (
            f"its {kind} optimizer state was saved with {_describe_layout(saved['layout'])}, "
            f"this run has {_describe_layout(_layout())}"
        )
    return None


def _verification_failure(path: Path, problems: list[str]) -> str:
    return f"checkpoint {path} fails verification:\n  " + "\n  ".join(problems)


def _listing(iterations: list[int]) -> str:
    return ", ".join(str(i) for i in iterations)


def _size(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def _is_disk_full(error: BaseException) -> bool:
    # dist_checkpointing reports a writer's OSError inside a CheckpointException's text.
    while error is not None:
        if getattr(error, "errno", None) == errno.ENOSPC or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


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
