"""GPU tests (``pytest -m gpu``): what only a GPU can show, run by scripts/gpu_check.sh.

They run on the GPU when there is one. The GPU check's CPU dry run sets
``MOEPP_GPU_TESTS_ON_CPU=1`` to run them on CPU at the same tiny shapes (so they cannot rot
between GPU sessions); otherwise they are skipped, since the CPU suite covers the same
comparisons.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import find_free_port

ON_CPU_ENV = "MOEPP_GPU_TESTS_ON_CPU"


@pytest.fixture(scope="session")
def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get(ON_CPU_ENV) == "1":
        return torch.device("cpu")
    pytest.skip(f"needs a GPU (or {ON_CPU_ENV}=1, the GPU check's CPU dry run)")


@pytest.fixture(scope="session")
def device_process(device):
    """torch.distributed (world size 1) and megatron's groups: nccl on the GPU, or CPU mode."""
    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(find_free_port())
    initialize_parallel(cpu_mode=device.type == "cpu")
    yield device
    destroy_parallel()


def cuda_only(device: torch.device, reason: str) -> None:
    if device.type != "cuda":
        pytest.skip(f"CUDA only: {reason}")
