"""The Hugging Face MoE++ model against megatron's model with the same weights (no training,
no files): every routing variant, router, ZC mix, dense layers in between, top-k 1 and 3,
the vanilla baseline; its KV cache; its config."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from moepp_megatron.config.schema import ParallelConfig
from moepp_megatron.conversion.hf_config import from_hf_config, hf_config_object, to_hf_config
from moepp_megatron.conversion.hf_names import hf_to_megatron, megatron_to_hf
from moepp_megatron.hf.configuration_moepp import MoEPPConfig
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


def _pair(**moe):
    num_layers = len(moe["layer_freq"]) if "layer_freq" in moe else 2
    model = tiny_model(num_layers=num_layers, **moe)
    torch.manual_seed(0)
    (gpt,) = build_model(model, ParallelConfig(cpu_mode=True))
    state = {k: v for k, v in gpt.state_dict().items() if not k.endswith("_extra_state")}
    config = to_hf_config(model, torch_dtype="float32")
    hf = MoEPPForCausalLM(hf_config_object(config))
    hf.load_state_dict(megatron_to_hf(state, model), strict=True)
    return model, gpt.eval(), hf.eval(), state


@pytest.mark.parametrize("name", list(CASES))
def test_hf_model_equals_megatron_model(single_process, name):
    model, gpt, hf, state = _pair(**CASES[name])
    ids = torch.randint(0, model.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = gpt(ids, torch.arange(16).expand(2, -1), None)
        logits = hf(ids).logits
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

    model, _, hf, _ = _pair(routing="paper", num_constant_experts=3)
    hf.config.auto_map = {"AutoConfig": "configuration_moepp.MoEPPConfig",
                          "AutoModelForCausalLM": "modeling_moepp.MoEPPForCausalLM"}
    hf.save_pretrained(tmp_path)
    from moepp_megatron.conversion.hf_files import copy_code_files

    copy_code_files(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    assert config.model_type == "MoE++" and config.moepp_num_constant_experts == 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, trust_remote_code=True)
    ids = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, hf(ids).logits, atol=0, rtol=0)


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
    ],
)
def test_invalid_configs_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        MoEPPConfig(**fields)
