"""One expert layer (MoE++ or vanilla MoE) built from a model preset, plus its inputs.

Both methods come from the same builder (``transformer_config`` + ``decoder_block_spec``),
so they share N_ffn, shapes, expert modules (SequentialMLP or grouped GEMM) and dtype;
vanilla is the preset with ``model.moe.method=vanilla``.
"""

from __future__ import annotations

import dataclasses
import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler
from megatron.core.transformer.spec_utils import build_module

from moepp_megatron.bench.distributions import balanced_assignment, balanced_shares, uniform_shares
from moepp_megatron.bench.presets import PRESETS
from moepp_megatron.config.loader import load_config
from moepp_megatron.config.packaged import CONFIGS_DIR
from moepp_megatron.config.schema import ModelConfig, ParallelConfig
from moepp_megatron.model.builder import transformer_config, transformer_engine_available
from moepp_megatron.model.specs import decoder_block_spec


def preset_model(name: str, overrides: list[str] = ()) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(PRESETS)}")
    return load_config(CONFIGS_DIR / PRESETS[name], overrides).model


def with_moe(model: ModelConfig, **fields) -> ModelConfig:
    return dataclasses.replace(model, moe=dataclasses.replace(model.moe, **fields))


def build_expert_layer(model: ModelConfig, device: torch.device) -> MoELayer:
    """The first expert layer of ``model``, in training mode, bf16 on GPU, fp32 on CPU.

    Needs megatron's parallel state (``initialize_parallel``)."""
    cpu = device.type == "cpu"
    config = transformer_config(model, ParallelConfig(cpu_mode=cpu), bf16=not cpu)
    spec = decoder_block_spec(config, use_transformer_engine=transformer_engine_available())
    layer = build_module(spec.layer_specs[0].submodules.mlp, config=config)
    layer.set_layer_number(1)
    # megatron scales the aux-loss gradient by this; the schedules set it in training.
    MoEAuxLossAutoScaler.set_loss_scale(torch.ones((), device=device))
    return layer.to(device).train()


def layer_input(model: ModelConfig, num_tokens: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    """[S, B, D] unit-variance hidden states (what the pre-MLP RMSNorm hands the layer)."""
    seq = min(num_tokens, model.seq_length)
    if num_tokens % seq:
        raise ValueError(f"--tokens {num_tokens} must be a multiple of the sequence length {seq}")
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(seq, num_tokens // seq, model.hidden_size, generator=generator)
    return x.to(device=device, dtype=torch.float32 if device.type == "cpu" else torch.bfloat16)


def balanced_picks(model: ModelConfig, num_tokens: int) -> torch.Tensor:
    """[T, k] picks at the balance of the model's loss: MoE++ at its tau, vanilla uniform."""
    moe = model.moe
    if moe.method == "vanilla":
        shares = uniform_shares(moe.num_ffn_experts)
    else:
        shares = balanced_shares(moe.num_ffn_experts, moe.num_zc_experts, moe.tau)
    return balanced_assignment(num_tokens, moe.topk, shares)


def run_layer(layer: MoELayer, x_SBD: torch.Tensor) -> torch.Tensor:
    """The layer's output (MoE++ layers also return their router logits)."""
    return layer(x_SBD)[0]


def routed_ffn_assignments(layer: MoELayer, x_SBD: torch.Tensor) -> tuple[int, int]:
    """(tokens, kept FFN assignments) of one forward: what the FFN experts actually compute."""
    seen = {}

    def record(module, args, output):
        routing_map_TN = output[1]
        seen["tokens"] = routing_map_TN.shape[0]
        seen["ffn"] = int(routing_map_TN[:, : layer.config.num_moe_experts].sum())

    handle = layer.router.register_forward_hook(record)
    try:
        with torch.no_grad():
            run_layer(layer, x_SBD)
    finally:
        handle.remove()
    return seen["tokens"], seen["ffn"]
