"""Megatron checkpoints (trained under EP=2) -> Hugging Face: the HF model computes the
megatron model's logits and greedy continuations, with and without its KV cache and in
left-padded batches; the released family is written in the released format (model_type
"MoE++"), the others as model_type "moepp-megatron", which the released code never computes."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conversion.helpers import hf_model, megatron_greedy, megatron_logits, megatron_model

FAMILIES = ["release", "paper", "vanilla"]
# The bf16 run exported in fp32: every bf16 weight converts exactly, so fp32 tolerances hold.
LOGIT_FAMILIES = [*FAMILIES, "release-bf16"]
LOGIT_TOL = 1e-4
PROMPTS = ["The return statement", "Classes provide a means of bundling data and", "import"]


def _prompt_ids(hf_dir, text):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.slow
@pytest.mark.parametrize("family", LOGIT_FAMILIES)
def test_hf_logits_equal_megatron(trained, family):
    gpt = megatron_model(trained.run_dir(family))
    model = hf_model(trained.hf_dir(family))
    ids = torch.randint(0, 400, (3, 32), generator=torch.Generator().manual_seed(0))
    expected = megatron_logits(gpt, ids)
    with torch.no_grad():
        logits = model(ids).logits
    diff = (logits - expected).abs().max().item()
    print(f"{family}: max |HF - megatron| logit difference {diff:.2e}")
    assert logits.shape == expected.shape == (3, 32, 512)
    assert diff < LOGIT_TOL


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_matches(trained, family):
    gpt = megatron_model(trained.run_dir(family))
    hf_dir = trained.hf_dir(family)
    model = hf_model(hf_dir)
    for text in PROMPTS:
        ids = _prompt_ids(hf_dir, text)
        expected = megatron_greedy(gpt, ids, new_tokens=6)
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
        assert cached.tolist() == uncached.tolist() == expected.tolist(), text


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_left_padded_batch_equals_one_by_one(trained, family):
    """The exported tokenizer pads (left, with its unknown piece) as it is: a batch of prompts
    of different lengths generates what each prompt generates alone."""
    from transformers import AutoTokenizer

    hf_dir = trained.hf_dir(family)
    model = hf_model(hf_dir)
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert tokenizer.padding_side == "left" and tokenizer.pad_token == tokenizer.unk_token
    assert tokenizer.pad_token_id == model.config.pad_token_id == model.generation_config.pad_token_id
    assert batch.attention_mask[:, 0].tolist().count(0) == len(PROMPTS) - 1  # all but the longest padded
    together = model.generate(**batch, max_new_tokens=6, do_sample=False)
    for row, text in enumerate(PROMPTS):
        ids = tokenizer(text, return_tensors="pt").input_ids
        alone = model.generate(ids, max_new_tokens=6, do_sample=False)
        assert together[row, -6:].tolist() == alone[0, -6:].tolist(), text

    # Logits of the real tokens do not depend on the padding beside them.
    with torch.no_grad():
        padded = model(**batch).logits
        for row, text in enumerate(PROMPTS):
            ids = tokenizer(text, return_tensors="pt").input_ids
            torch.testing.assert_close(padded[row, -ids.shape[1]:], model(ids).logits[0], atol=1e-5, rtol=1e-5)


@pytest.fixture
def released_code_installed(monkeypatch):
    """model_type "MoE++" served by code registered in this process, as where the released
    MoE++ code is installed; this package's classes of that type stand in for it. Under
    such a registration transformers uses the registered code even with
    ``trust_remote_code=True``, ahead of the code files in the model directory."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from moepp_megatron.hf.configuration_moepp import MoEPPConfig
    from moepp_megatron.hf.modeling_moepp import MoEPPForCausalLM

    for mapping in (CONFIG_MAPPING, MODEL_FOR_CAUSAL_LM_MAPPING):  # undone after the test
        monkeypatch.setattr(mapping, "_extra_content", dict(mapping._extra_content))
    AutoConfig.register("MoE++", MoEPPConfig)
    AutoModelForCausalLM.register(MoEPPConfig, MoEPPForCausalLM)
    return MoEPPForCausalLM


