"""Model arithmetic against built models: the parameter counts of model/size.py equal the
parameters megatron builds (MoE++ with either router, without constant experts, vanilla,
dense layers mixed in); the memory estimate shrinks where sharding says it must."""

from __future__ import annotations

import pytest

from moepp_megatron.config.schema import ParallelConfig
from moepp_megatron.model.size import (
    expected_ffn_experts_per_token,
    forward_flops_per_token,
    parameter_counts,
    training_memory,
)
from tests.tiny_models import tiny_model

MODELS = {
    "moepp linear router": tiny_model(),
    "moepp mlp router": tiny_model(router="mlp"),
    "no constant experts": tiny_model(num_constant_experts=0, num_zero_experts=2),
    "vanilla": tiny_model(method="vanilla"),
    "dense layers between": tiny_model(num_layers=4, layer_freq=[1, 0, 0, 1]),
    "every second layer": tiny_model(num_layers=4, layer_freq=2),
}


@pytest.mark.parametrize("name", MODELS)
def test_parameter_count_is_what_megatron_builds(single_process, name):
    from moepp_megatron.model.builder import build_model

    model = MODELS[name]
    (gpt,) = build_model(model, ParallelConfig(cpu_mode=True))
    built = sum(p.numel() for p in gpt.parameters())
    expert = sum(p.numel() for n, p in gpt.named_parameters() if ".experts." in n)
    counts = parameter_counts(model)
    assert (counts.total, counts.expert) == (built, expert)


def test_active_parameters_and_flops_follow_the_ffn_experts_per_token():
    moepp, vanilla = tiny_model(tau=0.75), tiny_model(method="vanilla")
    # k * tau*N_ffn / (tau*N_ffn + N_zc) = 2 * 3 / (3 + 4)
    assert expected_ffn_experts_per_token(moepp.moe) == pytest.approx(6 / 7)
    assert expected_ffn_experts_per_token(vanilla.moe) == 2
    per_expert = 3 * moepp.hidden_size * moepp.moe.ffn_hidden_size
    counts = parameter_counts(moepp)
    assert counts.active == pytest.approx(counts.total - counts.expert + 2 * 6 / 7 * per_expert)
    one_more = forward_flops_per_token(moepp, 1.0) - forward_flops_per_token(moepp, 0.0)
    assert one_more == 2 * 2 * per_expert  # 2 FLOPs per weight, in each of the 2 MoE layers


def test_memory_estimate_shrinks_with_sharding():
    model = tiny_model(num_layers=4)

    def memory(world_size=8, distributed_optimizer=False, **parallel):
        return training_memory(model, ParallelConfig(**parallel), world_size=world_size, micro_batch=1,
                               num_microbatches=4, bf16=True, distributed_optimizer=distributed_optimizer)

    plain = memory()
    sharded = memory(distributed_optimizer=True)
    assert sharded.weights == plain.weights and sharded.optimizer < plain.optimizer / 4
    assert memory(expert=4).weights < plain.weights
    assert memory(pipeline=2).weights < plain.weights
    assert memory(recompute="full").activations < plain.activations
    assert plain.total == plain.weights + plain.optimizer + plain.activations
