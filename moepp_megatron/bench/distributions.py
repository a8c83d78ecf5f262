"""Routing distributions imposed on a layer: the balanced one the heterogeneous loss drives
towards (docs/MOEPP_SPEC.md section 1), or uniform over the FFN experts for vanilla MoE.

At balance each FFN expert takes tau / (tau * N_ffn + N_zc) of the top-k slots and each ZC
expert 1 / (tau * N_ffn + N_zc). :func:`balanced_assignment` turns shares into a
deterministic [T, k] assignment with exactly those counts (largest remainder rounding) and
k distinct experts per token; :func:`forced_routing` makes a router pick it by adding a
large margin to the picked experts' logits, so the router, its softmax, gates, capacity
and aux loss all still run.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from megatron.core.transformer.moe.router import TopKRouter

from moepp_megatron.moepp.router import MoEPPRouter

# Logit margin of the imposed picks: softmax(other) / softmax(picked) <= e^-20 at init scales.
MARGIN = 20.0


def balanced_shares(num_ffn: int, num_zc: int, tau: float) -> list[float]:
    """Share of all top-k slots per expert, router column order ``[FFN | ZC]``."""
    denominator = tau * num_ffn + num_zc
    return [tau / denominator] * num_ffn + [1.0 / denominator] * num_zc


def uniform_shares(num_experts: int) -> list[float]:
    return [1.0 / num_experts] * num_experts


def ideal_speedup(num_ffn: int, num_zc: int, tau: float) -> float:
    """(tau * N_ffn + N_zc) / (tau * N_ffn): vanilla FFN work over MoE++ FFN work at balance."""
    return (tau * num_ffn + num_zc) / (tau * num_ffn)


def slot_counts(num_slots: int, shares: list[float]) -> list[int]:
    """Integer slots per expert summing to ``num_slots`` (largest remainder)."""
    exact = [share * num_slots for share in shares]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(shares)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: num_slots - sum(counts)]:
        counts[i] += 1
    return counts


def balanced_assignment(num_tokens: int, topk: int, shares: list[float]) -> torch.Tensor:
    """[T, k] expert ids with ``slot_counts(T * k, shares)`` picks per expert.

    The experts' slots are laid out in one sorted row of T * k and token t takes the slots
    t, t + T, ...: a run of at most T slots (every count <= T) holds no slot twice per token.
    """
    counts = slot_counts(num_tokens * topk, shares)
    if max(counts) > num_tokens:
        raise ValueError(
            f"a share of {max(shares):.3f} of {num_tokens * topk} slots exceeds one pick per token"
        )
    slots_S = torch.repeat_interleave(torch.arange(len(shares)), torch.tensor(counts))
    return slots_S.view(topk, num_tokens).t().contiguous()


@contextlib.contextmanager
def forced_routing(router: TopKRouter, assignment_TK: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``router`` picks ``assignment_TK`` for an input of T tokens.

    The margin is added to the logits returned by ``MoEPPRouter.logits`` (MoE++) or
    ``TopKRouter.gating`` (megatron's router), shadowing the method on the instance.
    """
    name = "logits" if isinstance(router, MoEPPRouter) else "gating"
    original = getattr(router, name)
    num_experts = router.weight.shape[0] if name == "gating" else router.config.moepp_num_experts
    margin_TN = torch.zeros(assignment_TK.shape[0], num_experts).scatter_(1, assignment_TK, MARGIN)
    margin_TN = margin_TN.to(router.weight.device)

    def forced(x_SBD, *args, **kwargs):
        logits_SBN = original(x_SBD, *args, **kwargs)
        return logits_SBN + margin_TN.view(logits_SBN.shape).to(logits_SBN.dtype)

    setattr(router, name, forced)
    try:
        yield
    finally:
        delattr(router, name)
