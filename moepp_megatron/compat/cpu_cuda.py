"""CPU mode, part 1: make the CPU stand in for "the current CUDA device".

Applied by :func:`moepp_megatron.compat.cpu.enable_cpu_mode` only (never when CUDA is
available). Each stub below replaces a ``torch.cuda`` function that raises (or silently does
nothing) in a process without CUDA, so no working behaviour changes.
"""

from __future__ import annotations

import contextlib
import threading

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")


class NoOpStream:
    """Stands in for ``torch.cuda.Stream`` on CPU: work is synchronous, so waits are no-ops."""

    def __init__(self, device=None, priority=0, **kwargs):
        self.device = _CPU
        self.priority = priority
        self.cuda_stream = 0

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        event = event if event is not None else NoOpEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


class NoOpEvent:
    """Stands in for ``torch.cuda.Event`` on CPU (everything has completed when recorded)."""

    def __init__(self, enable_timing=False, blocking=False, interprocess=False, **kwargs):
        pass

    def record(self, stream=None) -> None:
        pass

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end_event) -> float:
        return 0.0


_DEFAULT_STREAM = NoOpStream()


def _current_device() -> torch.device:
    # torch.cuda.current_device() is passed as `device=` (param/grad buffers, router, rotary
    # embedding, global memory buffer, timers, dist-ckpt, ...). Returning the CPU device makes
    # those allocations land on CPU without help from the function mode below.
    return _CPU


def _manual_seed(seed: int) -> None:
    torch.manual_seed(seed)


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    # Device bookkeeping: torch.cuda.current_device()/set_device() raise without CUDA.
    cuda.current_device = _current_device
    cuda.set_device = lambda device: None
    # Work on CPU is synchronous: synchronize() is a no-op; streams/events are no-op objects.
    # Used by the alltoall dispatcher (DtoH side stream), DDP/param buffers, timers, dist-ckpt.
    cuda.synchronize = lambda device=None: None
    cuda.Stream = NoOpStream
    cuda.Event = NoOpEvent
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext(stream)
    # Memory statistics: reset_peak_memory_stats() raises without CUDA (the getters return 0).
    cuda.reset_peak_memory_stats = lambda device=None: None
    # NVTX ranges (megatron's --nvtx-ranges / nvtx_decorator) raise "NVTX functions not
    # installed" on CPU builds; profiling annotations are no-ops here.
    cuda.nvtx.range_push = lambda msg: 0
    cuda.nvtx.range_pop = lambda: 0
    cuda.nvtx.mark = lambda msg: None
    cuda.nvtx.range = lambda msg, *args, **kwargs: contextlib.nullcontext()
    # RNG: the CPU default generator plays the role of the CUDA generator (see cpu_rng).
    # torch.cuda.get_rng_state() raises without CUDA and torch.cuda.manual_seed() is silently
    # queued; megatron's model_parallel_cuda_manual_seed seeds "the device" through them.
    cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    cuda.set_rng_state = lambda new_state, device="cuda": torch.set_rng_state(new_state)
    cuda.manual_seed = _manual_seed
    cuda.random.get_rng_state = cuda.get_rng_state
    cuda.random.set_rng_state = cuda.set_rng_state
    cuda.random.manual_seed = cuda.manual_seed


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # A bare int as a device means "CUDA device N" in the calls megatron makes.
    return isinstance(device, int) and not isinstance(device, bool)


# Thread-local switch for the Tensor.type() fix (see report_cuda_tensor_types).
_TLS = threading.local()


@contextlib.contextmanager
def report_cuda_tensor_types():
    """Within this context ``tensor.type()`` of a CPU tensor reports the CUDA type name.

    megatron-core checks ``param.type() == 'torch.cuda.FloatTensor'`` (distributed optimizer,
    Float16 optimizer, clip_grads) and raises/asserts otherwise; cpu_megatron wraps exactly
    those functions with this context.
    """
    prev = getattr(_TLS, "cuda_types", False)
    _TLS.cuda_types = True
    try:
        yield
    finally:
        _TLS.cuda_types = prev


