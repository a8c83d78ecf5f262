"""initialize_parallel in one process, again and again (a second conversion, a test): the
groups of the previous layout are destroyed, not left alive with their gloo threads."""

from __future__ import annotations

import os
from pathlib import Path

import torch.distributed as dist

from moepp_megatron.parallel.initialize import initialize_parallel


def _threads() -> int:
    """gloo's threads in this process (a TCP loop and workers per group): counted by name, so
    that other threads of the test process coming and going do not count."""
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{task}/comm").read_text())
        except FileNotFoundError:  # ended meanwhile
            pass
    return sum("gloo" in name for name in names)


def test_initializing_again_leaks_no_process_groups_or_threads(single_process):
    initialize_parallel(cpu_mode=True)
    groups, threads = len(dist.distributed_c10d._world.pg_map), _threads()
    assert groups > 10 and threads >= groups  # megatron's groups, each with a TCP loop and worker threads
    for _ in range(3):
        initialize_parallel(cpu_mode=True)
    assert len(dist.distributed_c10d._world.pg_map) == groups
    assert _threads() == threads
