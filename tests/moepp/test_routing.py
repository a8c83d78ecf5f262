"""MoE++ routing formulas against small cases computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.transformer.moe.moe_utils import (
    get_default_pg_collection,
    get_moe_layer_wise_logging_tracker,
)

from moepp_megatron.config.schema import ParallelConfig
from moepp_megatron.model.builder import transformer_config
from moepp_megatron.moepp.router import MoEPPRouter
from moepp_megatron.moepp.routing import drop_over_capacity, heterogeneous_capacity, topk_gates
from tests.tiny_models import tiny_model

LN2 = math.log(2.0)


def test_capacity_eq8_for_16_plus_4_experts():
    # T = 100 tokens * k=2 = 200 slots; tau*N_ffn + N_zc = 0.75*16 + 4 = 16.
    # FFN: 1.1 * 0.75 * 200 / 16 = 10.3125 -> 11;  ZC: 1.1 * 200 / 16 = 13.75 -> 14.
    assert heterogeneous_capacity(100, 2, 16, 4, tau=0.75, gamma=1.1) == (11, 14)
    # 2048 tokens, 32+8 experts, tau 0.25: denominator 16; FFN 1.0*0.25*4096/16 = 64.
    assert heterogeneous_capacity(2048, 2, 32, 8, tau=0.25, gamma=1.0) == (64, 256)


def test_paper_and_release_gates_by_hand():
    # 2 FFN experts, 1 copy, 1 zero. Token 0 picks FFN0 (0.4) and the zero expert (0.3).
    probs = torch.tensor([[0.4, 0.2, 0.1, 0.3], [0.1, 0.5, 0.3, 0.1]])
    logits = probs.log()
    _, paper, picked = topk_gates(logits, topk=2, variant="paper", num_zero=1)
    torch.testing.assert_close(paper, torch.tensor([[0.4, 0, 0, 0.3], [0, 0.5, 0.3, 0]]))
    _, release, _ = topk_gates(logits, topk=2, variant="release", num_zero=1)
    # Zero gate -> 0, the rest renormalised: FFN0 alone gets weight 1.
    torch.testing.assert_close(release, torch.tensor([[1.0, 0, 0, 0], [0, 0.625, 0.375, 0]]))
    assert picked.tolist() == [[True, False, False, True], [False, True, True, False]]


def test_drop_over_capacity_keeps_highest_gates():
    gates = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3]])
    picked = torch.ones_like(gates, dtype=torch.bool)
    kept_gates, kept = drop_over_capacity(gates, picked, torch.tensor([2, 3]), policy="probs")
    # Expert 0 holds 2: tokens 0 (0.9) and 2 (0.7) stay, token 1 (0.6) is dropped.
    assert kept.tolist() == [[True, True], [False, True], [True, True]]
    torch.testing.assert_close(kept_gates, torch.tensor([[0.9, 0.1], [0.0, 0.4], [0.7, 0.3]]))
    _, by_position = drop_over_capacity(gates, picked, torch.tensor([2, 3]), policy="position")
    assert by_position[:, 0].tolist() == [True, True, False]


def test_heterogeneous_load_balance_loss_by_hand(single_process):
    # N_ffn=2 + 1 zero expert, k=1, tau=0.5, beta=0.1.
    # Token 0: probs [.5, .25, .25] -> FFN0.  Token 1: probs [.25, .25, .5] -> zero expert.
    # f = [1/2, 0, 1/2], P = [.375, .25, .375], eta = [1, 1, .5]
    # L_b = .5*.375 + 0 + .5*.5*.375 = 0.28125
    model = tiny_model(num_zero_experts=1, num_copy_experts=0, num_constant_experts=0,
                       topk=1, tau=0.5, aux_loss_coeff=0.1)
    model.moe.num_ffn_experts = 2
    config = transformer_config(model, ParallelConfig(cpu_mode=True))
    router = MoEPPRouter(config, pg_collection=get_default_pg_collection())
    router.set_layer_number(1)
    get_moe_layer_wise_logging_tracker().clear()
    logits = torch.tensor([[[LN2, 0.0, 0.0]], [[0.0, 0.0, LN2]]], requires_grad=True)
    router.train()
    gates, routing_map = router.routing(logits)
    logged = get_moe_layer_wise_logging_tracker()["load_balancing_loss"]["values"][0]
    assert logged.item() == pytest.approx(0.28125, abs=1e-7)
    assert routing_map.tolist() == [[True, False, False], [False, False, True]]
    torch.testing.assert_close(gates, torch.tensor([[0.5, 0, 0], [0, 0, 0.5]]))


def test_z_loss_is_logged_over_all_experts(single_process):
    # z-loss = mean_t logsumexp(G_t)^2 over all N = N_ffn + N_zc logits.
    model = tiny_model(z_loss_coeff=1e-3)
    config = transformer_config(model, ParallelConfig(cpu_mode=True))
    router = MoEPPRouter(config, pg_collection=get_default_pg_collection()).train()
    router.set_layer_number(1)
    get_moe_layer_wise_logging_tracker().clear()
    logits = torch.randn(5, 2, config.moepp_num_experts)
    router.routing(logits)
    expected = torch.logsumexp(logits.view(-1, 8), dim=-1).square().mean()
    logged = get_moe_layer_wise_logging_tracker()["z_loss"]["values"][0]
    torch.testing.assert_close(logged, expected)
