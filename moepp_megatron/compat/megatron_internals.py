"""Every contact of the GPU path with megatron-core internals, behind one named function each.

The rest of the package extends megatron-core at its public seams (``MoELayer``'s named
steps, ``TopKRouter.routing``, the alltoall dispatcher's ``preprocess``, layer specs) and
calls public functions. What it needs beyond that (private methods, internal state, a
function swapped for a moment) is here, and ``tests/compat/test_megatron_internals.py`` pins
every private name, signature and field used, so that a megatron-core bump fails in that one
test, naming the seam and its caller. (The CPU + gloo mode's patches are in ``cpu_cuda``,
``cpu_rng`` and ``cpu_megatron``; they never run on a GPU.) megatron is imported inside each
function: importing this module costs nothing.

Written against megatron-core 0.16.1 (Python 3.11). On a bump, re-check:
  * ``TransformerLayer._forward_attention``, ``_forward_pre_mlp_layernorm``,
    ``_forward_post_mlp``, ``_forward_mlp`` and the "Unknown MLP type" warning its
    ``__init__`` logs for MLP classes it does not know (moepp/transformer_layer.py);
  * ``MoELayer.token_dispatcher``, built in ``MoELayer.__init__`` from
    ``moe_token_dispatcher_type`` with no hook for another class (moepp/layer.py);
  * the alltoall dispatcher's ``num_out_tokens`` and ``_maybe_update_cuda_sync_point`` with
    its "before_permutation_1" point (moepp/token_dispatcher.py);
  * the layer-wise aux-loss tracker: a dict of ``{"values", "reduce_group", "avg_group",
    "reduce_group_has_dp"}`` per loss name, sized by the first model that logs
    (moepp/statistics.py, bench/train.py);
  * ``GroupedMLP.__init__`` calling ``grouped_gemm_util.assert_grouped_gemm_is_available``
    through the module (model/grouped_experts.py);
  * ``DistributedOptimizer._init_optimizer_states_with_dummy_values``, the ``dp_reshardable``
    optimizer state layout, and the one 'step' tensor ``DistributedOptimizer.load_state_dict``
    gives every torch Adam state (checkpoint/checkpointer.py);
  * ``indexed_dataset._IndexReader`` (data/blend.py);
  * ``destroy_model_parallel`` leaving most of its groups registered with torch
    (parallel/initialize.py).

Known to change in 0.17-0.19 (they need Python >= 3.12):
  * 0.17: ``MoESubmodules.experts`` become builder callables called directly instead of specs
    given to ``build_module``: model/specs.py swaps ``experts.module`` for TorchGroupedMLP,
    and the legacy ``GroupedMLP`` it subclasses is removed (``TEGroupedMLP`` and
    ``SequentialMLP`` remain): TorchGroupedMLP needs another base.
  * 0.17: ``moe_utils.permute()`` returns five values instead of three. MoE++ leaves the
    permutation to the stock dispatchers; any direct call must be adapted.
  * 0.17: ``MoELayer.__init__`` takes ``is_mtp_layer`` and ``name``, the router constructor
    ``is_mtp_layer``: MoEPPLayer's, MoEPPRouter's and CountingTopKRouter's constructors must
    take them and pass them on.
  * 0.18: GPT layer specs hold ``functools.partial(MoELayer, submodules=...)`` instead of
    ``ModuleSpec(module=MoELayer, ...)``: model/specs.py's swaps of ``.module`` and
    ``.submodules`` must edit the partial.
  * 0.18: aux-loss logging goes through a metrics tracker (``get_moe_metrics_tracker()``);
    ``save_to_aux_losses_tracker`` and ``track_moe_metrics`` become deprecated wrappers:
    :func:`reduce_and_clear_aux_losses` is to be rewritten on it.
  * dev branch: ``route()`` / ``routing()`` take ``input_ids`` and ``packed_seq_params``;
    MoEPPRouter.routing and CountingTopKRouter.routing must accept (or pass on) them, and
    MoEPPLayer calls the router itself.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Iterator, Sequence

# --- TransformerLayer's private steps (moepp/transformer_layer.py) --------------------------
# MoEPPTransformerLayer.forward reassembles TransformerLayer.forward from its steps, to thread
# the router logits through the MoE++ MLP.


def attention_step(layer, hidden_states, **kwargs):
    """Input norm, self-attention, cross-attention and their residual adds: ``(output, context)``."""
    return layer._forward_attention(hidden_states, **kwargs)


def pre_mlp_layernorm(layer, hidden_states):
    """The norm before the MLP (recomputed when megatron is asked to)."""
    return layer._forward_pre_mlp_layernorm(hidden_states)


def post_mlp_step(layer, mlp_output_with_bias, residual):
    """Bias, dropout and residual add after the MLP."""
    return layer._forward_post_mlp(mlp_output_with_bias, residual)


def mlp_step(layer, hidden_states, inference_context=None, padding_mask=None):
    """The stock MLP half of the layer: norm, MLP, bias-dropout-add."""
    return layer._forward_mlp(hidden_states, inference_context, padding_mask=padding_mask)


TRANSFORMER_LAYER_LOGGER = "megatron.core.transformer.transformer_layer"


class _UnknownMLPTypeFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


_UNKNOWN_MLP_TYPE_FILTER = _UnknownMLPTypeFilter()


def silence_unknown_mlp_type_warning() -> None:
    """megatron 0.16.1 recognises MoE layers by identity (``module in (MoELayer, ...)``) and
    warns "Unknown MLP type" for a subclass, once per layer. The fallback it announces
    (default process groups) is what MoE++ uses, so the message is noise. Idempotent."""
    logging.getLogger(TRANSFORMER_LAYER_LOGGER).addFilter(_UNKNOWN_MLP_TYPE_FILTER)


# --- The token dispatcher (moepp/layer.py, moepp/token_dispatcher.py) -----------------------


def replace_token_dispatcher(moe_layer, dispatcher_class, pg_collection) -> None:
    """Give ``moe_layer`` a dispatcher of ``dispatcher_class``, built like the one
    ``MoELayer.__init__`` built (it picks the class itself and offers no hook)."""
    moe_layer.token_dispatcher = dispatcher_class(
        moe_layer.num_local_experts, moe_layer.local_expert_indices,
        config=moe_layer.config, pg_collection=pg_collection,
    )


def set_permutation_output_size(dispatcher, num_out_tokens) -> None:
    """The alltoall dispatcher's number of permuted rows. A device tensor must reach the host
    before the first permutation, which sizes its output with it; megatron does the same in
    its capacity-factor branch."""
    dispatcher.num_out_tokens = num_out_tokens
    dispatcher._maybe_update_cuda_sync_point("before_permutation_1")


# --- The aux-loss tracker (moepp/statistics.py) ----------------------------------------------

def reduce_and_clear_aux_losses(track_names: Sequence[str], num_layers: int) -> dict[str, list[float]]:
    """Per-layer values of megatron's aux-loss tracker, reduced like megatron reduces them
    (sum over TP/CP shares, mean over DP, gathered over PP), then cleared. A name no layer
    of this rank logged gets zeros, so that a pipeline stage without MoE layers takes part in
    the collective instead of hanging the stages that have them (as ``track_moe_metrics``'s
    ``force_initialize``, which also logs)."""
    import torch
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    device = "cpu" if not torch.cuda.is_available() else torch.cuda.current_device()
    for name in track_names:
        if name not in tracker:
            tracker[name] = {
                "values": torch.zeros(num_layers, device=device),
                "reduce_group": None,
                "avg_group": None,
                "reduce_group_has_dp": False,
            }
    moe_utils.reduce_aux_losses_tracker_across_ranks(list(track_names))
    values = {name: tracker[name]["values"].tolist() for name in track_names}
    moe_utils.clear_aux_losses_tracker()
    return values


def forget_aux_losses() -> None:
    """Empty the tracker: its per-layer tensors are sized by the first model that logs, so a
    deeper model built later in the same process (bench/costs.py) would index past them."""
    from megatron.core.transformer.moe import moe_utils

    moe_utils.get_moe_layer_wise_logging_tracker().clear()


# --- GroupedMLP without the grouped_gemm package (model/grouped_experts.py) ------------------


@contextlib.contextmanager
def grouped_gemm_package_not_required() -> Iterator[None]:
    """Inside the block, ``GroupedMLP.__init__`` does not assert that the grouped_gemm package
    is installed: for a subclass that keeps its parameters but computes without the package."""
    from megatron.core.transformer.moe import grouped_gemm_util

    check = grouped_gemm_util.assert_grouped_gemm_is_available
    grouped_gemm_util.assert_grouped_gemm_is_available = lambda: None
    try:
        yield
    finally:
        grouped_gemm_util.assert_grouped_gemm_is_available = check


# --- Distributed optimizer state (checkpoint/checkpointer.py) ---------------------------------


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    return [opt for opt in chained if isinstance(opt, DistributedOptimizer)]


def allocate_optimizer_states_for_loading(optimizer) -> None:
    """Without Apex/TE the inner optimizer is torch Adam, whose states (and 'step') appear at
    its first step; megatron's ``DistributedOptimizer.state_dict()`` asserts on a single step,
    so a fresh one cannot build its loading state dict. Dummy states, replaced by the load."""
    for opt in _distributed_optimizers(optimizer):
        if not opt.optimizer.state:
            opt._init_optimizer_states_with_dummy_values()


def load_optimizer_state(optimizer, state_dict) -> None:
    """``optimizer.load_state_dict(state_dict)`` for a state dict from ``dist_checkpointing.load``,
    with the three fixes megatron 0.16.1's distributed optimizer needs with torch Adam (no
    Apex/TE: always on CPU, and on GPUs without them)."""
    import torch

    _restore_dp_reshardable_adam_steps(state_dict)
    with torch.no_grad():  # the dp_reshardable load copies into views of the parameters
        optimizer.load_state_dict(state_dict)
    _untie_adam_steps(optimizer)


def _restore_dp_reshardable_adam_steps(tree) -> None:
    # dp_reshardable buckets carry torch Adam's per-parameter 'step' as a non-persistent
    # object: the value before loading (the dummy states above). DistributedOptimizer.
    # load_state_dict restores the step from param_groups, then copies the bucket entries
    # over the states, which would put that stale step back (measured: 1 instead of 3).
    if isinstance(tree, dict) and tree.get("param_state_sharding_type") == "dp_reshardable":
        steps = {group["step"] for group in tree["optimizer"]["param_groups"] if "step" in group}
        if steps:
            (step,) = steps
            _set_bucket_steps(tree["param_state"], step)
    elif isinstance(tree, dict):
        for value in tree.values():
            _restore_dp_reshardable_adam_steps(value)


def _set_bucket_steps(tree, step) -> None:
    import torch

    if isinstance(tree, dict):
        if "step" in tree and "padding" in tree:
            tree["step"] = torch.tensor(step, dtype=torch.float)
        for value in tree.values():
            _set_bucket_steps(value, step)
    elif isinstance(tree, list):
        for value in tree:
            _set_bucket_steps(value, step)


def _untie_adam_steps(optimizer) -> None:
    # DistributedOptimizer.load_state_dict gives every torch Adam state the SAME 'step' tensor
    # (`s["step"] = step`), and torch keeps it shared unless Adam is fused or capturable
    # (megatron's torch Adam is neither, on CPU or GPU). Adam increments the step in place,
    # so after resuming each step advances the shared counter once per parameter: wrong bias
    # correction (measured: step 9/10 instead of 2 one step after resuming). TE's and Apex's
    # FusedAdam keep the step in param_groups; their states have none.
    import torch

    for opt in _distributed_optimizers(optimizer):
        for state in opt.optimizer.state.values():
            step = state.get("step")
            if isinstance(step, torch.Tensor):
                state["step"] = step.detach().clone()


# --- Process groups (parallel/initialize.py) -------------------------------------------------
# megatron's destroy_model_parallel forgets its groups but destroys only the gloo
# data-parallel ones: the rest stay registered with torch, alive with their threads (gloo: a
# TCP loop and two worker threads per group, which keep waking up). Re-initialising in one
# process (a second conversion, a test) then leaks about twenty groups each time.


def destroy_model_parallel_groups() -> None:
    """megatron's ``destroy_model_parallel``, then every process group but the default one
    (the package creates no other), found as megatron itself finds its gloo groups: torch's
    ``_world.pg_map``."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        world = dist.distributed_c10d._get_default_group()
        for group in [g for g in dist.distributed_c10d._world.pg_map if g is not world]:
            dist.destroy_process_group(group)


# --- Indexed datasets (data/blend.py) ---------------------------------------------------------


@dataclass(frozen=True)
class IndexSummary:
    """What a megatron ``.idx`` file says about its ``.bin`` file."""

    num_sequences: int
    num_tokens: int
    # The size the .bin file must have: the end of its last sequence.
    bin_bytes: int


def read_index_summary(idx_path: str) -> IndexSummary:
    """Reads the index without its ``.bin`` file (megatron's ``IndexedDataset`` opens both and
    asserts). Raises what megatron and numpy raise on a damaged file (AssertionError,
    ValueError, ...). Reads the header and the last entry only (the arrays are memory-mapped):
    megatron's writer stores sequences back to back from byte 0, so the tokens are the
    ``.bin`` size over the token size, whatever the corpus size."""
    from megatron.core.datasets.indexed_dataset import _IndexReader

    index = _IndexReader(idx_path, multimodal=False)
    count = len(index)
    last_end = int(index.sequence_pointers[-1]) + int(index.sequence_lengths[-1]) * index.dtype_size if count else 0
    return IndexSummary(num_sequences=count, num_tokens=last_end // index.dtype_size, bin_bytes=last_end)