@pytest.mark.slow
def test_released_code_never_computes_a_non_released_export(trained, released_code_installed):
    """A "paper" export (model_type "moepp-megatron") does not reach the installed "MoE++" code:
    without trust_remote_code it is refused, with it the export's own code computes
    megatron's logits (and our "MoE++" class, called by hand, refuses it naming a field). A
    released-family export runs on the installed code, with megatron's logits."""
    from transformers import AutoModelForCausalLM

    ids = torch.randint(0, 400, (2, 32), generator=torch.Generator().manual_seed(3))

    def difference_to_megatron(model, family):
        with torch.no_grad():
            logits = model.eval()(ids).logits
        return (logits - megatron_logits(megatron_model(trained.run_dir(family)), ids)).abs().max().item()

    paper = trained.hf_dir("paper")
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(paper, trust_remote_code=False)
    with pytest.raises(ValueError, match="moepp_num_constant_experts=3 .* has model_type 'moepp-megatron'"):
        released_code_installed.from_pretrained(paper)
    own = AutoModelForCausalLM.from_pretrained(paper, trust_remote_code=True)
    assert type(own).__name__ == "MoEPPMegatronForCausalLM" and type(own) is not released_code_installed
    assert difference_to_megatron(own, "paper") < LOGIT_TOL

    release = AutoModelForCausalLM.from_pretrained(trained.hf_dir("release"), trust_remote_code=True)
    assert type(release) is released_code_installed
    assert difference_to_megatron(release, "release") < LOGIT_TOL


@pytest.mark.slow
def test_release_family_uses_the_released_format(trained):
    hf_dir = trained.hf_dir("release")
    config = json.loads((hf_dir / "config.json").read_text())
    released = {
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
        "rope_scaling", "tie_word_embeddings", "num_experts", "moe_expert_interval", "moe_use_mixtral_gating",
        "moe_2layer_gate", "moe_use_logits_norm", "moe_gate_norm_std", "moe_feature_no_mul_topk", "model_type",
    }
    bookkeeping = {"architectures", "auto_map", "initializer_range", "use_cache", "bos_token_id", "eos_token_id",
                   "pad_token_id", "torch_dtype"}
    assert set(config) == released | bookkeeping
    assert config["model_type"] == "MoE++" and config["architectures"] == ["MoEPPForCausalLM"]
    assert config["num_experts"] == [4 + 4] and config["moe_expert_interval"] == 1
    assert config["moe_2layer_gate"] is True and config["moe_feature_no_mul_topk"] is False

    from safetensors import safe_open

    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shapes = {}
    for file in set(index.values()):
        with safe_open(str(hf_dir / file), "pt") as f:
            shapes.update({name: tuple(f.get_slice(name).get_shape()) for name in f.keys()})
    moe = "model.layers.0.mlp.moe."
    n, d, f_ = 8, 64, 96
    assert shapes[moe + "gate.wg.0.weight"] == (8 * n, d)
    assert shapes[moe + "gate.wg.2.weight"] == (n, 8 * n)
    assert shapes[moe + "gate.gate_map.weight"] == (n, n)
    assert shapes[moe + "experts.experts.3.up_proj.weight"] == (2 * f_, d)
    assert shapes[moe + "experts.experts.3.down_proj.weight"] == (d, f_)
    # Expert order: 4 FFN experts, 2 constant experts (4, 5), then copy (6) and zero (7), no weights.
    assert shapes[moe + "experts.experts.4.constant"] == (d,)
    assert shapes[moe + "experts.experts.5.wg.weight"] == (2, d)
    assert not any(name.startswith((moe + "experts.experts.6.", moe + "experts.experts.7.")) for name in shapes)


@pytest.mark.slow
def test_other_families_say_what_the_release_format_cannot(trained):
    paper = json.loads((trained.hf_dir("paper") / "config.json").read_text())
    assert paper["model_type"] == "moepp-megatron" and paper["architectures"] == ["MoEPPMegatronForCausalLM"]
    assert paper["num_experts"] == [4 + 6] and paper["moe_2layer_gate"] is False
    assert paper["moe_expert_interval"] is None  # layers [1, 0, 1, 1]: no released interval gives them
    assert {k: paper[k] for k in paper if k.startswith("moepp_")} == {
        "moepp_num_constant_experts": 3, "moepp_num_copy_experts": 2, "moepp_routing": "paper",
        "moepp_moe_layers": [1, 0, 1, 1], "moepp_dense_intermediate_size": 128, "moepp_capacity_factor": None,
    }
    vanilla = json.loads((trained.hf_dir("vanilla") / "config.json").read_text())
    assert vanilla["model_type"] == "moepp-megatron" and vanilla["moepp_method"] == "vanilla"
    assert vanilla["num_experts"] == [4] and vanilla["moe_expert_interval"] == 1


@pytest.mark.slow
def test_tokenizer_loads_offline_and_encodes_like_sentencepiece(trained, conversion_data):
    import sentencepiece
    from pydoc_data.topics import topics
    from transformers import AutoTokenizer

    hf_dir = trained.hf_dir("release")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir, trust_remote_code=True)
    sp = sentencepiece.SentencePieceProcessor(model_file=str(conversion_data[0]))
    texts = [topics[name] for name in sorted(topics)[:40]]
    texts += [line for text in texts for line in text.splitlines()]
    assert [tokenizer(t).input_ids for t in texts] == [sp.encode(t) for t in texts]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (sp.bos_id(), sp.eos_id())
    assert tokenizer.decode(sp.encode(texts[0])) == sp.decode(sp.encode(texts[0]))