_Tensor = torch.Tensor
_RETURN_SELF = {_Tensor.cuda, _Tensor.pin_memory}
_BACKWARD_ENTRY_POINTS = {_Tensor.backward, torch.autograd.backward}


def _as_tuple(x):
    if x is None:
        return ()
    if isinstance(x, (torch.Tensor, torch.autograd.graph.GradientEdge)):
        return (x,)
    return tuple(x)


def _tensor_backward_args(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    return self, gradient, retain_graph, create_graph, inputs


def _autograd_backward_args(
    tensors, grad_tensors=None, retain_graph=None, create_graph=False, grad_variables=None,
    inputs=None,
):
    if grad_tensors is None:
        grad_tensors = grad_variables
    return tensors, grad_tensors, retain_graph, create_graph, inputs


def _run_backward(tensors, grad_tensors=None, retain_graph=None, create_graph=False, inputs=None):
    """``torch.autograd.backward`` without its ``__torch_function__`` check.

    Same engine call as megatron's ``schedules.custom_backward``
    (``Variable._execution_engine.run_backward``); implicit grads only for scalar outputs.
    """
    tensors = _as_tuple(tensors)
    grads = list(_as_tuple(grad_tensors)) or [None] * len(tensors)
    if len(grads) != len(tensors):
        raise RuntimeError(f"got {len(grads)} grad_tensors for {len(tensors)} tensors")
    for i, (t, g) in enumerate(zip(tensors, grads)):
        if g is None and isinstance(t, torch.Tensor) and t.requires_grad:
            if t.numel() != 1:
                raise RuntimeError("grad can be implicitly created only for scalar outputs")
            grads[i] = torch.ones_like(t, memory_format=torch.preserve_format)
    if retain_graph is None:
        retain_graph = create_graph
    torch.autograd.Variable._execution_engine.run_backward(
        tensors,
        tuple(grads),
        retain_graph,
        create_graph,
        _as_tuple(inputs),
        allow_unreachable=True,
        accumulate_grad=True,
    )


class CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA placement requests to CPU.

    megatron-core allocates with ``device='cuda'`` (schedules' ``total_num_tokens``, clip_grads,
    grad scaler, p2p buffers, MoE aux-loss tracker, dist-ckpt exchange), calls ``.cuda()`` and
    ``pin_memory=True``. Without CUDA these raise; here they produce CPU tensors.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _RETURN_SELF:
            # .cuda() / .pin_memory() of a CPU tensor: it already lives on "the device".
            return args[0]
        if func in _BACKWARD_ENTRY_POINTS:
            # A mode is popped while its own __torch_function__ runs, so `loss.backward()` /
            # `torch.autograd.backward()` would run the whole backward pass - activation
            # recompute (re-runs forward code that allocates on 'cuda'), autograd Function
            # backwards, hooks - without this mode. Run the engine with the mode pushed again.
            parse = _tensor_backward_args if func is _Tensor.backward else _autograd_backward_args
            with self:
                _run_backward(*parse(*args, **(kwargs or {})))
            return None
        if func is _Tensor.record_stream:
            # Streams are no-ops on CPU; record_stream() of a CPU tensor would raise.
            return None
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _is_cuda_device(device):
                kwargs = dict(kwargs, device=_CPU)
            if kwargs.get("pin_memory"):
                # Pinned memory needs a CUDA context.
                kwargs = dict(kwargs, pin_memory=False)
        if func is _Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        elif func is _Tensor.type and len(args) == 1 and not kwargs:
            if getattr(_TLS, "cuda_types", False):
                name = func(*args)
                if not name.startswith("torch.cuda."):
                    name = "torch.cuda." + name[len("torch.") :]
                return name
        return func(*args, **(kwargs or {}))


_MODE: CudaToCpuMode | None = None


def apply() -> None:
    """Install the torch.cuda stubs and push the device-mapping mode (main thread)."""
    global _MODE
    _patch_torch_cuda()
    if _MODE is None:
        # Entered for the rest of the process (the mode stack is per thread: code that runs in
        # other threads must not rely on device='cuda' mapping).
        _MODE = CudaToCpuMode()
        _MODE.__enter__()
