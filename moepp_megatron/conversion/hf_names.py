"""Full (unsharded) megatron state dict <-> Hugging Face MoE++ weight names, both ways.

The mapping is a table: each rule names one megatron parameter and the Hugging Face
tensor(s) it becomes, with ``{layer}`` / ``{expert}`` placeholders. Most rules are plain
renames; two split one megatron tensor into several:

- the fused QKV weight <-> q/k/v (megatron stores it per query group:
  [q heads of the group | k | v] x groups);
- the stacked ZC parameters <-> one entry per constant expert, at expert index N_ffn + c
  (after the FFN experts, as in the released checkpoint).

Names follow docs/MOEPP_SPEC.md section 5; the dense MLP of a non-expert layer is
``model.layers.L.mlp.{up,down}_proj`` (up = [gate; up], as in the experts). The router's
first (or only) matrix is ``gate.wg.0.weight`` for the 2-layer MoE++ router and
``gate.wg.weight`` otherwise (linear MoE++ router, vanilla MoE). Parameter names are those
of megatron's local layer spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from moepp_megatron.config.schema import ModelConfig

_MEGATRON_LAYER = "decoder.layers.{layer}."
_HF_LAYER = "model.layers.{layer}."
_HF_MOE = _HF_LAYER + "mlp.moe."

# (megatron template, HF template)
_RENAMES: list[tuple[str, str]] = [
    ("embedding.word_embeddings.weight", "model.embed_tokens.weight"),
    ("decoder.final_layernorm.weight", "model.norm.weight"),
    ("output_layer.weight", "lm_head.weight"),
    (_MEGATRON_LAYER + "input_layernorm.weight", _HF_LAYER + "input_layernorm.weight"),
    (_MEGATRON_LAYER + "self_attention.linear_proj.weight", _HF_LAYER + "self_attn.o_proj.weight"),
    (_MEGATRON_LAYER + "pre_mlp_layernorm.weight", _HF_LAYER + "post_attention_layernorm.weight"),
    (_MEGATRON_LAYER + "mlp.linear_fc1.weight", _HF_LAYER + "mlp.up_proj.weight"),
    (_MEGATRON_LAYER + "mlp.linear_fc2.weight", _HF_LAYER + "mlp.down_proj.weight"),
    (_MEGATRON_LAYER + "mlp.router.gate_map", _HF_MOE + "gate.gate_map.weight"),
    (_MEGATRON_LAYER + "mlp.router.output_weight", _HF_MOE + "gate.wg.2.weight"),
    (
        _MEGATRON_LAYER + "mlp.experts.local_experts.{expert}.linear_fc1.weight",
        _HF_MOE + "experts.experts.{expert}.up_proj.weight",
    ),
    (
        _MEGATRON_LAYER + "mlp.experts.local_experts.{expert}.linear_fc2.weight",
        _HF_MOE + "experts.experts.{expert}.down_proj.weight",
    ),
]


@dataclass(frozen=True)
class Rule:
    """One megatron parameter <-> ``len(hf)`` HF tensors (``split`` / ``merge`` convert)."""

    megatron: str
    hf: tuple[str, ...]
    split: Callable[[torch.Tensor], list[torch.Tensor]] = lambda t: [t]
    merge: Callable[[list[torch.Tensor]], torch.Tensor] = lambda parts: parts[0]


def rules(model: ModelConfig) -> list[Rule]:
    """The mapping table of this model."""
    table = [Rule(megatron, (hf,)) for megatron, hf in _RENAMES]
    table.append(Rule(_MEGATRON_LAYER + "mlp.router.weight", (_HF_MOE + "gate." + _router_leaf(model),)))
    table.append(
        Rule(
            _MEGATRON_LAYER + "self_attention.linear_qkv.weight",
            tuple(_HF_LAYER + f"self_attn.{p}_proj.weight" for p in "qkv"),
            split=lambda qkv: _split_qkv(qkv, model),
            merge=lambda parts: _merge_qkv(parts, model),
        )
    )
    first = model.moe.num_ffn_experts
    constants = range(model.moe.num_constant_experts if model.moe.method == "moepp" else 0)
    leaves = (("constant_vectors", "constant"), ("constant_gates", "wg.weight")) if constants else ()
    for megatron_leaf, hf_leaf in leaves:
        table.append(
            Rule(
                _MEGATRON_LAYER + "mlp.zc_experts." + megatron_leaf,
                tuple(_HF_MOE + f"experts.experts.{first + c}.{hf_leaf}" for c in constants),
                split=lambda stacked: list(stacked.unbind(0)),
                merge=lambda parts: torch.stack(parts),
            )
        )
    return table


def _router_leaf(model: ModelConfig) -> str:
    return "wg.0.weight" if model.moe.method == "moepp" and model.moe.router == "mlp" else "wg.weight"


def _pattern(template: str) -> re.Pattern:
    escaped = re.escape(template)
    for key in ("layer", "expert"):
        escaped = escaped.replace(re.escape("{" + key + "}"), f"(?P<{key}>\\d+)")
    return re.compile(escaped)


def megatron_to_hf(state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename (and split) a full megatron state dict into HF MoE++ names.

    Raises KeyError for a megatron parameter without a rule, ValueError when two megatron
    parameters would fill the same HF tensor.
    """
    table = [(rule, _pattern(rule.megatron)) for rule in rules(model)]
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        if name.endswith("._extra_state"):
            continue
        for rule, pattern in table:
            match = pattern.fullmatch(name)
            if match:
                break
        else:
            raise KeyError(f"no Hugging Face name for megatron parameter {name!r}")
        parts = rule.split(tensor)
        for template, part in zip(rule.hf, parts, strict=True):
            hf_name = template.format(**match.groupdict())
            if hf_name in out:
                raise ValueError(f"Hugging Face tensor {hf_name!r} filled twice (second from {name!r})")
            out[hf_name] = part
    return out


