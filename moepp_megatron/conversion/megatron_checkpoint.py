"""Megatron dist checkpoints read and written in ONE process, whatever their layout.

dist_checkpointing reshards on load: a checkpoint saved under any TP/PP/EP layout loads into
the model built at TP = PP = EP = 1 on a world-size-1 gloo group (CPU mode), and a checkpoint
written from that model loads under any layout. The model is built from the checkpoint's own
``config.yaml`` (the run's resolved config).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
import yaml

from moepp_megatron.checkpoint.checkpointer import (
    TRACKER,
    Checkpointer,
    TrainState,
    iteration_dir,
    read_latest_iteration,
)
from moepp_megatron.config.loader import from_dict
from moepp_megatron.config.schema import CheckpointConfig, ParallelConfig, RunConfig
from moepp_megatron.parallel.ports import free_port

_ITER_DIR = re.compile(r"iter_(\d{7})")
CONFIG_FILE = "config.yaml"


def resolve_checkpoint(path: str | Path, iteration: Optional[int] = None) -> tuple[Path, int]:
    """(checkpoints directory, iteration) for a run directory, its ``checkpoints/`` directory
    or one ``iter_NNNNNNN/`` directory; ``iteration`` picks one (default: the tracker's)."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint path {path} is not a directory")
    match = _ITER_DIR.fullmatch(path.name)
    if match:
        if iteration is not None and iteration != int(match.group(1)):
            raise ValueError(f"--iteration {iteration} contradicts the iteration directory {path}")
        directory, iteration = path.parent, int(match.group(1))
    else:
        candidates = [path, path / "checkpoints"]
        directory = next(
            (d for d in candidates if (d / TRACKER).is_file() or any(d.glob("iter_*"))), None
        )
        if directory is None:
            raise FileNotFoundError(
                f"{path}: no megatron checkpoint here (expected {TRACKER} and iter_NNNNNNN/ in it "
                "or in its checkpoints/ subdirectory, or an iter_NNNNNNN/ directory)"
            )
        if iteration is None:
            iteration = read_latest_iteration(directory)
            if iteration is None:
                found = sorted(p.name for p in directory.glob("iter_*"))
                raise FileNotFoundError(
                    f"{directory}: no {TRACKER}; pick a checkpoint with --iteration (found: {', '.join(found)})"
                )
    source = iteration_dir(directory, iteration)
    if not source.is_dir():
        raise FileNotFoundError(f"checkpoint {source} does not exist")
    if not (source / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"{source}: no {CONFIG_FILE} (the run config saved with every checkpoint)")
    return directory, iteration


# Fields older checkpoints' config.yaml hold that the schema no longer has (nothing ever
# read them).
RETIRED_FIELDS = {"checkpoint": ("async_save",)}


def read_run_config(directory: Path, iteration: int) -> dict:
    path = iteration_dir(directory, iteration) / CONFIG_FILE
    saved = yaml.safe_load(path.read_text())
    for section, names in RETIRED_FIELDS.items():
        for name in names:
            saved.get(section, {}).pop(name, None)
    return saved


def single_process() -> None:
    """torch.distributed with world size 1 (gloo, CPU mode) and megatron's groups at 1/1/1."""
    from moepp_megatron.parallel.initialize import initialize_parallel

    if torch.cuda.is_available():
        raise RuntimeError(
            "checkpoint conversion runs on CPU; hide the GPUs (CUDA_VISIBLE_DEVICES=) or use moepp-convert"
        )
    if dist.is_initialized():
        if dist.get_world_size() != 1:
            raise RuntimeError("checkpoint conversion runs in one process; launch it without torchrun")
    elif int(os.environ.get("WORLD_SIZE", "1")) != 1:
        raise RuntimeError("checkpoint conversion runs in one process; launch it without torchrun")
    else:
        # A private port: MASTER_PORT of the environment may belong to another job.
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    initialize_parallel(cpu_mode=True)



def _single_process_parallel() -> ParallelConfig:
    return ParallelConfig(cpu_mode=True)


def load_state(directory: Path, iteration: int) -> tuple[RunConfig, dict[str, torch.Tensor]]:
    """The run config and the full (unsharded) model state dict of a checkpoint."""
    from moepp_megatron.model.builder import build_model

    single_process()
    saved = read_run_config(directory, iteration)
    run = from_dict(RunConfig, saved, where=str(iteration_dir(directory, iteration) / CONFIG_FILE))
    # Per-expert weights (SequentialMLP) whatever the run used: dist_checkpointing converts
    # grouped-GEMM checkpoints, and the HF names are per expert.
    model = dataclasses.replace(run.model, moe=dataclasses.replace(run.model.moe, grouped_gemm=False))
    # fp32 parameters: bf16 checkpoints (GPU runs) load into them exactly.
    chunks = build_model(model, _single_process_parallel(), bf16=False)
    loading = dataclasses.replace(run, model=model, parallel=_single_process_parallel())
    checkpointer = Checkpointer(directory, CheckpointConfig(), chunks)  # the weights only
    checkpointer.select(iteration)  # its files must verify
    checkpointer.load(iteration, loading)
    state = {k: v for k, v in chunks[0].state_dict().items() if not k.endswith("._extra_state")}
    return run, state


def save_state(
    state: dict[str, torch.Tensor], run: RunConfig, directory: Path, iteration: int = 0
) -> Path:
    """Write ``state`` (full megatron names) as a dist checkpoint of ``run``'s model at
    ``directory/iter_NNNNNNN`` with the tracker, in the trainer's layout."""
    from moepp_megatron.model.builder import build_model

    single_process()
    chunks = build_model(run.model, _single_process_parallel(), bf16=False)
    model = chunks[0]
    own = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in own.items() if not k.endswith("._extra_state")}
    missing = sorted(k for k in shapes if k not in state and own[k].numel() > 0)
    unexpected = sorted(set(state) - set(shapes))
    if missing or unexpected:
        raise KeyError(f"megatron parameters missing: {missing}; unexpected: {unexpected}")
    for name, tensor in state.items():
        if tuple(tensor.shape) != shapes[name]:
            raise ValueError(f"megatron {name}: shape {tuple(tensor.shape)}, the model needs {shapes[name]}")
    # load_state_dict copies into the fp32 parameters (bf16 / fp16 values convert exactly).
    model.load_state_dict({k: state.get(k, v) for k, v in own.items()})
    Checkpointer(directory, CheckpointConfig(keep_last=1), chunks).save(iteration, TrainState(), run)
    return iteration_dir(directory, iteration)

