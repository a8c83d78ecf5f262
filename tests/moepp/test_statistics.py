"""Routing statistics agree with counts taken from the reference layer's routing masks, for
MoE++ and for the vanilla baseline (megatron's stock router, counting)."""

from __future__ import annotations

import torch

from moepp_megatron.moepp.statistics import collect_routing_statistics
from tests.moepp.test_layer_vs_reference import build_moepp_layer, run_megatron, run_reference
from tests.reference import moepp_reference as ref
from tests.tiny_models import reference_config, reference_weights, tiny_model


def test_statistics_match_reference_counts(single_process):
    torch.manual_seed(1)
    model = tiny_model(routing="paper", capacity_factor=0.8)
    layer = build_moepp_layer(model).train()
    x = torch.randn(12, 3, model.hidden_size)
    weights = reference_weights(layer, model, prefix="decoder.layers.0.mlp.")
    run_megatron(layer, x, None)
    _, _, aux, _, _ = run_reference(model, weights, x, None)
    picked, kept = aux["topk_mask"].double(), aux["kept_mask"].double()
    tokens = x.shape[0] * x.shape[1]

    (stats,) = collect_routing_statistics(layer)

    assert stats.layer == 1 and stats.tokens == tokens
    assert 0 < stats.dropped_fraction == (picked.sum() - kept.sum()).item() / picked.sum().item()
    # Columns: 4 FFN, then 2 constant, 1 copy, 1 zero. The same statistics before dropping
    # (picked) and after it (kept).
    slots = tokens * 2
    for shares, mask in ((stats.picked, picked), (stats.kept, kept)):
        assert shares.ffn_experts_per_token == mask[:, :4].sum().item() / tokens
        assert shares.zc_share == {
            "constant": mask[:, 4:6].sum().item() / slots,
            "copy": mask[:, 6].sum().item() / slots,
            "zero": mask[:, 7].sum().item() / slots,
        }
        torch.testing.assert_close(torch.tensor(shares.expert_load, dtype=torch.float64), mask.sum(0) / slots)
        ffn_load = mask[:, :4].sum(0)
        assert shares.ffn_load_imbalance == (ffn_load.max() / ffn_load.mean()).item()
    # Capacity 0.8 drops: the kept FFN load is flatter than the picked one.
    assert stats.kept.ffn_experts_per_token < stats.picked.ffn_experts_per_token
    assert stats.kept.ffn_load_imbalance < stats.picked.ffn_load_imbalance
    # Reading resets the counters; eval forwards do not count.
    layer.eval()
    with torch.no_grad():
        layer(x)
    assert collect_routing_statistics(layer)[0].tokens == 0


def test_vanilla_statistics_match_reference_counts(single_process):
    torch.manual_seed(1)
    model = tiny_model(method="vanilla", capacity_factor=0.8)
    layer = build_moepp_layer(model).train()
    x = torch.randn(12, 3, model.hidden_size)
    weights = reference_weights(layer, model, prefix="decoder.layers.0.mlp.")
    out, _ = layer(x.clone().requires_grad_())
    out.sum().backward()
    _, _, aux = ref.moepp_layer(x.reshape(-1, model.hidden_size), ref.moe_weights(weights, 0), None,
                                reference_config(model))
    picked, kept = aux["topk_mask"].double(), aux["kept_mask"].double()
    tokens = x.shape[0] * x.shape[1]

    (stats,) = collect_routing_statistics(layer)

    assert stats.tokens == tokens and stats.kept.zc_share == {} == stats.picked.zc_share
    assert stats.picked.ffn_experts_per_token == 2.0
    assert stats.kept.ffn_experts_per_token == kept.sum().item() / tokens < 2.0
    torch.testing.assert_close(torch.tensor(stats.picked.expert_load, dtype=torch.float64), picked.sum(0) / (tokens * 2))
    assert stats.dropped_fraction == (picked.sum() - kept.sum()).item() / picked.sum().item()