def hf_to_megatron(hf_state: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of :func:`megatron_to_hf`: HF tensors -> full megatron state dict.

    Raises KeyError naming a HF tensor without a rule, or the HF tensor missing from a group
    that makes up one megatron parameter (e.g. k_proj beside q_proj and v_proj).
    """
    table = [(rule, index, _pattern(template)) for rule in rules(model) for index, template in enumerate(rule.hf)]
    groups: dict[str, tuple[Rule, dict, dict[int, torch.Tensor]]] = {}
    for name, tensor in hf_state.items():
        for rule, index, pattern in table:
            match = pattern.fullmatch(name)
            if match:
                break
        else:
            raise KeyError(f"no megatron parameter for Hugging Face tensor {name!r}")
        fields = match.groupdict()
        megatron_name = rule.megatron.format(**fields)
        groups.setdefault(megatron_name, (rule, fields, {}))[2][index] = tensor
    out = {}
    for megatron_name, (rule, fields, parts) in groups.items():
        missing = [rule.hf[i].format(**fields) for i in range(len(rule.hf)) if i not in parts]
        if missing:
            raise KeyError(f"Hugging Face tensor(s) {missing} missing (needed for megatron {megatron_name!r})")
        out[megatron_name] = rule.merge([parts[i] for i in range(len(rule.hf))])
    return out


def _qkv_sizes(model: ModelConfig) -> tuple[int, int, int]:
    groups = model.num_query_groups or model.num_attention_heads
    return groups, model.num_attention_heads // groups, model.head_dim


def _split_qkv(qkv: torch.Tensor, model: ModelConfig) -> list[torch.Tensor]:
    groups, heads_per_group, head_dim = _qkv_sizes(model)
    grouped = qkv.view(groups, (heads_per_group + 2) * head_dim, -1)
    q, k, v = grouped.split([heads_per_group * head_dim, head_dim, head_dim], dim=1)
    return [t.reshape(-1, qkv.shape[-1]) for t in (q, k, v)]


def _merge_qkv(parts: list[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    groups, heads_per_group, head_dim = _qkv_sizes(model)
    q, k, v = parts
    hidden = q.shape[-1]
    grouped = torch.cat(
        [q.reshape(groups, heads_per_group * head_dim, hidden), k.reshape(groups, head_dim, hidden),
         v.reshape(groups, head_dim, hidden)],
        dim=1,
    )
    return grouped.reshape(-1, hidden)
