"""CPU mode, part 3: targeted fixes inside megatron-core 0.16.1.

Applied by :func:`moepp_megatron.compat.cpu.enable_cpu_mode` only (after cpu_cuda/cpu_rng).
"""

from __future__ import annotations

import functools

from .cpu_cuda import report_cuda_tensor_types


def _with_cuda_type_names(fn):
    """Run ``fn`` with ``Tensor.type()`` reporting 'torch.cuda.*' names (see cpu_cuda)."""
    if getattr(fn, "_moepp_cpu_wrapped", False):
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with report_cuda_tensor_types():
            return fn(*args, **kwargs)

    wrapper._moepp_cpu_wrapped = True
    return wrapper


def _fix_te_general_gemm() -> None:
    # moe_utils only defines te_general_gemm when Transformer Engine imports, but the router
    # gating GEMM (RouterGatingLinearFunction, used by every Router.gating call) tests
    # `te_general_gemm is not None` -> NameError without TE (fixed upstream after 0.16.1).
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def _fix_alltoall_split_sizes() -> None:
    # The alltoall dispatcher moves its split sizes to host with
    # maybe_move_tensor_to_cpu(..., as_numpy=True), which only converts CUDA tensors. On CPU
    # the splits stay torch tensors and all_to_all_single rejects tensors as split sizes
    # (it needs a sequence of ints). Convert host tensors as the GPU path would.
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    orig = moe_utils.maybe_move_tensor_to_cpu
    if getattr(orig, "_moepp_cpu_wrapped", False):
        return

    @functools.wraps(orig)
    def maybe_move_tensor_to_cpu(tensor, as_numpy=False, record_stream=False):
        out = orig(tensor, as_numpy=as_numpy, record_stream=record_stream)
        if as_numpy and hasattr(out, "numpy") and out.device.type == "cpu":
            out = out.numpy()
        return out

    maybe_move_tensor_to_cpu._moepp_cpu_wrapped = True
    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    token_dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu


def _fix_cuda_tensor_type_checks() -> None:
    # `param.type() == 'torch.cuda.FloatTensor'` checks (and the fp16/bf16 variants) reject CPU
    # params: DistributedOptimizer (param groups and __init__), Float16OptimizerWithFloat16Params
    # and clip_grad_by_total_norm_fp32 (assert). Let Tensor.type() report CUDA names inside them.
    from megatron.core.optimizer import clip_grads, distrib_optimizer, optimizer

    dopt = distrib_optimizer.DistributedOptimizer
    build = dopt.__dict__["_build_model_and_main_param_groups"].__func__
    dopt._build_model_and_main_param_groups = classmethod(_with_cuda_type_names(build))
    dopt.__init__ = _with_cuda_type_names(dopt.__init__)
    f16 = optimizer.Float16OptimizerWithFloat16Params
    f16.__init__ = _with_cuda_type_names(f16.__init__)
    clip = _with_cuda_type_names(clip_grads.clip_grad_by_total_norm_fp32)
    clip_grads.clip_grad_by_total_norm_fp32 = clip
    optimizer.clip_grad_by_total_norm_fp32 = clip


def _fix_torch_norm_sequence_parallel() -> None:
    # Without Apex/TE (always the case on CPU) the local spec's norm is WrappedTorchNorm, which
    # asserts `not config.sequence_parallel`; MoE with TP>1 requires SP. The assert only exists
    # because torch norms do not tag their params: build the norm with SP masked and tag the
    # params `sequence_parallel=True` like FusedLayerNorm/TE norms do, so finalize_model_grads
    # all-reduces their grads over TP.
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    orig_new = WrappedTorchNorm.__new__
    if getattr(orig_new, "_moepp_cpu_wrapped", False):
        return

    @functools.wraps(orig_new)
    def __new__(cls, config, *args, **kwargs):
        sequence_parallel = config.sequence_parallel
        if not sequence_parallel:
            return orig_new(cls, config, *args, **kwargs)
        config.sequence_parallel = False
        try:
            norm = orig_new(cls, config, *args, **kwargs)
        finally:
            config.sequence_parallel = sequence_parallel
        for param in norm.parameters():
            setattr(param, "sequence_parallel", True)
        return norm

    __new__._moepp_cpu_wrapped = True
    WrappedTorchNorm.__new__ = staticmethod(__new__)


# Tags separating the two directions of pipeline p2p traffic (see _fix_batched_p2p_tags).
_P2P_TAG_DOWNSTREAM = 1  # activations: send_next -> recv_prev
_P2P_TAG_UPSTREAM = 2  # gradients: send_prev -> recv_next


