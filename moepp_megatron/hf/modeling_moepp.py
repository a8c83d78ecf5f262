"""Hugging Face implementation of MoE++ (model_type "MoE++", and "moepp-megatron" for what the
released format cannot express): a LLaMA decoder whose FFNs are MoE++ layers (FFN experts plus
zero / copy / constant experts behind one router, with gating residuals between layers), or
vanilla MoE layers.

Self-contained (imports only torch and transformers): this file is copied next to converted
checkpoints and loaded with ``trust_remote_code=True``. Weight names are those of the released
MoE++-7B checkpoint. Inference is dropless (no expert capacity), as in the released code.

Conventions: router math in fp32; expert order ``[FFN | constant | copy | zero]``; the
previous MoE layer's router logits travel to the next one within one forward pass (dense
layers pass them through); attention is LLaMA's (rotate-half RoPE, softmax in fp32); left
padding is supported through ``attention_mask`` (positions are counted from the mask).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from .configuration_moepp import MoEPPConfig, MoEPPMegatronConfig

try:  # transformers >= 5: init helpers that leave loaded weights alone
    from transformers import initialization as _init
except ImportError:  # transformers 4
    _init = nn.init

# transformers 5 calls the KV cache "cache", transformers 4 "past_key_values".
_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
ROUTER_MLP_EXPANSION = 8


# ----------------------------------------------------------------------------- backbone


class MoEPPRMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_float = x.float()
        normed = x_float * torch.rsqrt(x_float.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.float()).to(x.dtype)


def _inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


class MoEPPRotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.register_buffer("inv_freq", _inverse_frequencies(head_dim, theta), persistent=False)

    @torch.no_grad()
    def forward(self, position_ids_BS: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs_BSH = position_ids_BS.float()[..., None] * self.inv_freq.float()
        emb_BSD = torch.cat([freqs_BSH, freqs_BSH], dim=-1)
        return emb_BSD.cos(), emb_BSD.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def _apply_rope(x_BHSD: torch.Tensor, cos_BSD: torch.Tensor, sin_BSD: torch.Tensor) -> torch.Tensor:
    cos, sin = cos_BSD.unsqueeze(1), sin_BSD.unsqueeze(1)
    return (x_BHSD.float() * cos + _rotate_half(x_BHSD.float()) * sin).to(x_BHSD.dtype)


class MoEPPAttention(nn.Module):
    """LLaMA self-attention (no biases, grouped-query heads), softmax in fp32."""

    def __init__(self, config: MoEPPConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        d = config.hidden_size
        self.q_proj = nn.Linear(d, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, d, bias=False)

    def forward(self, x_BSD, rope, mask_B1SK, cache: Optional[Cache]) -> torch.Tensor:
        b, s, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        groups = self.num_heads // self.num_kv_heads
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        probs = torch.softmax(scores.float() + mask_B1SK, dim=-1).to(v.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.o_proj(out)


class MoEPPDenseMLP(nn.Module):
    """SwiGLU; ``up_proj`` rows are [gate half; up half]."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, scale_T1: Optional[torch.Tensor] = None) -> torch.Tensor:
        gate, up = self.up_proj(x).chunk(2, dim=-1)
        hidden = F.silu(gate) * up
        if scale_T1 is not None:
            # The routing gate scales the expert's hidden activation, as megatron's experts do.
            hidden = hidden * scale_T1.to(hidden.dtype)
        return self.down_proj(hidden)


# ----------------------------------------------------------------------------- experts


class MoEPPConstantExpert(nn.Module):
    """E(x) = a1 * x + a2 * v, [a1, a2] = softmax(W_c x)."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.constant = nn.Parameter(torch.empty(hidden_size))
        self.wg = nn.Linear(hidden_size, 2, bias=False)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        x = x_TD.float()
        mix_T2 = torch.softmax(F.linear(x, self.wg.weight.float()), dim=-1)
        return mix_T2[:, :1] * x + mix_T2[:, 1:] * self.constant.float()


class MoEPPCopyExpert(nn.Module):
    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return x_TD.float()


class MoEPPZeroExpert(nn.Module):
    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return x_TD.new_zeros(x_TD.shape, dtype=torch.float32)


class MoEPPExperts(nn.Module):
    """``experts[e]``: FFN experts, then constant, copy and zero experts."""

    def __init__(self, config: MoEPPConfig) -> None:
        super().__init__()
        d = config.hidden_size
        experts: list[nn.Module] = [
            MoEPPDenseMLP(d, config.intermediate_size) for _ in range(config.num_ffn_experts)
        ]
        if not config.is_vanilla:
            experts += [MoEPPConstantExpert(d) for _ in range(config.moepp_num_constant_experts)]
            experts += [MoEPPCopyExpert() for _ in range(config.moepp_num_copy_experts)]
            experts += [MoEPPZeroExpert() for _ in range(config.moepp_num_zero_experts)]
        self.experts = nn.ModuleList(experts)


class MoEPPGate(nn.Module):
    """Router: ``wg`` is Linear(D, N) or Linear(D, 8N) -> tanh -> Linear(8N, N) (no biases);
    ``gate_map`` (W_g, [N, N]) adds the previous MoE layer's logits (MoE++ only)."""

    def __init__(self, config: MoEPPConfig) -> None:
        super().__init__()
        n, d = config.num_router_experts, config.hidden_size
        if config.moe_2layer_gate:
            hidden = ROUTER_MLP_EXPANSION * n
            self.wg = nn.Sequential(nn.Linear(d, hidden, bias=False), nn.Tanh(), nn.Linear(hidden, n, bias=False))
        else:
            self.wg = nn.Linear(d, n, bias=False)
        self.gate_map = None if config.is_vanilla else nn.Linear(n, n, bias=False)
        self.use_residual = config.moepp_gating_residual and not config.is_vanilla

    def forward(self, x_TD: torch.Tensor, residual_TN: Optional[torch.Tensor]) -> torch.Tensor:
        x = x_TD.float()
        if isinstance(self.wg, nn.Sequential):
            logits_TN = F.linear(torch.tanh(F.linear(x, self.wg[0].weight.float())), self.wg[2].weight.float())
        else:
            logits_TN = F.linear(x, self.wg.weight.float())
        if self.use_residual and residual_TN is not None:
            logits_TN = logits_TN + F.linear(residual_TN.float(), self.gate_map.weight.float())
        return logits_TN


