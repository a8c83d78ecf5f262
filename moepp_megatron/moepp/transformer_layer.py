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

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from moepp_megatron.compat import megatron_internals as internals
from moepp_megatron.moepp.layer import MoEPPLayer


class MoEPPTransformerLayer(TransformerLayer):
    """Every layer of an MoE++ model: an MoE++ layer, or a dense layer passing the residual."""

    receives_residual: bool = False
    sends_residual: bool = False

    def __init__(self, *args, **kwargs) -> None:
        # megatron warns about the MoE++ MLP class while building the layer.
        internals.silence_unknown_mlp_type_warning()
        super().__init__(*args, **kwargs)

    def forward(self, hidden_states, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        router_residual = kwargs.pop("context", None)
        if self.receives_residual:
            hidden_states, router_residual = hidden_states.split(
                [self.config.hidden_size, self.config.moepp_num_experts], dim=-1
            )
            hidden_states = hidden_states.contiguous()
        hidden_states, _ = internals.attention_step(self, hidden_states, **kwargs)
        padding_mask = kwargs.get("padding_mask")
        if isinstance(self.mlp, MoEPPLayer):
            residual = hidden_states
            normed = internals.pre_mlp_layernorm(self, hidden_states)
            output, mlp_bias, router_residual = self.mlp(normed, router_residual, padding_mask=padding_mask)
            output = internals.post_mlp_step(self, (output, mlp_bias), residual)
        else:
            output = internals.mlp_step(self, hidden_states, kwargs.get("inference_context"), padding_mask=padding_mask)
        if self.sends_residual:
            if router_residual is None:
                # No MoE++ layer yet: a zero residual adds nothing (W_g @ 0 = 0).
                router_residual = output.new_zeros(*output.shape[:-1], self.config.moepp_num_experts)
            output = torch.cat([output, router_residual.to(output.dtype)], dim=-1)
        return output, router_residual
