"""Timing (median of repeats after warm-up), peak memory and the device in use.

Clocks: on a GPU, wall time with the device synchronised around every timed call. On CPU,
the process's CPU time: on a machine shared with other jobs, wall time mostly measures
them; with one intra-op thread (the CPU default of ``moepp-bench``) CPU time is the work
this process did, and no OpenMP spin-waiting is counted.
"""

from __future__ import annotations

import resource
import statistics
import time
from typing import Callable

import torch


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock_name(device: torch.device) -> str:
    return "wall" if device.type == "cuda" else "process_cpu_time"


def _clock(device: torch.device):
    return time.perf_counter if device.type == "cuda" else time.process_time


def time_calls(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Seconds per call of ``fn`` on the device's clock, ``repeats`` times after ``warmup``
    untimed calls."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    synchronize(device)
    clock = _clock(device)
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        synchronize(device)
        times.append(clock() - start)
    return times


def summarize(times: list[float]) -> dict:
    """Median (the reported number), min, max and the raw samples, in milliseconds."""
    ms = [t * 1e3 for t in times]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "samples_ms": ms}


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    """GPU: torch.cuda.max_memory_allocated since the last reset. CPU: the process's peak
    resident set size (getrusage; Linux reports KiB), which includes everything built."""
    if device.type == "cuda":
        return {"kind": "cuda_max_memory_allocated", "bytes": torch.cuda.max_memory_allocated(device)}
    return {"kind": "cpu_peak_rss", "bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
