"""CPU mode, part 2: the model-parallel RNG tracker on the CPU generator.

Applied by :func:`moepp_megatron.compat.cpu.enable_cpu_mode` only. On CPU there is one
default generator; it plays the role of the CUDA device generator. The tracker keeps one
saved generator state per name (data-parallel, model-parallel, expert-parallel RNG) and
``fork(name)`` swaps that state in and out of the default generator, exactly like the CUDA
tracker swaps CUDA generator states. Seeding is deterministic: the same seed and ranks give the
same states. ``tensor_parallel.checkpoint`` snapshots/restores the default state plus all
tracker states (through the patched ``_get_cuda_rng_state``/``_set_cuda_rng_state``), so
dropout in recomputed regions reproduces the forward pass.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.tensor_parallel import random as mrandom


def _get_cpu_rng_state(device="cuda", clone: bool = False, graph_safe: bool = False):
    # Replaces random._get_cuda_rng_state (torch.cuda.default_generators[...] does not exist).
    return torch.get_rng_state()


def _set_cpu_rng_state(new_state, device=-1, graph_safe: bool = False) -> None:
    # Replaces random._set_cuda_rng_state (it goes through torch.cuda._lazy_call).
    torch.set_rng_state(new_state)


class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
    """``CudaRNGStatesTracker`` whose states are CPU default-generator states.

    Subclasses the CUDA tracker so megatron's ``isinstance(..., CudaRNGStatesTracker)`` checks
    (``get_all_rng_states``) keep working.
    """

    def __init__(self, use_cudagraphable_rng: bool = False, is_inference_rng_tracker: bool = False):
        if use_cudagraphable_rng:
            raise RuntimeError("CPU mode: cudagraphable RNG is not supported")
        super().__init__(
            use_cudagraphable_rng=False, is_inference_rng_tracker=is_inference_rng_tracker
        )

    def add(self, name, seed):
        """Track a new CPU generator state seeded with ``seed`` (default state untouched)."""
        self._is_initialized = True
        if seed in self.seeds_:
            raise Exception('seed {} already exists'.format(seed))
        self.seeds_.add(seed)
        if name in self.states_:
            raise Exception('rng state {} already exists'.format(name))
        orig_rng_state = torch.get_rng_state()
        torch.manual_seed(seed)
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(orig_rng_state)

    @contextlib.contextmanager
    def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
        """Swap the tracked state ``name`` into the default generator for the block.

        Same protocol as ``CudaRNGStatesTracker.fork`` (including nested forks), minus its
        "CPU RNG state changed within GPU RNG context" warning, which would fire on every fork
        here because the CPU generator *is* the forked generator.
        """
        if name not in self.states_:
            raise Exception('rng state {} is not added'.format(name))
        orig_rng_state = torch.get_rng_state()
        orig_state_name = self._current_state_name
        if orig_state_name != "default-rng":
            self.states_[orig_state_name] = orig_rng_state
        torch.set_rng_state(self.states_[name])
        self._current_state_name = name
        try:
            yield
        finally:
            if self._current_state_name != name:
                raise Exception(
                    f'current state name {self._current_state_name} is not the same as the '
                    f'desired state name {name}.'
                )
            self.states_[name] = torch.get_rng_state()
            if orig_state_name != "default-rng":
                orig_rng_state = self.states_[orig_state_name]
            torch.set_rng_state(orig_rng_state)
            self._current_state_name = orig_state_name


def apply() -> None:
    # Module globals of megatron.core.tensor_parallel.random, looked up at call time by
    # CudaRNGStatesTracker users, _get_all_rng_states/_set_all_rng_states (checkpoint
    # recompute) and initialize_rng_tracker (which instantiates `CudaRNGStatesTracker`).
    mrandom._get_cuda_rng_state = _get_cpu_rng_state
    mrandom._set_cuda_rng_state = _set_cpu_rng_state
    mrandom.CudaRNGStatesTracker = CpuRNGStatesTracker
    tracker = mrandom._CUDA_RNG_STATE_TRACKER
    if tracker is not None and not isinstance(tracker, CpuRNGStatesTracker):
        # A CUDA tracker created before the mode was enabled cannot hold any state without
        # CUDA (add() would have raised); replace it with an empty CPU tracker.
        mrandom.initialize_rng_tracker(
            inference_rng_tracker=getattr(tracker, "is_inference_rng_tracker", False),
            force_reset=True,
        )
