"""Routing counters for the training log, shared by the MoE++ router and the vanilla one.

A counting router adds, during training forwards, the tokens it routed and the assignments
per expert before (picked) and after (kept) capacity dropping to int64 buffers on the
device (no host sync; exact under bf16 casts). :mod:`statistics` reads and resets them.
``CountingTopKRouter`` is megatron's stock ``TopKRouter`` with these counters, so vanilla
runs report their loads and drops like MoE++ runs.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.transformer.moe.router import TopKRouter


class RoutingCounters:
    """Mixin for ``torch.nn.Module`` routers. ``zc_experts`` is ``(kind, count)`` in router
    column order after the ``num_ffn_experts`` FFN columns."""

    def init_counters(self, num_ffn_experts: int, zc_experts: tuple[tuple[str, int], ...] = ()) -> None:
        self.num_ffn_experts = num_ffn_experts
        self.zc_experts = zc_experts
        num_experts = num_ffn_experts + sum(count for _, count in zc_experts)
        self.register_buffer("picked_per_expert", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("kept_per_expert", torch.zeros(num_experts, dtype=torch.long), persistent=False)
        self.register_buffer("routed_tokens", torch.zeros((), dtype=torch.long), persistent=False)

    @torch.no_grad()
    def count(self, picked_TN: torch.Tensor, kept_TN: torch.Tensor, padding_mask: Optional[torch.Tensor]) -> None:
        if padding_mask is not None:
            valid_T1 = ~padding_mask.reshape(-1, 1)
            picked_TN, kept_TN = picked_TN & valid_T1, kept_TN & valid_T1
            self.routed_tokens += valid_T1.sum()
        else:
            self.routed_tokens += picked_TN.shape[0]
        self.picked_per_expert += picked_TN.sum(dim=0)
        self.kept_per_expert += kept_TN.sum(dim=0)

    def counters(self) -> list[torch.Tensor]:
        return [self.routed_tokens, self.picked_per_expert, self.kept_per_expert]


class CountingTopKRouter(RoutingCounters, TopKRouter):
    """megatron's TopKRouter (vanilla MoE) that also counts its routing."""

    def __init__(self, config, pg_collection=None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        self.init_counters(config.num_moe_experts)

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None, **kwargs):
        probs_TN, kept_TN = super().routing(logits, padding_mask=padding_mask, **kwargs)
        if self.training and torch.is_grad_enabled():
            # The picks before dropping: the top-k of the logits (every score function
            # megatron offers is monotonic, so they order experts alike).
            logits_TN = logits.reshape(-1, self.config.num_moe_experts)
            picked_TN = torch.zeros_like(kept_TN).scatter_(1, logits_TN.topk(self.topk, dim=-1).indices, True)
            self.count(picked_TN, kept_TN, padding_mask)
        return probs_TN, kept_TN
