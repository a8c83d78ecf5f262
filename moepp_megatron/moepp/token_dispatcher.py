"""Token dispatcher adjustments for tokens that pick fewer than k FFN experts."""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher


class MoEPPAlltoAllTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """AlltoAll dispatcher whose dropless output size is the number of FFN assignments.

    Stock megatron assumes every token has exactly k FFN picks and sizes the permutation
    output as T * k (token_dispatcher.py, dropless branch of ``preprocess``); the fused TE
    permute then writes past the real rows. Under MoE++ some picks are ZC experts, so the
    size is ``routing_map.sum()``, exactly as the stock capacity-factor branch computes it.
    """

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        tokens_per_local_expert = super().preprocess(routing_map)
        if not self.drop_and_pad:
            self.num_out_tokens = routing_map.sum()
            # A dynamic size must reach the host before the first permutation.
            self._maybe_update_cuda_sync_point("before_permutation_1")
        return tokens_per_local_expert
