"""Full (unsharded) megatron state dict <-> Hugging Face MoE++ weight names.

The mapping is a table of name patterns plus three transforms: the fused QKV weight
splits into q/k/v, and the stacked ZC parameters split into one entry per constant expert
(expert index N_ffn + c, after the FFN experts). Names follow MOEPP_SPEC.md section 5; the
dense MLP of a non-expert layer is ``model.layers.L.mlp.{up,down}_proj`` (up = [gate; up],
as in the experts). Parameter names are those of megatron's local layer spec.
"""

from __future__ import annotations

import re
from typing import Callable

import torch

from moepp_megatron.config.schema import ModelConfig

_LAYER = r"decoder\.layers\.(\d+)\."

# (megatron pattern, HF template); {0} is the layer index, {1} the expert index.
_RENAMES: list[tuple[str, str]] = [
    (r"embedding\.word_embeddings\.weight", "model.embed_tokens.weight"),
    (r"decoder\.final_layernorm\.weight", "model.norm.weight"),
    (r"output_layer\.weight", "lm_head.weight"),
    (_LAYER + r"input_layernorm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (_LAYER + r"self_attention\.linear_proj\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    (_LAYER + r"pre_mlp_layernorm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (_LAYER + r"mlp\.linear_fc1\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    (_LAYER + r"mlp\.linear_fc2\.weight", "model.layers.{0}.mlp.down_proj.weight"),
    (_LAYER + r"mlp\.router\.gate_map", "model.layers.{0}.mlp.moe.gate.gate_map.weight"),
    (_LAYER + r"mlp\.router\.output_weight", "model.layers.{0}.mlp.moe.gate.wg.2.weight"),
    (
        _LAYER + r"mlp\.experts\.local_experts\.(\d+)\.linear_fc1\.weight",
        "model.layers.{0}.mlp.moe.experts.experts.{1}.up_proj.weight",
    ),
    (
        _LAYER + r"mlp\.experts\.local_experts\.(\d+)\.linear_fc2\.weight",
        "model.layers.{0}.mlp.moe.experts.experts.{1}.down_proj.weight",
    ),
]
_QKV = _LAYER + r"self_attention\.linear_qkv\.weight"
_ROUTER = _LAYER + r"mlp\.router\.weight"
_CONSTANT_VECTORS = _LAYER + r"mlp\.zc_experts\.constant_vectors"
_CONSTANT_GATES = _LAYER + r"mlp\.zc_experts\.constant_gates"


def megatron_to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and split) a full megatron state dict into HF MoE++ names."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("._extra_state"):
            continue
        out.update(_convert_one(name, tensor, model))
    return out


def _convert_one(name: str, tensor: torch.Tensor, model: ModelConfig) -> dict[str, torch.Tensor]:
    for pattern, template in _RENAMES:
        match = re.fullmatch(pattern, name)
        if match:
            return {template.format(*match.groups()): tensor}
    special: list[tuple[str, Callable]] = [
        (_QKV, lambda layer: _split_qkv(tensor, layer, model)),
        (_ROUTER, lambda layer: {_router_name(layer, model): tensor}),
        (_CONSTANT_VECTORS, lambda layer: _per_constant(tensor, layer, model, "constant")),
        (_CONSTANT_GATES, lambda layer: _per_constant(tensor, layer, model, "wg.weight")),
    ]
    for pattern, convert in special:
        match = re.fullmatch(pattern, name)
        if match:
            return convert(match.group(1))
    raise KeyError(f"no Hugging Face name for megatron parameter {name!r}")


def _router_name(layer: str, model: ModelConfig) -> str:
    suffix = "wg.0.weight" if model.moe.method == "moepp" and model.moe.router == "mlp" else "wg.weight"
    return f"model.layers.{layer}.mlp.moe.gate.{suffix}"


def _per_constant(tensor: torch.Tensor, layer: str, model: ModelConfig, leaf: str) -> dict:
    first = model.moe.num_ffn_experts
    return {
        f"model.layers.{layer}.mlp.moe.experts.experts.{first + c}.{leaf}": tensor[c]
        for c in range(tensor.shape[0])
    }


def _qkv_sizes(model: ModelConfig) -> tuple[int, int, int]:
    groups = model.num_query_groups or model.num_attention_heads
    return groups, model.num_attention_heads // groups, model.head_dim


def _split_qkv(qkv: torch.Tensor, layer: str, model: ModelConfig) -> dict[str, torch.Tensor]:
    """megatron stores QKV per query group: [q heads of the group | k | v] x groups."""
    groups, heads_per_group, head_dim = _qkv_sizes(model)
    grouped = qkv.view(groups, (heads_per_group + 2) * head_dim, -1)
    q, k, v = grouped.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
    prefix = f"model.layers.{layer}.self_attn"
    return {
        f"{prefix}.q_proj.weight": q.reshape(-1, qkv.shape[-1]),
        f"{prefix}.k_proj.weight": k.reshape(-1, qkv.shape[-1]),
        f"{prefix}.v_proj.weight": v.reshape(-1, qkv.shape[-1]),
    }
