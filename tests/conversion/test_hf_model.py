"""The Hugging Face MoE++ model against megatron's model with the same weights (no training,
no files): every routing variant, router, ZC mix, dense layers in between, top-k 1 and 3,
the vanilla baseline; its KV cache; its config: which model type, and the released
``moe_expert_interval`` against megatron's ``layer_freq`` both ways."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moepp_megatron.config.schema import ParallelConfig
from moepp_megatron.conversion.hf_config import (
    EXTENDED_MODEL_TYPE, auto_map, from_hf_config, hf_config_object, to_hf_config,
)
from moepp_megatron.conversion.hf_names import hf_to_megatron, megatron_to_hf
from moepp_megatron.hf.configuration_moepp import RELEASED_ARCHITECTURE, MoEPPConfig, MoEPPMegatronConfig
from moepp_megatron.hf.modeling_moepp import MoEPPForCausalLM
from moepp_megatron.model.builder import build_model
from tests.tiny_models import tiny_model

CASES = {
    "paper": dict(routing="paper"),
    "paper-no-residual": dict(routing="paper", gating_residual=False),
    "release-mlp-router": dict(routing="release", router="mlp"),
    "release-linear-router-top3": dict(routing="release", topk=3),
    "dense-layer-between": dict(routing="paper", layer_freq=[1, 0, 1]),
    "more-zc-experts": dict(num_zero_experts=2, num_copy_experts=2, num_constant_experts=3),
    "no-constant-experts": dict(num_constant_experts=0),
    "vanilla": dict(method="vanilla"),
    "vanilla-top1": dict(method="vanilla", topk=1),
}


def _pair(num_layers=None, dense_ffn_hidden_size=None, **moe):
    """(model, megatron model, HF model, megatron state) with the same random weights."""
    num_layers = num_layers or (len(moe["layer_freq"]) if "layer_freq" in moe else 2)
    model = tiny_model(num_layers=num_layers, **moe)
    if dense_ffn_hidden_size:
        model = dataclasses.replace(model, ffn_hidden_size=dense_ffn_hidden_size)
    torch.manual_seed(0)
    (gpt,) = build_model(model, ParallelConfig(cpu_mode=True))
    state = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    config = to_hf_config(model, torch_dtype="float32")
    hf = MoEPPForCausalLM(hf_config_object(config))
    hf.load_state_dict(megatron_to_hf(state, model), strict=True)
    return model, gpt.eval(), hf.eval(), state


def _logits(model, gpt, hf):
    ids = torch.randint(0, model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return hf(ids).logits, gpt(ids, torch.arange(16).expand(2, -1), None)


def _moe_layers(gpt, hf) -> tuple[list[int], list[int]]:
    """Which layers are expert layers, in megatron and in the HF model."""
    return [int(hasattr(layer.mlp, "router")) for layer in gpt.decoder.layers], [
        int(layer.is_moe) for layer in hf.model.layers
    ]


@pytest.mark.parametrize("name", list(CASES))
def test_hf_model_equals_megatron_model(single_process, name):
    model, gpt, hf, state = _pair(**CASES[name])
    logits, expected = _logits(model, gpt, hf)
    print(f"{name}: max |HF - megatron| = {(logits - expected).abs().max().item():.2e}")
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)

    back = hf_to_megatron(dict(hf.state_dict()), model)
    assert back.keys() == {k for k, v in state.items() if v.numel()}
    assert all(torch.equal(back[k], state[k]) for k in back)


def test_config_round_trips_through_hf(single_process):
    for moe in CASES.values():
        model = tiny_model(num_layers=len(moe.get("layer_freq", [1, 1])), **moe)
        if model.moe.method == "vanilla":  # ZC counts and router kind mean nothing there
            model = dataclasses.replace(model, moe=dataclasses.replace(
                model.moe, num_zero_experts=0, num_copy_experts=0, num_constant_experts=0,
                router="linear", gating_residual=False, routing="paper"))
        if not isinstance(model.moe.layer_freq, list):  # a dense FFN size no layer uses is not kept
            model = dataclasses.replace(model, ffn_hidden_size=model.moe.ffn_hidden_size)
        assert from_hf_config(to_hf_config(model, torch_dtype="float32")) == model


def test_kv_cache_decoding_equals_full_forward(single_process):
    from transformers.cache_utils import DynamicCache

    _, _, hf, _ = _pair(routing="release", router="mlp")
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = hf(ids, use_cache=False).logits
        cache = DynamicCache()
        prefix = hf(ids[:, :5], past_key_values=cache, use_cache=True).logits
        steps = [hf(ids[:, i : i + 1], past_key_values=cache, use_cache=True).logits for i in range(5, 12)]
    torch.testing.assert_close(torch.cat([prefix, *steps], dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 12


def test_save_and_load_with_auto_classes(single_process, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    from moepp_megatron.conversion.hf_files import copy_code_files

    _, _, hf, _ = _pair(routing="paper", num_constant_experts=3)
    assert type(hf.config).model_type == EXTENDED_MODEL_TYPE
    hf.config.auto_map = auto_map(EXTENDED_MODEL_TYPE)
    hf.save_pretrained(tmp_path)
    copy_code_files(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert config.model_type == "moepp-megatron" and config.moepp_num_constant_experts == 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded).__name__ == "MoEPPMegatronForCausalLM"
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, atol=0, rtol=0)


RELEASED_FAMILY = dict(routing="release", router="mlp")


@pytest.mark.parametrize(
    "change, released",
    [
        ({}, True),
        (dict(tau=0.5, capacity_factor=None, aux_loss_coeff=0.1), True),  # training-only: same logits
        (dict(router="linear"), True),  # moe_2layer_gate false
        (dict(routing="paper"), False),
        (dict(topk=3), False),
        (dict(num_constant_experts=3), False),
        (dict(gating_residual=False), False),
        (dict(method="vanilla"), False),
        (dict(layer_freq=[1, 0]), False),  # the released interval cannot start with an MoE layer
        (dict(head_dim=16), False),  # the released code derives head_dim from hidden_size
    ],
)
def test_model_type_is_moepp_only_for_what_the_released_code_computes(change, released):
    moe = {**RELEASED_FAMILY, **{k: v for k, v in change.items() if k != "head_dim"}}
    model = tiny_model(**moe)
    model = dataclasses.replace(model, head_dim=change.get("head_dim", model.head_dim))
    config = to_hf_config(model, torch_dtype="float32")
    model_type, architecture = (
        ("MoE++", "MoEPPForCausalLM") if released else ("moepp-megatron", "MoEPPMegatronForCausalLM")
    )
    assert (config["model_type"], config["architectures"]) == (model_type, [architecture])
    assert config["auto_map"]["AutoModelForCausalLM"] == f"modeling_moepp.{architecture}"
    assert type(hf_config_object(config)) is (MoEPPConfig if released else MoEPPMegatronConfig)


def test_released_interval_2_from_megatron(single_process):
    """Megatron's layers [dense, MoE, dense, MoE] are the released ``moe_expert_interval: 2``
    (layer i is an MoE layer iff (i + 1) % 2 == 0): a released-format export."""
    model, gpt, hf, _ = _pair(layer_freq=[0, 1, 0, 1], dense_ffn_hidden_size=24, **RELEASED_FAMILY)
    config = to_hf_config(model, torch_dtype="float32")
    assert config["model_type"] == "MoE++" and config["moe_expert_interval"] == 2
    assert not any(key in RELEASED_ARCHITECTURE for key in config)
    assert _moe_layers(gpt, hf) == ([0, 1, 0, 1], [0, 1, 0, 1])
    torch.testing.assert_close(*_logits(model, gpt, hf), atol=1e-5, rtol=1e-5)
    assert from_hf_config(config) == model


def test_released_interval_2_to_megatron(single_process):
    """A released config with ``moe_expert_interval: 2`` becomes a megatron model whose expert
    layers are 1 and 3, with the HF model's logits."""
    every_layer = to_hf_config(tiny_model(num_layers=4, **RELEASED_FAMILY), torch_dtype="float32")
    config = {**every_layer, "moe_expert_interval": 2}
    model = from_hf_config(config)
    assert model.moe.layer_freq == [0, 1, 0, 1]
    torch.manual_seed(0)
    hf = MoEPPForCausalLM(hf_config_object(config)).eval()
    (gpt,) = build_model(model, ParallelConfig(cpu_mode=True))
    result = gpt.load_state_dict(hf_to_megatron(dict(hf.state_dict()), model), strict=False)
    assert not result.unexpected_keys and all(k.endswith("_extra_state") for k in result.missing_keys)
    gpt.eval()
    assert _moe_layers(gpt, hf) == ([0, 1, 0, 1], [0, 1, 0, 1])
    torch.testing.assert_close(*_logits(model, gpt, hf), atol=1e-5, rtol=1e-5)