def _fix_batched_p2p_tags() -> None:
    # batch_isend_irecv posts [send_prev, recv_prev, send_next, recv_next]. When prev == next
    # (PP=2, every schedule that sends both ways at once: interleaved, 1F1B steady state)
    # rank A posts send(grad), send(act) while rank B posts recv(act), recv(grad) to the same
    # peer; gloo matches same-(peer, tag) messages in posting order, so the equally-shaped
    # activation and gradient get swapped silently (wrong losses from the 3rd microbatch on in
    # the interleaved schedule, measured). Tag each direction so gloo matches by direction.
    # Only applied in CPU mode; the NCCL path is untouched.
    import torch
    from megatron.core.pipeline_parallel import p2p_communication

    if getattr(p2p_communication._batched_p2p_ops, "_moepp_cpu_wrapped", False):
        return

    def _batched_p2p_ops(
        *,
        tensor_send_prev,
        tensor_recv_prev,
        tensor_send_next,
        tensor_recv_next,
        group,
        prev_pipeline_rank,
        next_pipeline_rank,
    ):
        ops = []
        P2POp = torch.distributed.P2POp
        if tensor_send_prev is not None:
            ops.append(
                P2POp(torch.distributed.isend, tensor_send_prev, prev_pipeline_rank, group,
                      _P2P_TAG_UPSTREAM)
            )
        if tensor_recv_prev is not None:
            ops.append(
                P2POp(torch.distributed.irecv, tensor_recv_prev, prev_pipeline_rank, group,
                      _P2P_TAG_DOWNSTREAM)
            )
        if tensor_send_next is not None:
            ops.append(
                P2POp(torch.distributed.isend, tensor_send_next, next_pipeline_rank, group,
                      _P2P_TAG_DOWNSTREAM)
            )
        if tensor_recv_next is not None:
            ops.append(
                P2POp(torch.distributed.irecv, tensor_recv_next, next_pipeline_rank, group,
                      _P2P_TAG_UPSTREAM)
            )
        return torch.distributed.batch_isend_irecv(ops) if ops else []

    _batched_p2p_ops._moepp_cpu_wrapped = True
    p2p_communication._batched_p2p_ops = _batched_p2p_ops


def _fix_checkpoint_without_output_fp8() -> None:
    # CheckpointWithoutOutput.__init__ sets `self.fp8 = fp8 is not None`, so the default
    # fp8=False (used by the 'layernorm' and 'moe_act' selective recompute) takes the FP8 path,
    # which calls Transformer Engine's FP8GlobalStateManager -> NameError without TE (always
    # the case on CPU). Without TE there is no FP8: force the plain path.
    from megatron.core.tensor_parallel import random as mrandom

    cls = mrandom.CheckpointWithoutOutput
    orig_init = cls.__init__
    if getattr(orig_init, "_moepp_cpu_wrapped", False) or mrandom.HAVE_TE:
        return

    @functools.wraps(orig_init)
    def __init__(self, *args, **kwargs):
        orig_init(self, *args, **kwargs)
        self.fp8 = False

    __init__._moepp_cpu_wrapped = True
    cls.__init__ = __init__


def _fix_uneven_all_gather() -> None:
    # mappings._gather_along_first_dim(output_split_sizes=...) (gather_from_sequence_parallel_
    # region with variable sizes: the alltoall dispatcher under TP>1 when the TP ranks hold
    # different numbers of routed tokens) calls torch.distributed.all_gather with a list of
    # differently sized outputs; gloo rejects that ("invalid tensor size"). Pad to the largest
    # split, all-gather equal chunks and drop the padding. Equal splits take the stock path.
    import torch
    from megatron.core.tensor_parallel import mappings

    orig = mappings._gather_along_first_dim
    if getattr(orig, "_moepp_cpu_wrapped", False):
        return

    @functools.wraps(orig)
    def _gather_along_first_dim(input_, group, output_split_sizes=None, use_global_buffer=False):
        if output_split_sizes is None or group.size() == 1:
            return orig(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(s) for s in output_split_sizes]
        if len(set(sizes)) == 1:
            return orig(input_, group, output_split_sizes, use_global_buffer)
        world_size, rows = group.size(), max(sizes)
        assert input_.shape[0] == sizes[group.rank()], (input_.shape, sizes)
        padded = input_.new_zeros((rows,) + tuple(input_.shape[1:]))
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((rows * world_size,) + tuple(input_.shape[1:]))
        torch.distributed.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat([gathered[r * rows : r * rows + n] for r, n in enumerate(sizes)])

    _gather_along_first_dim._moepp_cpu_wrapped = True
    mappings._gather_along_first_dim = _gather_along_first_dim


def apply() -> None:
    _fix_torch_norm_sequence_parallel()
    _fix_uneven_all_gather()
    _fix_checkpoint_without_output_fp8()
    _fix_batched_p2p_tags()
    _fix_te_general_gemm()
    _fix_alltoall_split_sizes()
    _fix_cuda_tensor_type_checks()
