"""A bf16 training run's checkpoint (bf16 weights, as GPU runs write them) exported to
Hugging Face in bf16: the exported weights are the checkpoint's, bit for bit, and the bf16
HF model computes the bf16 megatron model's logits within bf16 rounding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conversion.helpers import hf_model, hf_tensors, megatron_logits, megatron_model

FAMILY = "release-bf16"


@pytest.mark.slow
def test_checkpoint_holds_bf16_weights_and_exports_them_exactly(trained):
    from megatron.core import dist_checkpointing

    from moepp_megatron.conversion.hf_names import megatron_to_hf
    from moepp_megatron.conversion.megatron_checkpoint import load_state, resolve_checkpoint

    directory, iteration = resolve_checkpoint(trained.run_dir(FAMILY))
    saved = dist_checkpointing.load_tensors_metadata(str(directory / f"iter_{iteration:07d}"))
    # Model tensors in bf16 (router included: megatron keeps it in params_dtype and computes
    # in fp32); fp32 main parameters and Adam moments live under the optimizer's chained_N.
    weights = {k: v.dtype for k, v in saved.items() if not k.startswith("chained_")}
    assert len(weights) > 10 and set(weights.values()) == {torch.bfloat16}

    run, state = load_state(directory, iteration)
    # fp32 holds every bf16 value exactly, so the bf16 export must give the saved bits back.
    expected = {k: v.to(torch.bfloat16) for k, v in megatron_to_hf(state, run.model).items()}
    exported = hf_tensors(trained.hf_dir(FAMILY, "bf16"))
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert exported[name].dtype == torch.bfloat16 and torch.equal(exported[name], tensor), name


@pytest.mark.slow
def test_bf16_hf_logits_match_bf16_megatron(trained):
    from megatron.core.transformer.module import Float16Module

    gpt = megatron_model(trained.run_dir(FAMILY))
    ids = torch.randint(0, 400, (3, 32), generator=torch.Generator().manual_seed(0))
    fp32 = megatron_logits(gpt, ids)
    expected = megatron_logits(Float16Module(dataclasses.replace(gpt.config, bf16=True), gpt), ids).float()
    with torch.no_grad():
        logits = hf_model(trained.hf_dir(FAMILY, "bf16"))(ids).logits.float()
    diff = (logits - expected).abs().max().item()
    rounding = (expected - fp32).abs().max().item()
    scale = expected.abs().max().item()
    print(f"bf16: max |HF - megatron| {diff:.2e}, max |megatron bf16 - fp32| {rounding:.2e}, max |logit| {scale:.2f}")
    # Both models round every layer's output to bf16 but order their ops differently
    # (attention, norms): they may differ by what bf16 rounding itself costs (the gap to the
    # fp32 model), and at most a few bf16 units (2**-8 relative) at the logits' scale.
    assert diff <= 2 * rounding and diff <= 2**-6 * scale
