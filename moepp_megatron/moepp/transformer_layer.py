"""A TransformerLayer that threads the router logits from one MoE++ layer to the next.

megatron's TransformerBlock passes ``context`` from each layer to the next, through the
full-recompute path as well (as an argument of the checkpointed function), and GPT never
uses it otherwise (cross-attention is an IdentityOp). MoE++ layers take the previous
MoE++ layer's logits from it and return their own; dense layers return it unchanged.

Across pipeline stages only one [s, b, h] tensor travels, so the last layer of a stage
(or virtual stage) that is not the model's last sends ``cat([h, logits], -1)`` and the
first layer of the next one splits it (``sends_residual`` / ``receives_residual``, set by
the model builder). The logits then cross the boundary in the pipeline dtype.
"""

from __future__ import annotations

import logging

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from moepp_megatron.moepp.layer import MoEPPLayer


class _KnownMLPTypeFilter(logging.Filter):
    """megatron 0.16.1 recognises MoE layers by identity (``module in (MoELayer, ...)``) and
    logs "Unknown MLP type" for our subclass, once per layer. The fallback it announces
    (default process groups) is what MoE++ uses, so the message is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_KnownMLPTypeFilter())


class MoEPPTransformerLayer(TransformerLayer):
    """Every layer of an MoE++ model: an MoE++ layer, or a dense layer passing the residual."""

    receives_residual: bool = False
    sends_residual: bool = False

    def forward(self, hidden_states, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        router_residual = kwargs.pop("context", None)
        if self.receives_residual:
            hidden_states, router_residual = hidden_states.split(
                [self.config.hidden_size, self.config.moepp_num_experts], dim=-1
            )
            hidden_states = hidden_states.contiguous()
        hidden_states, _ = self._forward_attention(hidden_states, **kwargs)
        padding_mask = kwargs.get("padding_mask")
        if isinstance(self.mlp, MoEPPLayer):
            residual = hidden_states
            normed = self._forward_pre_mlp_layernorm(hidden_states)
            output, mlp_bias, router_residual = self.mlp(normed, router_residual, padding_mask=padding_mask)
            output = self._forward_post_mlp((output, mlp_bias), residual)
        else:
            output = self._forward_mlp(hidden_states, kwargs.get("inference_context"), padding_mask=padding_mask)
        if self.sends_residual:
            if router_residual is None:
                # No MoE++ layer yet: a zero residual adds nothing (W_g @ 0 = 0).
                router_residual = output.new_zeros(*output.shape[:-1], self.config.moepp_num_experts)
            output = torch.cat([output, router_residual.to(output.dtype)], dim=-1)
        return output, router_residual
