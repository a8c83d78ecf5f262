"""Explicit CPU + gloo mode for megatron-core 0.16.1.

megatron-core assumes a CUDA device everywhere (``torch.cuda.current_device()``,
``device='cuda'`` allocations, CUDA streams/events, the CUDA RNG tracker, ...). This module
patches the small set of places on the paths we use (GPTModel with MoE, the token
dispatchers, DDP and the distributed optimizer, grad clipping, the pipeline schedules,
activation recompute, the RNG tracker and ``dist_checkpointing`` with the ``torch_dist``
backend) so that they run on CPU, with gloo process groups, in several processes. It exists
for tests and development on machines without a GPU.

Switching it on
    * explicitly: ``from moepp_megatron.compat.cpu import enable_cpu_mode; enable_cpu_mode()``
      (do this before building models/optimizers), or
    * through ``moepp_megatron.parallel.initialize.initialize_parallel(cpu_mode=True)``, or with
      ``MOEPP_CPU_MODE=1`` in the environment (``cpu_mode_requested()``), which
      ``initialize_parallel`` honours when ``cpu_mode`` is left at ``None``.

The mode refuses to switch on when ``torch.cuda.is_available()``: on a GPU machine nothing here
is ever applied and the GPU path never goes through this module. Every patch replaces
behaviour that would otherwise raise (there is no CUDA device), so enabling the mode does not
change any computation that worked before. Enabling is idempotent and process-wide; there is
no way to switch it off again (start a new process).

How it works (details next to each patch in :mod:`cpu_cuda`, :mod:`cpu_rng` and
:mod:`cpu_megatron`):
    * the CPU plays the role of "the current CUDA device": ``torch.cuda.current_device()`` and
      friends are stubbed, streams/events are no-op objects;
    * a ``TorchFunctionMode`` maps ``device='cuda'`` / ``.cuda()`` / ``.to('cuda')`` /
      ``pin_memory=True`` to plain CPU tensors;
    * the CPU default generator plays the role of the CUDA generator; the model-parallel RNG
      tracker keeps separate CPU generator states per name, so ``get_cuda_rng_tracker().fork()``
      really forks, and activation recompute restores the states;
    * a few targeted fixes in megatron-core (see :mod:`cpu_megatron`).

Limits
    * The device-mapping mode is a thread-local torch function mode: it is pushed in the thread
      that calls ``enable_cpu_mode`` (run the model in that thread). Other threads only get the
      ``torch.cuda`` stubs (``current_device()`` is the CPU device, streams are no-ops).
    * ``loss.backward()`` / ``torch.autograd.backward`` run with the mode active (recompute
      allocates during backward); ``torch.autograd.grad`` does not (megatron only uses it for
      CUDA graphs).
    * GPU-only features stay unavailable: Transformer Engine / Apex modules, FP8, grouped GEMM
      (``GroupedMLP``/``TEGroupedMLP``: use ``moe_grouped_gemm=False`` -> ``SequentialMLP``),
      fused permute, the flex (DeepEP/HybridEP) dispatcher, CUDA graphs, NCCL user buffers.
    * The optimizer is always torch Adam/SGD (no fused kernels).
"""

from __future__ import annotations

import os
import threading

import torch

__all__ = ["enable_cpu_mode", "cpu_mode_enabled", "cpu_mode_requested", "CPU_MODE_ENV_VAR"]

CPU_MODE_ENV_VAR = "MOEPP_CPU_MODE"

_LOCK = threading.Lock()
_ENABLED = False


def cpu_mode_requested() -> bool:
    """True when the environment asks for the CPU mode (``MOEPP_CPU_MODE=1``)."""
    return os.environ.get(CPU_MODE_ENV_VAR, "").strip() == "1"


def cpu_mode_enabled() -> bool:
    """True once :func:`enable_cpu_mode` has run in this process."""
    return _ENABLED


def _check_no_cuda() -> None:
    if torch.cuda.is_available():
        raise RuntimeError(
            "moepp_megatron CPU mode refused: torch.cuda.is_available() is True. The CPU + gloo "
            "mode is for machines without a GPU and never runs alongside CUDA; unset "
            f"{CPU_MODE_ENV_VAR} / pass cpu_mode=False to use the GPU (nccl) path."
        )


def enable_cpu_mode() -> None:
    """Apply all CPU-mode patches (idempotent).

    Raises:
        RuntimeError: if CUDA is available in this process.
    """
    global _ENABLED
    with _LOCK:
        if _ENABLED:
            return
        _check_no_cuda()
        from . import cpu_cuda, cpu_megatron, cpu_rng

        cpu_cuda.apply()
        cpu_rng.apply()
        cpu_megatron.apply()
        _ENABLED = True
