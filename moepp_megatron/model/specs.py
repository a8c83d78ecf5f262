"""Layer specs: megatron's GPT decoder specs with the MoE++ modules swapped in."""

from __future__ import annotations

import copy

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.moe.experts import GroupedMLP
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from moepp_megatron.model.grouped_experts import TorchGroupedMLP
from moepp_megatron.moepp.config import MoEPPTransformerConfig
from moepp_megatron.moepp.counters import CountingTopKRouter
from moepp_megatron.moepp.layer import MoEPPLayer
from moepp_megatron.moepp.router import MoEPPRouter
from moepp_megatron.moepp.transformer_layer import MoEPPTransformerLayer


def decoder_block_spec(
    config: TransformerConfig, use_transformer_engine: bool, vp_stage=None, pp_rank=None
) -> TransformerBlockSubmodules:
    """The decoder spec for this pipeline stage; expert layers become MoE++ layers when
    ``config`` is an :class:`MoEPPTransformerConfig` (else the stock vanilla MoE stays)."""
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
    )
    if config.moe_grouped_gemm and not use_transformer_engine:
        # Without TE megatron picks its legacy GroupedMLP (grouped_gemm package, bf16 only).
        block.layer_specs = [_with_torch_grouped_mm(spec) for spec in block.layer_specs]
    # The list holds references to the same spec objects: copy before editing.
    if not isinstance(config, MoEPPTransformerConfig):
        block.layer_specs = [_with_counting_router(spec) for spec in block.layer_specs]
        return block
    block.layer_specs = [_as_moepp(spec) for spec in block.layer_specs]
    return block


def _with_counting_router(layer_spec):
    # Vanilla MoE: the stock router, counting its routing for the statistics.
    if layer_spec.submodules.mlp.module is not MoELayer:
        return layer_spec
    layer_spec = copy.deepcopy(layer_spec)
    layer_spec.submodules.mlp.submodules.router = CountingTopKRouter
    return layer_spec


def _as_moepp(layer_spec):
    # Dense layers too: they carry the router residual across pipeline stage boundaries.
    layer_spec = copy.deepcopy(layer_spec)
    layer_spec.module = MoEPPTransformerLayer
    if layer_spec.submodules.mlp.module is MoELayer:
        layer_spec.submodules.mlp.module = MoEPPLayer
        layer_spec.submodules.mlp.submodules.router = MoEPPRouter
    return layer_spec


def _with_torch_grouped_mm(layer_spec):
    mlp = layer_spec.submodules.mlp
    if mlp.module is not MoELayer or mlp.submodules.experts.module is not GroupedMLP:
        return layer_spec
    layer_spec = copy.deepcopy(layer_spec)
    layer_spec.submodules.mlp.submodules.experts.module = TorchGroupedMLP
    return layer_spec
