"""Token dispatcher adjustments for tokens that pick fewer than k FFN experts."""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from moepp_megatron.compat.megatron_internals import set_permutation_output_size


class MoEPPAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """AlltoAll dispatcher whose dropless output size is the number of FFN assignments.

    Stock megatron assumes every token has exactly k FFN picks and sizes the permutation
    output as T * k (token_dispatcher.py, dropless branch of ``preprocess``); the fused TE
    permute then writes past the real rows. Under MoE++ some picks are ZC experts, so the
    size is ``routing_map.sum()``, exactly as the stock capacity-factor branch computes it.
    """

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        tokens_per_local_expert = super().preprocess(routing_map)
        # Padded to capacity, the stock size (capacity * experts) is right.
        if not self.config.moe_pad_expert_input_to_capacity:
            set_permutation_output_size(self, routing_map.sum())
        return tokens_per_local_expert
