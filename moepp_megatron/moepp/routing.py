"""MoE++ routing math as pure functions of the router logits (no megatron, no state).

Shapes: T tokens, N = N_ffn + N_zc experts, columns ``[FFN | constant | copy | zero]``.

Host-device synchronisation: none. Capacities are Python ints computed from the token
count (a host-known shape); everything else is tensor ops with shapes fixed by [T, N] (no
``.item()``, ``.tolist()``, ``nonzero`` or boolean indexing), which is also what lets
:func:`route` compile with ``fullgraph=True`` (see ``compiled.py``).
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def route(
    logits_TN: torch.Tensor,
    topk: int,
    variant: str,
    num_zero: int,
    capacity_N: Optional[torch.Tensor],
    drop_policy: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`topk_gates`, then :func:`drop_over_capacity` unless ``capacity_N`` is None
    (dropless). Returns ``(probs_TN, gates_TN, picked_TN, kept_TN)``."""
    probs_TN, gates_TN, picked_TN = topk_gates(logits_TN, topk, variant, num_zero)
    if capacity_N is None:
        return probs_TN, gates_TN, picked_TN, picked_TN
    gates_TN, kept_TN = drop_over_capacity(gates_TN, picked_TN, capacity_N, drop_policy)
    return probs_TN, gates_TN, picked_TN, kept_TN


def topk_gates(
    logits_TN: torch.Tensor, topk: int, variant: str, num_zero: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Softmax over all N experts, pick the top-k, and weight the picks.

    Returns ``(probs_TN, gates_TN, picked_TN)``: the full softmax (for the load-balance
    loss), the per-expert gates (0 where not picked) and the boolean pick map.

    - ``paper``:   gate = softmax probability of the picked expert, no renormalisation.
    - ``release``: the zero experts' gates are set to 0 and the remaining picked gates are
      divided by their sum, so an FFN expert picked with the zero expert gets weight 1.
    """
    probs_TN = torch.softmax(logits_TN.float(), dim=-1)
    _, top_indices_TK = torch.topk(probs_TN, k=topk, dim=-1)
    picked_TN = torch.zeros_like(probs_TN, dtype=torch.bool).scatter(1, top_indices_TK, True)
    gates_TN = probs_TN * picked_TN
    if variant == "release":
        num_experts = logits_TN.shape[-1]
        gates_TN = gates_TN.masked_fill(_zero_expert_columns(num_experts, num_zero, gates_TN.device), 0.0)
        # A token whose only picks are zero experts keeps all-zero gates (0 / tiny = 0).
        gates_TN = gates_TN / gates_TN.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    elif variant != "paper":
        raise ValueError(f"unknown MoE++ routing variant {variant!r}")
    return probs_TN, gates_TN, picked_TN


def _zero_expert_columns(num_experts: int, num_zero: int, device: torch.device) -> torch.Tensor:
    mask = torch.zeros(num_experts, dtype=torch.bool, device=device)
    mask[num_experts - num_zero :] = True
    return mask


def heterogeneous_capacity(
    num_tokens: int, topk: int, num_ffn: int, num_zc: int, tau: float, gamma: float
) -> tuple[int, int]:
    """Eq. 8: (capacity of each FFN expert, capacity of each ZC expert), rounded up.

    With T = num_tokens * topk slots: FFN gets gamma * tau * T / (tau * N_ffn + N_zc) and ZC
    gets gamma * T / (tau * N_ffn + N_zc), so ZC experts may take 1/tau times more tokens.
    """
    slots = num_tokens * topk
    denominator = tau * num_ffn + num_zc
    return math.ceil(gamma * tau * slots / denominator), math.ceil(gamma * slots / denominator)


def drop_over_capacity(
    gates_TN: torch.Tensor, picked_TN: torch.Tensor, capacity_N: torch.Tensor, policy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep at most ``capacity_N[e]`` assignments per expert; drop the rest (gate -> 0).

    ``policy`` is megatron's ``moe_token_drop_policy``: "probs" keeps an expert's
    highest-gate assignments, "position" its earliest tokens. Dropped gates are not
    renormalised: that slot contributes nothing and the token flows on in the residual.
    """
    num_tokens = gates_TN.shape[0]
    if policy == "probs":
        priority_TN = gates_TN
    elif policy == "position":
        positions_T1 = torch.arange(num_tokens, 0, -1, device=gates_TN.device, dtype=gates_TN.dtype)
        priority_TN = positions_T1.unsqueeze(1).expand_as(gates_TN)
    else:
        raise ValueError(f"unknown moe_token_drop_policy {policy!r}")
    # Picked assignments always outrank unpicked ones (release zero-expert gates are 0).
    priority_TN = torch.where(picked_TN, priority_TN, torch.full_like(priority_TN, -1.0))
    order_TN = torch.argsort(priority_TN, dim=0, descending=True, stable=True)
    rank_TN = torch.empty_like(order_TN)
    rank_TN.scatter_(0, order_TN, torch.arange(num_tokens, device=gates_TN.device).unsqueeze(1).expand_as(order_TN))
    kept_TN = picked_TN & (rank_TN < capacity_N.unsqueeze(0))
    return gates_TN * kept_TN, kept_TN


def load_balance_weights(num_ffn: int, num_zc: int, tau: float, device=None) -> torch.Tensor:
    """eta of Eq. 7: 1 for FFN experts, tau for ZC experts."""
    eta_N = torch.ones(num_ffn + num_zc, device=device)
    eta_N[num_ffn:] = tau
    return eta_N
