"""The paper's presets (docs/MOEPP_SPEC.md, Table 2) and their vanilla baselines."""

from __future__ import annotations

from pathlib import Path

import pytest

from moepp_megatron.config import load_config
from moepp_megatron.model.builder import transformer_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# name: (layers, hidden, moe ffn, heads, head dim, N_ffn, (zero, copy, constant))
PAPER = {
    "moepp-0.6b-8+4e": (12, 768, 2048, 12, 64, 8, (1, 1, 2)),
    "moepp-1b-16+4e": (12, 768, 2048, 12, 64, 16, (1, 1, 2)),
    "moepp-2b-32+8e": (12, 768, 2048, 12, 64, 32, (1, 1, 6)),
    "moepp-7b-16+4e": (24, 1536, 4096, 16, 96, 16, (1, 1, 2)),
}
BASELINES = {
    "moepp-0.6b-8+4e": "vanilla-0.6b-8e",
    "moepp-1b-16+4e": "vanilla-1b-16e",
    "moepp-2b-32+8e": "vanilla-2b-32e",
    "moepp-7b-16+4e": "vanilla-7b-16e",
}


@pytest.mark.parametrize("name", list(PAPER))
def test_preset_matches_paper_table(name):
    m = load_config(CONFIGS / f"{name}.yaml").model
    zc = (m.moe.num_zero_experts, m.moe.num_copy_experts, m.moe.num_constant_experts)
    shape = (m.num_layers, m.hidden_size, m.moe.ffn_hidden_size, m.num_attention_heads,
             m.head_dim, m.moe.num_ffn_experts, zc)
    assert shape == PAPER[name]
    assert (m.moe.topk, m.moe.tau, m.moe.capacity_factor, m.moe.aux_loss_coeff) == (2, 0.75, 1.1, 0.01)
    assert (m.seq_length, m.norm_eps, m.rope_base) == (2048, 1e-6, 10000.0)


@pytest.mark.parametrize("name", list(BASELINES))
def test_vanilla_baseline_has_the_same_ffn_experts(name):
    moepp = load_config(CONFIGS / f"{name}.yaml").model
    vanilla = load_config(CONFIGS / f"{BASELINES[name]}.yaml").model
    assert vanilla.moe.method == "vanilla" and vanilla.moe.num_zc_experts == 0
    for field in ("num_ffn_experts", "ffn_hidden_size", "topk"):
        assert getattr(vanilla.moe, field) == getattr(moepp.moe, field)
    assert (vanilla.num_layers, vanilla.hidden_size) == (moepp.num_layers, moepp.hidden_size)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("[!_]*.yaml")), ids=lambda p: p.stem)
def test_every_preset_builds_a_megatron_config(path):
    config = load_config(path)
    tc = transformer_config(config.model, config.parallel)
    assert tc.num_moe_experts == config.model.moe.num_ffn_experts
