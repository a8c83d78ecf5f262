"""The megatron MoE++ layer against the plain-PyTorch reference written from the spec.

Outputs, this layer's router logits, the load-balance loss and the gradients of the input,
the incoming gating residual and every parameter must agree in fp32.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_moe_layer_wise_logging_tracker,
)

from moepp_megatron.config.schema import ParallelConfig
from moepp_megatron.model.builder import transformer_config
from moepp_megatron.model.specs import decoder_block_spec
from megatron.core.transformer.spec_utils import build_module
from tests.reference import moepp_reference as ref
from tests.tiny_models import assert_grads_match_reference, hf_grads, reference_config, reference_weights, tiny_model

SEQ, BATCH = 12, 3
BETA = 0.01
TOL = dict(rtol=1e-4, atol=1e-5)


def build_moepp_layer(model):
    config = transformer_config(model, ParallelConfig(cpu_mode=True))
    spec = decoder_block_spec(config, use_transformer_engine=False).layer_specs[0]
    layer = build_module(spec.submodules.mlp, config=config)
    layer.set_layer_number(1)
    return layer


def run_megatron(layer, x_SBD, residual_SBN):
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x_SBD = x_SBD.clone().requires_grad_()
    residual = None if residual_SBN is None else residual_SBN.clone().requires_grad_()
    out, bias, logits = layer(x_SBD, residual)
    assert bias is None
    weight = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weight).sum().backward()
    lb = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0]
    return out.detach(), logits.detach(), lb, x_SBD.grad, None if residual is None else residual.grad


def run_reference(model, weights, x_SBD, residual_SBN):
    cfg = reference_config(model)
    D, N = model.hidden_size, cfg.num_experts
    # megatron flattens [S, B] -> T seq-major; the reference takes any token order.
    x = x_SBD.reshape(-1, D).clone().requires_grad_()
    residual = None if residual_SBN is None else residual_SBN.reshape(-1, N).clone().requires_grad_()
    y, logits, aux = ref.moepp_layer(x, ref.moe_weights(weights, 0), residual, cfg)
    weight = torch.linspace(-1, 1, y.numel()).view(x_SBD.shape).reshape_as(y)
    ((y * weight).sum() + BETA * aux["lb_loss"]).backward()
    return y.detach().view_as(x_SBD), logits.detach(), aux, x.grad.view_as(x_SBD), residual


CASES = [
    dict(routing=routing, gating_residual=residual, capacity_factor=capacity, router=router)
    for routing in ("paper", "release")
    for residual in (True, False)
    for capacity in (None, 0.8)
    for router in ("linear", "mlp")
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_layer_matches_reference(single_process, case):
    torch.manual_seed(0)
    model = tiny_model(aux_loss_coeff=BETA, **case)
    layer = build_moepp_layer(model)
    layer.train()
    num_experts = layer.router.config.moepp_num_experts
    x = torch.randn(SEQ, BATCH, model.hidden_size)
    residual = torch.randn(SEQ, BATCH, num_experts)

    weights = reference_weights(layer, model, prefix="decoder.layers.0.mlp.")
    out, logits, lb, x_grad, residual_grad = run_megatron(layer, x, residual)
    ref_out, ref_logits, aux, ref_x_grad, ref_residual = run_reference(model, weights, x, residual)

    if case["capacity_factor"] is not None:
        assert (aux["kept_mask"] != aux["topk_mask"]).any(), "capacity case must drop something"
    torch.testing.assert_close(logits.view(-1, num_experts), ref_logits, **TOL)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(lb, aux["lb_loss"].detach(), **TOL)
    torch.testing.assert_close(x_grad, ref_x_grad, **TOL)
    if case["gating_residual"]:
        torch.testing.assert_close(residual_grad.view(-1, num_experts), ref_residual.grad, **TOL)
    assert_grads_match_reference(hf_grads(layer, model, prefix="decoder.layers.0.mlp."), weights, **TOL)
