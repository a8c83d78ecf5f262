"""A whole megatron GPT model with MoE++ layers against the plain-PyTorch reference model.

Checks logits, the per-layer load-balance losses and the gradient of every parameter of
L = L_ce + beta * sum_layers L_b, for both routing variants, with and without gating
residuals and capacity, with a dense layer in between, and for the vanilla MoE baseline.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import (
    MoEAuxLossAutoScaler,
    get_moe_layer_wise_logging_tracker,
)

from moepp_megatron.config.schema import ParallelConfig
from moepp_megatron.model.builder import build_model
from tests.reference import moepp_reference as ref
from tests.tiny_models import assert_grads_match_reference, hf_grads, reference_config, reference_weights, tiny_model

BATCH, SEQ = 2, 16
BETA = 0.01
TOL = dict(rtol=1e-4, atol=1e-5)

CASES = {
    "paper": dict(routing="paper"),
    "paper-capacity": dict(routing="paper", capacity_factor=1.0),
    "paper-no-residual": dict(routing="paper", gating_residual=False),
    "release-mlp-router": dict(routing="release", router="mlp"),
    "release-capacity": dict(routing="release", router="mlp", capacity_factor=1.0),
    "dense-layer-between": dict(routing="paper", layer_freq=[1, 0, 1]),
    "more-zc-experts": dict(num_zero_experts=2, num_copy_experts=2, num_constant_experts=3),
    "vanilla": dict(method="vanilla"),
    "vanilla-capacity": dict(method="vanilla", capacity_factor=1.0),
}


def megatron_loss_and_logits(gpt, ids, labels):
    get_moe_layer_wise_logging_tracker().clear()
    MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(1.0))
    positions = torch.arange(SEQ).expand(BATCH, -1)
    with torch.no_grad():
        logits = gpt(ids, positions, None)
    get_moe_layer_wise_logging_tracker().clear()
    loss = gpt(ids, positions, None, labels=labels).mean()
    loss.backward()
    lb = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"]
    return loss.detach(), logits, lb


@pytest.mark.parametrize("name", list(CASES))
def test_model_matches_reference(single_process, name):
    case = CASES[name]
    num_layers = len(case["layer_freq"]) if "layer_freq" in case else 2
    model = tiny_model(num_layers=num_layers, aux_loss_coeff=BETA, **case)
    torch.manual_seed(0)
    (gpt,) = build_model(model, ParallelConfig(cpu_mode=True))
    gpt.train()
    ids = torch.randint(0, model.vocab_size, (BATCH, SEQ))
    labels = torch.randint(0, model.vocab_size, (BATCH, SEQ))

    weights = reference_weights(gpt, model)
    cfg = reference_config(model)
    ref_logits, aux = ref.model_forward(ids, weights, cfg)
    ref_loss = ref.total_loss(ref_logits, labels, aux, beta=BETA)
    ref_loss.backward()

    loss, logits, lb = megatron_loss_and_logits(gpt, ids, labels)

    torch.testing.assert_close(logits, ref_logits.detach(), **TOL)
    moe_layers = [i for i, is_moe in enumerate(cfg.moe_layers) if is_moe]
    torch.testing.assert_close(lb[moe_layers], torch.stack(aux["lb_losses"]).detach(), **TOL)
    ref_lm_loss = ref.lm_loss(ref_logits, labels).detach()
    torch.testing.assert_close(loss, ref_lm_loss, **TOL)
    if "capacity_factor" in case:
        dropped = [(a["kept_mask"] != a["topk_mask"]).any() for a in aux["layers"] if a]
        assert any(dropped), "capacity case must drop something"

    assert_grads_match_reference(hf_grads(gpt, model), weights, **TOL)
