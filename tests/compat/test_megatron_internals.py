"""Pins every megatron-core internal the package relies on (moepp_megatron/compat/
megatron_internals.py), and the signatures of the megatron methods its subclasses override
or call positionally. After a megatron-core bump this file fails first, naming the seam
that broke and the module that uses it; the seam module's docstring lists what is known to
change in 0.17-0.19.

Also shows the two torch-Adam problems of megatron 0.16.1's distributed-optimizer load that
``load_optimizer_state`` fixes on every device without Apex/TE (the CPU mode no longer
patches them): the stale 'step' from dp_reshardable buckets and one 'step' tensor shared by
every parameter.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import dataclass

import megatron.core
import numpy as np
import pytest
import torch

from moepp_megatron.compat import megatron_internals as internals

SEAMS = "moepp_megatron.compat.megatron_internals"


@dataclass(frozen=True)
class Pin:
    target: str  # dotted path of the megatron object
    parameters: tuple[str, ...]  # its signature's parameter names in 0.16.1
    seam: str  # what in this package depends on it
    used_by: str

    def broken(self, what: str) -> str:
        return _broken(what, self.seam, self.used_by)


def _broken(what: str, seam: str, used_by: str) -> str:
    return (
        f"megatron-core {megatron.core.__version__}: {what}. Seam {seam} (used by {used_by}) "
        f"was written for megatron-core 0.16.1: re-check it ({SEAMS}'s docstring lists the "
        f"changes known in 0.17-0.19)."
    )


TL = "megatron.core.transformer.transformer_layer.TransformerLayer"
A2A = "megatron.core.transformer.moe.token_dispatcher.MoEAlltoAllTokenDispatcher"
MOE = "megatron.core.transformer.moe.moe_layer.MoELayer"
ROUTER = "megatron.core.transformer.moe.router.TopKRouter"
GROUPED = "megatron.core.transformer.moe.experts.GroupedMLP"
UTILS = "megatron.core.transformer.moe.moe_utils"
DOPT = "megatron.core.optimizer.distrib_optimizer.DistributedOptimizer"

PRIVATE = [
    Pin(f"{TL}._forward_attention",
        ("self", "hidden_states", "attention_mask", "context", "context_mask", "rotary_pos_emb",
         "rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin", "attention_bias",
         "inference_context", "packed_seq_params", "sequence_len_offset", "padding_mask",
         "inference_params"),
        f"{SEAMS}.attention_step", "moepp/transformer_layer.py"),
    Pin(f"{TL}._forward_pre_mlp_layernorm", ("self", "hidden_states"),
        f"{SEAMS}.pre_mlp_layernorm", "moepp/transformer_layer.py"),
    Pin(f"{TL}._forward_post_mlp", ("self", "mlp_output_with_bias", "residual"),
        f"{SEAMS}.post_mlp_step", "moepp/transformer_layer.py"),
    Pin(f"{TL}._forward_mlp", ("self", "hidden_states", "inference_context", "padding_mask"),
        f"{SEAMS}.mlp_step", "moepp/transformer_layer.py"),
    Pin(f"{A2A}.__init__", ("self", "num_local_experts", "local_expert_indices", "config", "pg_collection"),
        f"{SEAMS}.replace_token_dispatcher", "moepp/layer.py"),
    Pin(f"{A2A}._maybe_update_cuda_sync_point", ("self", "point"),
        f"{SEAMS}.set_permutation_output_size", "moepp/token_dispatcher.py"),
    Pin(f"{UTILS}.get_moe_layer_wise_logging_tracker", (),
        f"{SEAMS}.reduce_and_clear_aux_losses", "moepp/statistics.py"),
    Pin(f"{UTILS}.reduce_aux_losses_tracker_across_ranks", ("track_names", "pg_collection"),
        f"{SEAMS}.reduce_and_clear_aux_losses", "moepp/statistics.py"),
    Pin(f"{UTILS}.clear_aux_losses_tracker", (),
        f"{SEAMS}.reduce_and_clear_aux_losses", "moepp/statistics.py"),
    Pin("megatron.core.transformer.moe.grouped_gemm_util.assert_grouped_gemm_is_available", (),
        f"{SEAMS}.grouped_gemm_package_not_required", "model/grouped_experts.py"),
    Pin(f"{DOPT}._init_optimizer_states_with_dummy_values", ("self",),
        f"{SEAMS}.allocate_optimizer_states_for_loading", "checkpoint/checkpointer.py"),
    Pin(f"{DOPT}.load_state_dict", ("self", "state_dict"),
        f"{SEAMS}.load_optimizer_state", "checkpoint/checkpointer.py"),
    Pin("megatron.core.datasets.indexed_dataset._IndexReader.__init__",
        ("self", "idx_path", "multimodal", "sequences_per_dataset", "dtype_code"),
        f"{SEAMS}.read_index_summary", "data/blend.py"),
]

# Public, but overridden by a subclass here or called with positional arguments.
OVERRIDDEN = [
    Pin(f"{MOE}.__init__", ("self", "config", "submodules", "layer_number", "pg_collection"),
        "MoEPPLayer.__init__ (passes its arguments positionally)", "moepp/layer.py"),
    *(Pin(f"{MOE}.{step}", params, "MoEPPLayer._forward (positional arguments)", "moepp/layer.py")
      for step, params in (
          ("preprocess", ("self", "hidden_states", "probs", "routing_map")),
          ("dispatch", ("self", "hidden_states", "probs")),
          ("routed_experts_compute", ("self", "hidden_states", "probs")),
          ("combine", ("self", "output")),
          ("postprocess", ("self", "output", "shared_expert_output")),
      )),
    Pin(f"{ROUTER}.__init__", ("self", "config", "pg_collection"),
        "MoEPPRouter.__init__, CountingTopKRouter.__init__", "moepp/router.py, moepp/counters.py"),
    Pin(f"{ROUTER}.routing", ("self", "logits", "padding_mask"),
        "MoEPPRouter.routing, CountingTopKRouter.routing", "moepp/router.py, moepp/counters.py"),
    Pin(f"{ROUTER}.forward", ("self", "input", "padding_mask"),
        "MoEPPRouter.forward", "moepp/router.py"),
    Pin(f"{ROUTER}.gating", ("self", "input"),
        "forced_routing (shadows it on an instance)", "bench/distributions.py"),
    Pin(f"{ROUTER}.attach_and_log_load_balancing_loss",
        ("self", "activation", "aux_loss_coeff", "aux_loss", "aux_loss_name", "reduce_group",
         "reduce_group_has_dp", "valid_token_count"),
        "MoEPPRouter._apply_load_balance_loss (positional arguments)", "moepp/router.py"),
    Pin(f"{A2A}.preprocess", ("self", "routing_map"),
        "MoEPPAlltoAllTokenDispatcher.preprocess", "moepp/token_dispatcher.py"),
    Pin(f"{GROUPED}.__init__", ("self", "num_local_experts", "config", "pg_collection"),
        "TorchGroupedMLP.__init__", "model/grouped_experts.py"),
    Pin(f"{GROUPED}.forward", ("self", "permuted_local_hidden_states", "tokens_per_expert", "permuted_probs"),
        "TorchGroupedMLP.forward", "model/grouped_experts.py"),
]


def _resolve(dotted: str):
    """The object at ``dotted``: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for split in range(len(parts) - 1, 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for name in parts[split:]:
            obj = getattr(obj, name)
        return obj
    raise ImportError(dotted)


@pytest.mark.parametrize("pin", PRIVATE + OVERRIDDEN, ids=lambda pin: pin.target.split(".", 3)[-1])
def test_signature_is_the_one_the_seam_was_written_for(pin):
    try:
        obj = _resolve(pin.target)
    except (ImportError, AttributeError) as e:
        pytest.fail(pin.broken(f"{pin.target} no longer exists ({e})"))
    found = tuple(inspect.signature(obj).parameters)
    assert found == pin.parameters, pin.broken(f"{pin.target} now takes {found}, not {pin.parameters}")


def test_transformer_layer_still_warns_about_unknown_mlp_types_through_its_logger():
    from megatron.core.transformer import transformer_layer

    seam = (f"{SEAMS}.silence_unknown_mlp_type_warning", "moepp/transformer_layer.py")
    assert transformer_layer.logger.name == internals.TRANSFORMER_LAYER_LOGGER, _broken(
        f"the transformer layer logs through {transformer_layer.logger.name!r}", *seam
    )
    assert "Unknown MLP type" in inspect.getsource(transformer_layer.TransformerLayer.__init__), _broken(
        "the 'Unknown MLP type' warning moved or changed its text", *seam
    )


def test_grouped_mlp_checks_for_the_package_through_grouped_gemm_util():
    from megatron.core.transformer.moe import experts, grouped_gemm_util

    seam = (f"{SEAMS}.grouped_gemm_package_not_required", "model/grouped_experts.py")
    # The seam swaps the module's function: that works only while GroupedMLP looks it up there.
    assert experts.gg is grouped_gemm_util, _broken("experts.py no longer imports grouped_gemm_util as gg", *seam)
    assert "gg.assert_grouped_gemm_is_available()" in inspect.getsource(experts.GroupedMLP.__init__), _broken(
        "GroupedMLP.__init__ no longer calls gg.assert_grouped_gemm_is_available()", *seam
    )


def test_grouped_gemm_check_is_restored_after_the_block():
    from megatron.core.transformer.moe import grouped_gemm_util

    check = grouped_gemm_util.assert_grouped_gemm_is_available
    with internals.grouped_gemm_package_not_required():
        grouped_gemm_util.assert_grouped_gemm_is_available()  # no grouped_gemm package here
    assert grouped_gemm_util.assert_grouped_gemm_is_available is check


@pytest.fixture(scope="module")
def moepp_layer(single_process):
    from moepp_megatron.config.schema import ParallelConfig
    from moepp_megatron.model.builder import build_model
    from moepp_megatron.moepp.layer import MoEPPLayer
    from tests.tiny_models import tiny_model

    (gpt,) = build_model(tiny_model(num_layers=1), ParallelConfig(cpu_mode=True))
    return next(m for m in gpt.modules() if isinstance(m, MoEPPLayer))


def test_fields_of_megatron_objects_that_the_package_reads(moepp_layer):
    from moepp_megatron.moepp.token_dispatcher import MoEPPAlltoAllTokenDispatcher

    checks = [
        (moepp_layer, ("num_local_experts", "local_expert_indices", "config"),
         f"{SEAMS}.replace_token_dispatcher", "moepp/layer.py"),
        (moepp_layer, ("moe_layer_recompute", "attn_tp_group"), "MoEPPLayer.forward", "moepp/layer.py"),
        (moepp_layer.router, ("topk", "tp_cp_group"), "MoEPPRouter", "moepp/router.py"),
        (moepp_layer.token_dispatcher, ("cuda_sync_point", "cuda_sync_point_priority"),
         f"{SEAMS}.set_permutation_output_size", "moepp/token_dispatcher.py"),
    ]
    for owner, names, seam, used_by in checks:
        missing = [name for name in names if not hasattr(owner, name)]
        megatron_class = next(c for c in type(owner).__mro__ if c.__module__.startswith("megatron."))
        assert not missing, _broken(f"{megatron_class.__name__} objects have no {missing}", seam, used_by)
    assert type(moepp_layer.token_dispatcher) is MoEPPAlltoAllTokenDispatcher


def test_dropless_permutation_is_sized_by_the_routing_map(moepp_layer):
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    dispatcher = moepp_layer.token_dispatcher
    # Token 0 picked two FFN experts, token 1 one (and a ZC expert), token 2 none.
    routing_map_TE = torch.zeros(3, dispatcher.num_local_experts, dtype=torch.bool)
    routing_map_TE[0, :2] = routing_map_TE[1, 3] = True
    # The stock size assumes k FFN picks per token; when this fails, megatron sizes the
    # permutation by the routing map itself and MoEPPAlltoAllTokenDispatcher can go.
    dispatcher.cuda_sync_point = "no_sync"  # the point only ever moves earlier
    MoEAlltoAllTokenDispatcher.preprocess(dispatcher, routing_map_TE)
    assert dispatcher.cuda_sync_point != "before_permutation_1"
    assert dispatcher.num_out_tokens == 3 * dispatcher.config.moe_router_topk
    dispatcher.cuda_sync_point = "no_sync"
    dispatcher.preprocess(routing_map_TE)
    assert dispatcher.num_out_tokens == 3
    assert dispatcher.cuda_sync_point == "before_permutation_1"


def test_building_an_moepp_layer_logs_no_unknown_mlp_type(single_process, caplog):
    from moepp_megatron.config.schema import ParallelConfig
    from moepp_megatron.model.builder import build_model
    from tests.tiny_models import tiny_model

    with caplog.at_level(logging.WARNING):
        build_model(tiny_model(num_layers=1), ParallelConfig(cpu_mode=True))
    assert not [r for r in caplog.records if "Unknown MLP type" in r.getMessage()]


def test_aux_loss_tracker_layout_and_reduction(single_process):
    from megatron.core.transformer.moe import moe_utils

    moe_utils.save_to_aux_losses_tracker("pinned_loss", torch.tensor(2.0), layer_number=2, num_layers=3)
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    try:
        # The fields reduce_and_clear_aux_losses fills in for a name no layer logged.
        entry = ("values", "reduce_group", "avg_group", "reduce_group_has_dp")
        assert tuple(tracker["pinned_loss"]) == entry, _broken(
            f"an aux-loss tracker entry holds {tuple(tracker['pinned_loss'])}",
            f"{SEAMS}.reduce_and_clear_aux_losses", "moepp/statistics.py",
        )
        values = internals.reduce_and_clear_aux_losses(["pinned_loss", "never_logged"], num_layers=3)
        assert values == {"pinned_loss": [0.0, 2.0, 0.0], "never_logged": [0.0, 0.0, 0.0]}
        assert tracker["pinned_loss"]["values"].tolist() == [0.0, 0.0, 0.0]  # cleared
    finally:
        tracker.pop("pinned_loss", None)
        tracker.pop("never_logged", None)


def test_destroy_model_parallel_still_leaves_groups_registered(single_process):
    """When megatron destroys its groups itself, destroy_model_parallel_groups can go back to
    calling it alone."""
    from megatron.core import parallel_state

    from moepp_megatron.parallel.initialize import initialize_parallel

    initialize_parallel(cpu_mode=True)
    registered = dist_groups()
    parallel_state.destroy_model_parallel()
    try:
        assert len(dist_groups()) > 1, "megatron's destroy_model_parallel now destroys its groups"
    finally:
        internals.destroy_model_parallel_groups()
    assert dist_groups() == [torch.distributed.distributed_c10d._get_default_group()]
    initialize_parallel(cpu_mode=True)
    assert len(dist_groups()) == len(registered)


def dist_groups() -> list:
    pg_map = getattr(getattr(torch.distributed.distributed_c10d, "_world", None), "pg_map", None)
    assert pg_map is not None, _broken(
        "torch.distributed.distributed_c10d._world.pg_map is gone",
        f"{SEAMS}.destroy_model_parallel_groups", "parallel/initialize.py",
    )
    return list(pg_map)


def test_index_summary_describes_the_bin_file(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = str(tmp_path / "docs")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.uint16)
    for document in ([1, 2, 3], [4, 5], [6]):
        builder.add_document(torch.tensor(document), [len(document)])
    builder.finalize(prefix + ".idx")
    summary = internals.read_index_summary(prefix + ".idx")
    assert summary == internals.IndexSummary(num_sequences=3, num_tokens=6, bin_bytes=6 * 2)
    assert (tmp_path / "docs.bin").stat().st_size == summary.bin_bytes


# --- The distributed optimizer's Adam state after a load -----------------------------------

SAVED_STEPS = 3


def _distributed_optimizer():
    from moepp_megatron.config.schema import OptimConfig, ParallelConfig
    from moepp_megatron.model.builder import build_model
    from moepp_megatron.training.optimizer import build_optimizer
    from moepp_megatron.training.trainer import ddp_config, wrap_for_training
    from tests.tiny_models import tiny_model

    parallel = ParallelConfig(cpu_mode=True)
    (gpt,) = build_model(tiny_model(num_layers=1), parallel)
    ddp = wrap_for_training(gpt, cpu_mode=True, bf16=False, ddp=ddp_config(parallel, use_distributed_optimizer=True))
    optimizer, _ = build_optimizer(
        [ddp], OptimConfig(use_distributed_optimizer=True, warmup_iters=1), bf16=False, train_iters=10
    )
    return gpt, optimizer


def _adam_states(optimizer) -> list[list[dict]]:
    """Per inner torch Adam, its per-parameter states."""
    return [list(opt.optimizer.state.values()) for opt in optimizer.chained_optimizers]


@pytest.fixture(scope="module")
def saved_optimizer(single_process, tmp_path_factory):
    """A checkpoint (dp_reshardable, as the trainer saves) of an optimizer after SAVED_STEPS steps."""
    from megatron.core import dist_checkpointing

    from moepp_megatron.checkpoint.checkpointer import OPTIMIZER_METADATA

    gpt, optimizer = _distributed_optimizer()
    for _ in range(SAVED_STEPS):
        optimizer.step()  # zero gradients: the steps count all the same
    directory = tmp_path_factory.mktemp("optimizer")
    model_sd = gpt.sharded_state_dict()
    dist_checkpointing.save(
        {"optimizer": optimizer.sharded_state_dict(model_sd, metadata=OPTIMIZER_METADATA)}, str(directory)
    )
    return directory


def _fresh_optimizer_and_saved_state(directory):
    from megatron.core import dist_checkpointing

    from moepp_megatron.checkpoint.checkpointer import OPTIMIZER_METADATA

    gpt, optimizer = _distributed_optimizer()
    internals.allocate_optimizer_states_for_loading(optimizer)
    sharded = optimizer.sharded_state_dict(gpt.sharded_state_dict(), is_loading=True, metadata=OPTIMIZER_METADATA)
    return optimizer, dist_checkpointing.load({"optimizer": sharded}, str(directory))["optimizer"]


def test_megatron_alone_loads_a_stale_step_shared_by_every_parameter(saved_optimizer):
    # What load_optimizer_state fixes; when this fails, megatron fixed it and the fix can go.
    optimizer, state = _fresh_optimizer_and_saved_state(saved_optimizer)
    with torch.no_grad():
        optimizer.load_state_dict(state)
    for states in _adam_states(optimizer):
        assert len(states) > 1
        assert len({id(s["step"]) for s in states}) == 1  # one tensor
        assert float(states[0]["step"]) == 1  # the dummy states' step, not SAVED_STEPS
    optimizer.step()
    for states in _adam_states(optimizer):
        # Each parameter's Adam update advanced the one shared counter.
        assert float(states[0]["step"]) == 1 + len(states)


def test_loaded_adam_steps_are_the_saved_ones_and_advance_once_per_step(saved_optimizer):
    optimizer, state = _fresh_optimizer_and_saved_state(saved_optimizer)
    internals.load_optimizer_state(optimizer, state)
    for states in _adam_states(optimizer):
        assert len({id(s["step"]) for s in states}) == len(states)
        assert {float(s["step"]) for s in states} == {SAVED_STEPS}
    optimizer.step()
    for states in _adam_states(optimizer):
        assert {float(s["step"]) for s in states} == {SAVED_STEPS + 1}
