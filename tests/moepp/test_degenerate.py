"""MoE++ with nothing MoE++-specific switched on must be megatron's stock MoELayer.

No ZC experts, linear router, no gating residual, paper routing: then the MoE++ layer is
a softmax-then-top-k MoE, i.e. the stock layer with ``moe_router_pre_softmax=True``. The
stock aux loss is N/k times the spec's L_b, so its coefficient is beta * k / N. Any
difference elsewhere in the tests is then the method, not the plumbing.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_moe_layer_wise_logging_tracker,
)
from megatron.core.transformer.spec_utils import build_module

from moepp_megatron.config.schema import ParallelConfig
from moepp_megatron.model.builder import transformer_config
from moepp_megatron.model.specs import decoder_block_spec
from tests.tiny_models import tiny_model, with_moe

BETA = 0.01


def _build_layer(model, **config_overrides):
    config = transformer_config(model, ParallelConfig(cpu_mode=True))
    config = dataclasses.replace(config, **config_overrides)
    spec = decoder_block_spec(config, use_transformer_engine=False).layer_specs[0]
    layer = build_module(spec.submodules.mlp, config=config)
    layer.set_layer_number(1)
    return layer.train()


def _forward_backward(layer, x):
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x = x.clone().requires_grad_()
    out = layer(x)[0]
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}


@pytest.mark.parametrize("capacity_factor", [None, 0.9])
def test_moepp_without_zc_experts_is_stock_moe(single_process, capacity_factor):
    torch.manual_seed(0)
    moepp_model = tiny_model(
        num_zero_experts=0, num_copy_experts=0, num_constant_experts=0, router="linear",
        gating_residual=False, routing="paper", capacity_factor=capacity_factor,
        aux_loss_coeff=BETA,
    )
    moepp = _build_layer(moepp_model)
    num_experts, topk = moepp_model.moe.num_ffn_experts, moepp_model.moe.topk
    stock_model = with_moe(moepp_model, method="vanilla", aux_loss_coeff=BETA * topk / num_experts)
    stock = _build_layer(stock_model, moe_router_pre_softmax=True)
    assert type(stock).__name__ == "MoELayer"
    missing, unexpected = stock.load_state_dict(moepp.state_dict(), strict=False)
    assert not missing
    assert set(unexpected) <= {"router.gate_map", "zc_experts.constant_vectors", "zc_experts.constant_gates"}

    x = torch.randn(10, 3, moepp_model.hidden_size)
    out, x_grad, grads = _forward_backward(moepp, x)
    stock_out, stock_x_grad, stock_grads = _forward_backward(stock, x)

    torch.testing.assert_close(out, stock_out, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_grad, stock_x_grad, rtol=1e-6, atol=1e-7)
    for name, grad in stock_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)


def test_zc_set_without_constant_experts_checkpoints(single_process, tmp_path):
    """The paper's ZC-set ablation (zero / copy only): no empty parameters, which
    dist_checkpointing cannot shard (it failed with a ZeroDivisionError)."""
    from megatron.core import dist_checkpointing

    from moepp_megatron.model.builder import build_model

    model = tiny_model(num_zero_experts=1, num_copy_experts=0, num_constant_experts=0)
    chunks = build_model(model, ParallelConfig(cpu_mode=True))
    assert all(param.numel() for param in chunks.parameters())
    weights = {k: v.clone() for k, v in chunks[0].state_dict().items() if not k.endswith("_extra_state")}
    dist_checkpointing.save(chunks.sharded_state_dict(), str(tmp_path))
    for param in chunks.parameters():
        param.data.zero_()
    chunks.load_state_dict(dist_checkpointing.load(chunks.sharded_state_dict(), str(tmp_path)))
    for name, value in chunks[0].state_dict().items():
        if name in weights:
            torch.testing.assert_close(value, weights[name], rtol=0, atol=0, msg=name)
