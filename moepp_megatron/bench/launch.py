"""Run a function in fresh processes with the torchrun environment (torch's elastic
launcher, in-process): for expert-parallel benchmarks, and for a clean peak-memory reading."""

from __future__ import annotations

import uuid
from typing import Any, Callable

from torch.distributed.launcher.api import LaunchConfig, elastic_launch


def launch(fn: Callable[..., Any], num_processes: int, *args: Any) -> list[Any]:
    """``fn(*args)`` on ranks 0..num_processes-1 (RANK, WORLD_SIZE, MASTER_ADDR, ... set);
    returns the ranks' return values in rank order. ``fn`` must be a top-level function."""
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=num_processes,
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",
        run_id=f"moepp-bench-{uuid.uuid4().hex[:12]}",
        max_restarts=0,
        monitor_interval=0.1,
        start_method="spawn",
    )
    results = elastic_launch(config, fn)(*args)
    return [results[rank] for rank in range(num_processes)]
