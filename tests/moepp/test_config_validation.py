"""Bad MoE++ combinations fail at construction with the offending field named."""

from __future__ import annotations

import pytest

from moepp_megatron.config.schema import ParallelConfig
from moepp_megatron.model.builder import transformer_config
from tests.tiny_models import tiny_model, with_moe


def _config(parallel=None, **moe):
    return transformer_config(with_moe(tiny_model(), **moe), parallel or ParallelConfig(cpu_mode=True))


@pytest.mark.parametrize(
    "moe, field",
    [
        (dict(routing="release", num_zero_experts=2), "moepp_num_zero_experts"),
        (dict(routing="release", num_zero_experts=0), "moepp_num_zero_experts"),
        (dict(topk=9), "moe_router_topk"),
    ],
)
def test_moepp_config_errors_name_the_field(moe, field):
    with pytest.raises(ValueError, match=field):
        _config(**moe)


def test_ffn_experts_must_divide_expert_parallel():
    with pytest.raises(ValueError, match="num_moe_experts.*divisible by expert_model_parallel_size=3"):
        _config(parallel=ParallelConfig(cpu_mode=True, expert=3))


@pytest.mark.parametrize(
    "field, value",
    [("num_zero_experts", -1), ("tau", 0.0), ("tau", -0.5), ("capacity_factor", 0.0),
     ("router", "conv"), ("routing", "mine"), ("num_ffn_experts", 0)],
)
def test_user_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=f"model.moe.{field}"):
        with_moe(tiny_model(), **{field: value})


def test_unsupported_megatron_options_are_refused():
    import dataclasses

    config = _config()
    for name, value in [("moe_shared_expert_intermediate_size", 16), ("mtp_num_layers", 1),
                        ("moe_expert_capacity_factor", 1.0), ("moe_token_dispatcher_type", "flex")]:
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(config, **{name: value})


def test_pipeline_residual_needs_alltoall_and_no_custom_layout():
    pp2 = ParallelConfig(cpu_mode=True, pipeline=2)
    with pytest.raises(ValueError, match="moe_token_dispatcher_type must be 'alltoall' with pipeline"):
        _config(parallel=pp2, token_dispatcher="allgather")
    # Without gating residuals nothing crosses stages, so allgather is fine.
    assert _config(parallel=pp2, token_dispatcher="allgather", gating_residual=False)
    import dataclasses

    with pytest.raises(ValueError, match="pipeline_model_parallel_layout"):
        dataclasses.replace(_config(parallel=pp2), pipeline_model_parallel_layout="Et|tL")


def test_unsupported_residual_carriers_are_refused():
    import dataclasses

    config = _config()
    for name, value in [("cuda_graph_impl", "local"), ("overlap_moe_expert_parallel_comm", True)]:
        with pytest.raises(ValueError, match=name):
            dataclasses.replace(config, **{name: value})
