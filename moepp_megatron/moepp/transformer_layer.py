"""A TransformerLayer that threads the router logits from one MoE++ layer to the next.

megatron's TransformerBlock passes ``context`` from each layer to the next, through the
full-recompute path as well (as an argument of the checkpointed function), and GPT never
uses it otherwise (cross-attention is an IdentityOp). MoE++ layers take the previous
MoE++ layer's logits from it and return their own; dense layers return it unchanged.
"""

from __future__ import annotations

import logging

from megatron.core.transformer.transformer_layer import TransformerLayer


class _KnownMLPTypeFilter(logging.Filter):
    """megatron 0.16.1 recognises MoE layers by identity (``module in (MoELayer, ...)``) and
    logs "Unknown MLP type" for our subclass, once per layer. The fallback it announces
    (default process groups) is what MoE++ uses, so the message is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Unknown MLP type")


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_KnownMLPTypeFilter())


class MoEPPTransformerLayer(TransformerLayer):
    def forward(self, *args, **kwargs):
        kwargs.pop("dynamic_inference_decode_only", None)
        router_residual = kwargs.pop("context", None)
        hidden_states, _ = self._forward_attention(*args, **kwargs)
        residual = hidden_states
        normed = self._forward_pre_mlp_layernorm(hidden_states)
        output, mlp_bias, router_logits = self.mlp(
            normed, router_residual, padding_mask=kwargs.get("padding_mask")
        )
        return self._forward_post_mlp((output, mlp_bias), residual), router_logits
