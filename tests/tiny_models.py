"""Tiny model configs shared by tests, and their plain-PyTorch reference counterparts."""

from __future__ import annotations

import dataclasses

import torch

from moepp_megatron.config.schema import ModelConfig, MoEConfig
from moepp_megatron.conversion.hf_names import megatron_to_hf
from tests.reference.moepp_reference import RefConfig


def tiny_model(num_layers: int = 2, **moe_fields) -> ModelConfig:
    """4 FFN + (2 constant, 1 copy, 1 zero) experts, D=32: small enough for loops in tests."""
    moe = MoEConfig(num_ffn_experts=4, ffn_hidden_size=24, **moe_fields)
    return ModelConfig(
        num_layers=num_layers,
        hidden_size=32,
        num_attention_heads=4,
        head_dim=8,
        num_query_groups=2,
        ffn_hidden_size=40,
        seq_length=16,
        vocab_size=64,
        moe=moe,
    )


def reference_config(model: ModelConfig) -> RefConfig:
    moe = model.moe
    layer_freq = moe.layer_freq
    moe_layers = (
        [bool(flag) for flag in layer_freq]
        if isinstance(layer_freq, list)
        else [i % layer_freq == 0 for i in range(model.num_layers)]
    )
    return RefConfig(
        vocab_size=model.vocab_size,
        hidden_size=model.hidden_size,
        num_layers=model.num_layers,
        num_heads=model.num_attention_heads,
        head_dim=model.head_dim,
        num_kv_heads=model.num_query_groups,
        ffn_hidden_size=moe.ffn_hidden_size,
        dense_ffn_hidden_size=model.ffn_hidden_size,
        num_ffn_experts=moe.num_ffn_experts,
        num_zero=moe.num_zero_experts,
        num_copy=moe.num_copy_experts,
        num_constant=moe.num_constant_experts,
        topk=moe.topk,
        router=moe.router,
        gating_residual=moe.gating_residual,
        routing=moe.routing,
        tau=moe.tau,
        capacity_factor=moe.capacity_factor,
        rms_norm_eps=model.norm_eps,
        rope_theta=model.rope_base,
        moe_layers=moe_layers,
        vanilla=moe.method == "vanilla",
    )


def reference_weights(module: torch.nn.Module, model: ModelConfig, prefix: str = "") -> dict:
    """The module's parameters under HF names, as fresh fp32 CPU leaf tensors that require
    grad (bf16 parameters convert exactly, so the fp32 reference computes with the same
    weights)."""
    state = {prefix + name: p.detach().to("cpu", torch.float32, copy=True) for name, p in module.named_parameters()}
    return {name: t.requires_grad_() for name, t in megatron_to_hf(state, model).items()}


def hf_grads(module: torch.nn.Module, model: ModelConfig, prefix: str = "") -> dict:
    """The module's parameter gradients under HF names (zeros for params without grad)."""
    grads = {
        prefix + name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().clone()
        for name, p in module.named_parameters()
    }
    return megatron_to_hf(grads, model)


def with_moe(model: ModelConfig, **moe_fields) -> ModelConfig:
    return dataclasses.replace(model, moe=dataclasses.replace(model.moe, **moe_fields))


def bf16_tolerance(expected: torch.Tensor, units: float) -> dict:
    """``units`` bf16 rounding units (2**-8 relative: bf16 keeps 8 significant bits) at the
    largest magnitude of ``expected``, as assert_close arguments. A bf16 computation rounds
    every GEMM output and activation; each rounding moves a value by up to one unit at its
    scale, and errors of small entries are bounded by the tensor's scale, not their own."""
    return dict(rtol=0.0, atol=units * 2**-8 * expected.abs().max().item())


def assert_close(actual: torch.Tensor, expected: torch.Tensor, bf16_units: float | None = None, msg=None, **tol) -> None:
    """assert_close with ``tol``, or within ``bf16_units`` (see :func:`bf16_tolerance`),
    comparing values as fp32 on the CPU."""
    actual, expected = actual.float().cpu(), expected.float().cpu()
    if bf16_units is not None:
        tol = bf16_tolerance(expected, bf16_units)
    torch.testing.assert_close(actual, expected, msg=msg, **tol)


def assert_grads_match_reference(grads: dict, weights: dict, bf16_units: float | None = None, **tol) -> None:
    """Every megatron gradient (HF names) equals the reference's autograd gradient; prints
    the largest difference for the record."""
    assert grads.keys() == weights.keys()
    worst = max((grads[k].float().cpu() - p.grad).abs().max().item() for k, p in weights.items() if p.grad is not None)
    print(f"max |grad diff| = {worst:.2e}")
    for name, param in weights.items():
        expected = param.grad if param.grad is not None else torch.zeros_like(param)
        assert_close(grads[name], expected, bf16_units, **tol, msg=lambda m: f"{name}: {m}")