def route(logits_TN: torch.Tensor, config: MoEPPConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(gates [T, k], expert indices [T, k]) of each token's top-k picks, dropless."""
    k = config.moepp_topk
    if config.is_vanilla and k > 1:
        top_logits_TK, index_TK = torch.topk(logits_TN, k, dim=-1)
        return torch.softmax(top_logits_TK, dim=-1), index_TK
    probs_TN = torch.softmax(logits_TN, dim=-1)
    gates_TK, index_TK = torch.topk(probs_TN, k, dim=-1)
    if not config.is_vanilla and config.moepp_routing == "release":
        first_zero = config.num_router_experts - config.moepp_num_zero_experts
        gates_TK = gates_TK.masked_fill(index_TK >= first_zero, 0.0)
        # A token whose picks are all zero experts keeps all-zero gates.
        gates_TK = gates_TK / gates_TK.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return gates_TK, index_TK


class MoEPPSparseMoE(nn.Module):
    def __init__(self, config: MoEPPConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = MoEPPGate(config)
        self.experts = MoEPPExperts(config)

    def forward(self, x_TD: torch.Tensor, residual_TN: Optional[torch.Tensor]):
        """Returns (output [T, D], this layer's router logits [T, N])."""
        c = self.config
        logits_TN = self.gate(x_TD, residual_TN)
        gates_TK, index_TK = route(logits_TN, c)
        # The release routing feeds every expert topk * x (the router sees x).
        expert_input_TD = x_TD * c.moepp_topk if (not c.is_vanilla and c.moepp_routing == "release") else x_TD
        ffn_out_TD = torch.zeros_like(x_TD, dtype=torch.float32)
        zc_out_TD = torch.zeros_like(ffn_out_TD)
        for e, expert in enumerate(self.experts.experts):
            token_T, slot_T = torch.nonzero(index_TK == e, as_tuple=True)
            if token_T.numel() == 0:
                continue
            gate_T1 = gates_TK[token_T, slot_T].unsqueeze(-1)
            if e < c.num_ffn_experts:
                out = expert(expert_input_TD[token_T], gate_T1).float()
                ffn_out_TD.index_put_((token_T,), out, accumulate=True)
            else:
                zc_out_TD.index_put_((token_T,), gate_T1 * expert(expert_input_TD[token_T]), accumulate=True)
        return (ffn_out_TD + zc_out_TD).to(x_TD.dtype), logits_TN


class MoEPPMoEBlock(nn.Module):
    """``mlp`` of an MoE layer (weights under ``mlp.moe.*``)."""

    def __init__(self, config: MoEPPConfig) -> None:
        super().__init__()
        self.moe = MoEPPSparseMoE(config)

    def forward(self, x_BSD: torch.Tensor, residual_BSN: Optional[torch.Tensor]):
        b, s, d = x_BSD.shape
        residual_TN = residual_BSN.reshape(b * s, -1) if residual_BSN is not None else None
        out_TD, logits_TN = self.moe(x_BSD.reshape(b * s, d), residual_TN)
        return out_TD.view(b, s, d), logits_TN.view(b, s, -1)


class MoEPPDecoderLayer(nn.Module):
    def __init__(self, config: MoEPPConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = MoEPPRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MoEPPAttention(config, layer_idx)
        self.post_attention_layernorm = MoEPPRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp = (
            MoEPPMoEBlock(config) if self.is_moe else MoEPPDenseMLP(config.hidden_size, config.dense_intermediate_size)
        )

    def forward(self, h_BSD, router_residual, rope, mask_B1SK, cache):
        """Returns (hidden states, the router logits for the next MoE layer)."""
        h_BSD = h_BSD + self.self_attn(self.input_layernorm(h_BSD), rope, mask_B1SK, cache)
        normed = self.post_attention_layernorm(h_BSD)
        if self.is_moe:
            out, router_residual = self.mlp(normed, router_residual)
        else:
            out = self.mlp(normed)
        return h_BSD + out, router_residual


# ----------------------------------------------------------------------------- models


class MoEPPPreTrainedModel(PreTrainedModel):
    config_class = MoEPPConfig
    base_model_prefix = "model"
    _no_split_modules = ["MoEPPDecoderLayer"]
    _supports_cache_class = True

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            _init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, MoEPPRMSNorm):
            _init.ones_(module.weight)
        elif isinstance(module, MoEPPConstantExpert):
            _init.normal_(module.constant, mean=0.0, std=std)
        elif isinstance(module, MoEPPRotaryEmbedding) and hasattr(_init, "copy_"):
            # transformers 5 builds the model on the meta device; a non-persistent buffer is
            # not in the checkpoint and must be computed again here.
            _init.copy_(module.inv_freq, _inverse_frequencies(self.config.head_dim, self.config.rope_theta))


def _padding_mask_to_positions(attention_mask_BK: torch.Tensor, query_len: int) -> torch.Tensor:
    """Left padding: positions count the real tokens; padding gets position 0."""
    positions = attention_mask_BK.long().cumsum(-1) - 1
    positions = positions.masked_fill(attention_mask_BK == 0, 0)
    return positions[:, -query_len:]


def _attention_bias(attention_mask_BK, batch: int, query_len: int, past_len: int, device) -> torch.Tensor:
    """Additive fp32 mask [B, 1, S, K]: causal, plus padding keys from the 2-D attention_mask.

    Masked entries get the most negative float (not -inf), so a padding query that sees no key
    gets a harmless uniform row instead of NaN.
    """
    key_len = past_len + query_len
    query_pos = torch.arange(past_len, key_len, device=device)[:, None]
    allowed_SK = torch.arange(key_len, device=device)[None, :] <= query_pos
    allowed_BSK = allowed_SK.expand(batch, -1, -1)
    if attention_mask_BK is not None:
        allowed_BSK = allowed_BSK & attention_mask_BK[:, None, -key_len:].bool()
    bias = torch.zeros(allowed_BSK.shape, dtype=torch.float32, device=device)
    return bias.masked_fill(~allowed_BSK, torch.finfo(torch.float32).min).unsqueeze(1)


class MoEPPModel(MoEPPPreTrainedModel):
    def __init__(self, config: MoEPPConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(MoEPPDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = MoEPPRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = MoEPPRotaryEmbedding(config.head_dim, config.rope_theta)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        use_cache: Optional[bool] = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if attention_mask is not None and attention_mask.dim() != 2:
            raise ValueError("attention_mask must be 2-D [batch, past + new tokens] (1 = token, 0 = padding)")
        cache = cache if cache is not None else past_key_values
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if use_cache and cache is None:
            cache = DynamicCache()
        if not use_cache:
            cache = None
        h = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        batch, query_len = h.shape[:2]
        past_len = cache.get_seq_length() if cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = _padding_mask_to_positions(attention_mask, query_len)
            else:
                position_ids = torch.arange(past_len, past_len + query_len, device=h.device).expand(batch, -1)
        mask = _attention_bias(attention_mask, batch, query_len, past_len, h.device)
        rope = self.rotary_emb(position_ids)
        router_residual = None
        for layer in self.layers:
            h, router_residual = layer(h, router_residual, rope, mask, cache)
        return BaseModelOutputWithPast(last_hidden_state=self.norm(h), **{_CACHE_FIELD: cache})


class MoEPPForCausalLM(MoEPPPreTrainedModel, GenerationMixin):
    def __init__(self, config: MoEPPConfig) -> None:
        super().__init__(config)
        self.model = MoEPPModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def forward(
        self,
        input_ids: Optional[torch.LongTensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        position_ids: Optional[torch.LongTensor] = None,
        cache: Optional[Cache] = None,
        past_key_values: Optional[Cache] = None,
        inputs_embeds: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        use_cache: Optional[bool] = None,
        logits_to_keep: int = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
            cache=cache if cache is not None else past_key_values, inputs_embeds=inputs_embeds,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100
            )
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{_CACHE_FIELD: getattr(out, _CACHE_FIELD)})


# The same model for model_type "moepp-megatron": transformers pairs each model class with one
# config class.


class MoEPPMegatronModel(MoEPPModel):
    config_class = MoEPPMegatronConfig


class MoEPPMegatronForCausalLM(MoEPPForCausalLM):
    config_class = MoEPPMegatronConfig


__all__ = [
    "MoEPPForCausalLM", "MoEPPModel", "MoEPPPreTrainedModel", "MoEPPMegatronForCausalLM", "MoEPPMegatronModel",
]