def test_megatron_layer_freq_2_is_beyond_the_released_interval(single_process):
    """Megatron's ``layer_freq: 2`` makes layers 0 and 2 expert layers, which no released
    interval gives: the export lists the layers (``moepp_moe_layers``, model_type
    "moepp-megatron") and computes megatron's logits."""
    model, gpt, hf, _ = _pair(num_layers=4, layer_freq=2, dense_ffn_hidden_size=24, **RELEASED_FAMILY)
    config = to_hf_config(model, torch_dtype="float32")
    assert config["model_type"] == "moepp-megatron" and config["moe_expert_interval"] is None
    assert config["moepp_moe_layers"] == [1, 0, 1, 0]
    assert _moe_layers(gpt, hf) == ([1, 0, 1, 0], [1, 0, 1, 0])
    torch.testing.assert_close(*_logits(model, gpt, hf), atol=1e-5, rtol=1e-5)
    assert from_hf_config(config).moe.layer_freq == [1, 0, 1, 0]


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(num_experts=8), "num_experts"),
        (dict(moepp_method="dense"), "moepp_method"),
        (dict(moepp_routing="release", moepp_num_zero_experts=2), "moepp_num_zero_experts"),
        (dict(moepp_method="vanilla", moe_2layer_gate=True), "moe_2layer_gate"),
        (dict(num_experts=[4]), "num_experts"),  # no room for FFN experts beside 4 ZC experts
        (dict(moe_use_logits_norm=True), "moe_use_logits_norm"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling"),
        (dict(moe_expert_interval=None), "moe_expert_interval"),
    ],
)
def test_invalid_configs_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEPPMegatronConfig(**fields)


@pytest.mark.parametrize(
    "fields, name",
    [
        (dict(moepp_routing="paper", moe_feature_no_mul_topk=True), "moepp_routing='paper'"),
        (dict(moepp_method="vanilla", moe_2layer_gate=False, moepp_gating_residual=False,
              moe_feature_no_mul_topk=True), "moepp_method='vanilla'"),
        (dict(moe_expert_interval=None, moepp_moe_layers=[1, 0] * 12), "moepp_moe_layers"),
        (dict(head_dim=64), "head_dim=64"),
    ],
)
def test_released_config_refuses_what_the_released_code_would_ignore(fields, name):
    """model_type "MoE++" is what the released code computes; the rest is "moepp-megatron"."""
    with pytest.raises(ValueError, match=f"{name}.* has model_type 'moepp-megatron'"):
        MoEPPConfig(**fields)
    assert MoEPPMegatronConfig(**fields).extended_fields()
