"""Forced routing distributions: exact slot counts, k distinct experts per token, and a
router that really picks them."""

from __future__ import annotations

import pytest
import torch

from moepp_megatron.bench.distributions import (
    balanced_assignment,
    balanced_shares,
    forced_routing,
    ideal_speedup,
    slot_counts,
)
from tests.moepp.test_layer_vs_reference import build_moepp_layer
from tests.tiny_models import tiny_model


def test_balanced_shares_follow_the_spec():
    # (16+4)E at tau 0.75: 1.5 FFN experts per token (docs/MOEPP_SPEC.md section 1).
    shares = balanced_shares(16, 4, 0.75)
    assert sum(shares) == pytest.approx(1.0)
    assert 2 * sum(shares[:16]) == pytest.approx(1.5)
    assert ideal_speedup(16, 4, 0.75) == pytest.approx(2 / 1.5)


@pytest.mark.parametrize("num_tokens,tau", [(7, 0.1), (64, 0.25), (100, 1.0)])
def test_balanced_assignment_has_exact_counts_and_distinct_picks(num_tokens, tau):
    shares = balanced_shares(8, 4, tau)
    picks_TK = balanced_assignment(num_tokens, 2, shares)
    assert picks_TK.shape == (num_tokens, 2)
    assert (picks_TK[:, 0] != picks_TK[:, 1]).all()
    counts = torch.bincount(picks_TK.flatten(), minlength=12).tolist()
    assert counts == slot_counts(2 * num_tokens, shares)
    assert all(abs(c - s * 2 * num_tokens) < 1 for c, s in zip(counts, shares))


def test_a_share_above_one_pick_per_token_is_refused():
    with pytest.raises(ValueError, match="one pick per token"):
        balanced_assignment(10, 2, [0.6, 0.2, 0.2])


@pytest.mark.parametrize("method", ["moepp", "vanilla"])
def test_forced_routing_makes_the_router_pick_the_assignment(single_process, method):
    layer = build_moepp_layer(tiny_model(method=method, capacity_factor=None)).train()
    num_experts = 8 if method == "moepp" else 4
    picks_TK = balanced_assignment(24, 2, [1 / num_experts] * num_experts)
    x = torch.randn(8, 3, 32)
    with forced_routing(layer.router, picks_TK):
        routing_map_TN = layer.router(x)[1]
    expected = torch.zeros(24, num_experts, dtype=torch.bool).scatter(1, picks_TK, True)
    assert torch.equal(routing_map_TN, expected)
    assert not torch.equal(layer.router(x)[1], expected), "the router must be restored"
