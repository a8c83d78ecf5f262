"""initialize_parallel in one process, again and again (a second conversion, a test): the
groups of the previous layout are destroyed, not left alive with their gloo threads."""

from __future__ import annotations

import os

import torch.distributed as dist

from moepp_megatron.parallel.initialize import initialize_parallel


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_initializing_again_leaks_no_process_groups_or_threads(single_process):
    initialize_parallel(cpu_mode=True)
    groups, threads = len(dist.distributed_c10d._world.pg_map), _threads()
    assert groups > 10  # megatron's groups, each with a TCP loop and worker threads
    for _ in range(3):
        initialize_parallel(cpu_mode=True)
    assert len(dist.distributed_c10d._world.pg_map) == groups
    assert _threads() == threads
