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
