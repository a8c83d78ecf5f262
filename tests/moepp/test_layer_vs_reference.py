"""The megatron MoE++ layer against the plain-PyTorch reference written from the spec.

Outputs, this layer's router logits, the load-balance loss and the gradients of the input,
the incoming gating residual and every parameter must agree in fp32.

In bf16 (bf16 parameters and input, as under megatron's Float16Module) the reference still
computes in fp32 with the same weights. The router runs in fp32 on the bf16 input, so its
logits and the load-balance loss keep fp32 tolerances and every token is routed as in the
reference; expert outputs and gradients are bf16 GEMMs, within BF16_UNITS.
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
from tests.tiny_models import (
    assert_close,
    assert_grads_match_reference,
    hf_grads,
    reference_config,
    reference_weights,
    tiny_model,
)

SEQ, BATCH = 12, 3
BETA = 0.01
TOL = dict(rtol=1e-4, atol=1e-5)
# Outputs and gradients in bf16: a handful of roundings (expert GEMMs, SwiGLU, the weighted
# sum of expert outputs) separate each value from the fp32 reference.
BF16_UNITS = 4


def build_moepp_layer(model, bf16: bool = False, cpu_mode: bool = True):
    """Layer 1 of ``model``: on CPU in CPU mode, else on the current GPU."""
    config = transformer_config(model, ParallelConfig(cpu_mode=cpu_mode), bf16=bf16)
    spec = decoder_block_spec(config, use_transformer_engine=False).layer_specs[0]
    layer = build_module(spec.submodules.mlp, config=config)
    layer.set_layer_number(1)
    return layer


def output_weights(numel: int) -> torch.Tensor:
    """The loss is sum(output * these): values that bf16 holds exactly, so a bf16 layer
    receives the same output gradient as the fp32 reference."""
    return torch.linspace(-1, 1, numel).bfloat16().float()


def run_megatron(layer, x_SBD, residual_SBN):
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    x_SBD = x_SBD.clone().requires_grad_()
    residual = None if residual_SBN is None else residual_SBN.clone().requires_grad_()
    out, bias, logits = layer(x_SBD, residual)
    assert bias is None
    (out.float() * output_weights(out.numel()).to(out.device).view_as(out)).sum().backward()
    lb = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0]
    return out.detach(), logits.detach(), lb, x_SBD.grad, None if residual is None else residual.grad


def run_reference(model, weights, x_SBD, residual_SBN):
    cfg = reference_config(model)
    D, N = model.hidden_size, cfg.num_experts
    # megatron flattens [S, B] -> T seq-major; the reference takes any token order.
    x = x_SBD.reshape(-1, D).clone().requires_grad_()
    residual = None if residual_SBN is None else residual_SBN.reshape(-1, N).clone().requires_grad_()
    y, logits, aux = ref.moepp_layer(x, ref.moe_weights(weights, 0), residual, cfg)
    weight = output_weights(y.numel()).view(x_SBD.shape).reshape_as(y)
    ((y * weight).sum() + BETA * aux["lb_loss"]).backward()
    return y.detach().view_as(x_SBD), logits.detach(), aux, x.grad.view_as(x_SBD), residual


CASES = [
    dict(routing=routing, gating_residual=residual, capacity_factor=capacity, router=router)
    for routing in ("paper", "release")
    for residual in (True, False)
    for capacity in (None, 0.8)
    for router in ("linear", "mlp")
]


# Both routing variants, with capacity and the gating residual.
BF16_CASES = [dict(c, bf16=True) for c in CASES if c["gating_residual"] and c["capacity_factor"]]


@pytest.mark.parametrize(
    "case", CASES + BF16_CASES, ids=lambda c: "-".join(str(k if v is True and k == "bf16" else v) for k, v in c.items())
)
def test_layer_matches_reference(single_process, case):
    case = dict(case)
    bf16 = case.pop("bf16", False)
    torch.manual_seed(0)
    model = tiny_model(aux_loss_coeff=BETA, **case)
    layer = build_moepp_layer(model, bf16)
    layer.train()
    num_experts = layer.router.config.moepp_num_experts
    x = torch.randn(SEQ, BATCH, model.hidden_size)
    if bf16:
        x = x.bfloat16().float()  # the bf16 values, which the fp32 reference sees exactly
    residual = torch.randn(SEQ, BATCH, num_experts)

    weights = reference_weights(layer, model, prefix="decoder.layers.0.mlp.")
    out, logits, lb, x_grad, residual_grad = run_megatron(layer, x.bfloat16() if bf16 else x, residual)
    ref_out, ref_logits, aux, ref_x_grad, ref_residual = run_reference(model, weights, x, residual)

    if case["capacity_factor"] is not None:
        assert (aux["kept_mask"] != aux["topk_mask"]).any(), "capacity case must drop something"
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits.view(-1, num_experts), ref_logits, **TOL)
    torch.testing.assert_close(lb, aux["lb_loss"].detach(), **TOL)
    units = BF16_UNITS if bf16 else None
    assert out.dtype == (torch.bfloat16 if bf16 else torch.float32)
    assert_close(out, ref_out, units, **TOL)
    assert_close(x_grad, ref_x_grad, units, **TOL)
    if case["gating_residual"]:
        assert_close(residual_grad.view(-1, num_experts), ref_residual.grad, units, **TOL)
    grads = hf_grads(layer, model, prefix="decoder.layers.0.mlp.")
    assert_grads_match_reference(grads, weights, units, **TOL)
