"""Shared fixtures. Multi-process tests spawn their own ranks (tests/distributed.py)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed import find_free_port, forget_port_claims


def pytest_unconfigure(config):
    forget_port_claims()


@pytest.fixture(scope="session")
def single_process():
    """torch.distributed (gloo, world size 1) and megatron's parallel state, in CPU mode."""
    from moepp_megatron.parallel.initialize import destroy_parallel, initialize_parallel

    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    os.environ["MASTER_PORT"] = str(find_free_port())
    torch.set_num_threads(2)
    initialize_parallel(cpu_mode=True)
    yield
    destroy_parallel()
