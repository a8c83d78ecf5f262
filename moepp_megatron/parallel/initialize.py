"""Process-group and model-parallel initialisation (GPU/nccl or CPU/gloo).

``initialize_parallel`` reads the usual torchrun environment (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT, LOCAL_RANK), initialises ``torch.distributed`` if needed, builds megatron's
model-parallel groups and seeds every RNG like Megatron-LM's ``_set_random_seed``.
"""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from moepp_megatron.compat.cpu import cpu_mode_requested, enable_cpu_mode
from moepp_megatron.compat.megatron_internals import destroy_model_parallel_groups
from moepp_megatron.parallel.layout import NoCudaError, check_sizes
from moepp_megatron.parallel.ports import free_port

__all__ = ["initialize_parallel", "destroy_parallel"]


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise RuntimeError(
                f"torch.distributed is not initialised and ${name} is not set: launch with "
                "torchrun (or set RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, LOCAL_RANK)"
            )
        return default
    return int(value)


def initialize_parallel(
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    expert_parallel: int = 1,
    virtual_pipeline_parallel: int | None = None,
    expert_tensor_parallel: int | None = None,
    seed: int = 1234,
    cpu_mode: bool | None = None,
) -> None:
    """Initialise torch.distributed, megatron's parallel groups and the RNGs.

    Args:
        tensor_parallel, pipeline_parallel, expert_parallel: model-parallel sizes.
        virtual_pipeline_parallel: interleaved-pipeline chunks per rank (None: not interleaved).
        expert_tensor_parallel: TP size inside the experts (None: same as ``tensor_parallel``).
        seed: base seed; rank-dependent offsets are applied like Megatron-LM
            (``seed + 100 * pp_rank`` for torch/numpy/random, the model-parallel RNG tracker
            adds the TP/EP offsets).
        cpu_mode: True: CPU + gloo (:func:`enable_cpu_mode`); False: CUDA + nccl;
            None: CPU mode iff ``MOEPP_CPU_MODE=1``.

    Raises:
        ValueError: if the world size is not divisible by the requested parallel sizes.
        RuntimeError: CPU mode requested while CUDA is available, or no launch environment.
    """
    if cpu_mode is None:
        cpu_mode = cpu_mode_requested()
    if cpu_mode:
        enable_cpu_mode()
        backend = "gloo"
    else:
        backend = "nccl"

    if dist.is_initialized():
        world_size = dist.get_world_size()
    else:
        world_size = _env_int("WORLD_SIZE", 1)
    check_sizes(
        world_size,
        tensor_parallel,
        pipeline_parallel,
        expert_parallel,
        virtual_pipeline_parallel,
        expert_tensor_parallel,
    )

    if not cpu_mode:
        if not torch.cuda.is_available():
            raise NoCudaError()
        torch.cuda.set_device(_env_int("LOCAL_RANK", 0))

    if not dist.is_initialized():
        rank = _env_int("RANK", 0)
        if world_size == 1:
            # Single process without a launcher: any free local port will do.
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            if "MASTER_PORT" not in os.environ:
                os.environ["MASTER_PORT"] = str(free_port())
        dist.init_process_group(
            backend=backend,
            init_method="env://",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(minutes=10),
        )

    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel_groups()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=(
            virtual_pipeline_parallel
            if virtual_pipeline_parallel is not None and virtual_pipeline_parallel > 1
            else None
        ),
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )

    _set_random_seed(seed)


def _set_random_seed(seed: int) -> None:
    """Megatron-LM's ``_set_random_seed``: different seeds per pipeline stage."""
    stage_seed = seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(stage_seed)
    np.random.seed(stage_seed)
    torch.manual_seed(stage_seed)
    # Default "device" RNG plus the data-, tensor- and expert-parallel tracker states (on CPU
    # the tracker is moepp_megatron.compat.cpu_rng.CpuRNGStatesTracker).
    model_parallel_cuda_manual_seed(stage_seed, force_reset_rng=True)


def destroy_parallel() -> None:
    """Tear down megatron's parallel groups and the default process group (if any)."""
    if parallel_state.model_parallel_is_initialized():
        destroy_model_parallel_groups()
    if dist.is_initialized():
        dist.destroy_process_group()
