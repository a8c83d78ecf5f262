"""Routing statistics of MoE++ and vanilla MoE layers, for the training log.

Each counting router (:mod:`counters`) counts, during training forwards, the tokens it
routed and the assignments per expert before (picked) and after (kept) capacity dropping.
Reading the statistics sums those counters over ``reduce_group`` (the ranks that saw
different tokens: data parallel, and tensor parallel under sequence parallelism) and
resets them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from moepp_megatron.compat.megatron_internals import reduce_and_clear_aux_losses
from moepp_megatron.moepp.counters import RoutingCounters


@dataclass
class RoutingShares:
    """One side of a layer's routing: what the router picked (before capacity dropping) or
    what was kept (after it). The same fields for both, so each can be read against the other."""

    # Average number of FFN experts per token.
    ffn_experts_per_token: float
    # Share of all top-k slots (tokens * k) taken by each ZC expert type (none for vanilla).
    zc_share: dict[str, float]
    # Share of all top-k slots taken by each expert, in router column order (kept shares
    # sum to 1 - dropped fraction; compare with an expert's capacity as a share of slots).
    expert_load: list[float]
    # max / mean load over the FFN experts (1.0 = perfectly balanced).
    ffn_load_imbalance: float


@dataclass
class LayerRoutingStats:
    layer: int  # megatron's layer_number: 1-based, over the whole model
    tokens: int
    picked: RoutingShares
    kept: RoutingShares
    # Fraction of picked assignments dropped by the capacity limit.
    dropped_fraction: float


def routing_statistics_group(config) -> dist.ProcessGroup:
    """The ranks that routed different tokens of the same layers: data parallel, and tensor
    parallel too under sequence parallelism (without it, TP ranks route the same tokens)."""
    if config.sequence_parallel:
        return parallel_state.get_tensor_and_data_parallel_group(with_context_parallel=True)
    return parallel_state.get_data_parallel_group(with_context_parallel=True)


def collect_routing_statistics(
    model: torch.nn.Module,
    reduce_group: dist.ProcessGroup | None = None,
    pipeline_group: dist.ProcessGroup | None = None,
    reset: bool = True,
) -> list[LayerRoutingStats]:
    """Statistics of every MoE++ layer in ``model`` since the last reset, by layer number;
    with ``pipeline_group``, every stage's layers are gathered to every stage."""
    stats = []
    for router in (m for m in model.modules() if isinstance(m, RoutingCounters)):
        counts = torch.cat([c.view(-1) for c in router.counters()])
        if reduce_group is not None:
            dist.all_reduce(counts, group=reduce_group)
        if reset:
            for buffer in router.counters():
                buffer.zero_()
        stats.append(_summarise(router, counts.cpu().double()))
    if pipeline_group is not None and pipeline_group.size() > 1:
        gathered: list = [None] * pipeline_group.size()
        dist.all_gather_object(gathered, stats, group=pipeline_group)
        stats = [s for stage in gathered for s in stage]
    return sorted(stats, key=lambda s: s.layer)


def _summarise(router: RoutingCounters, counts: torch.Tensor) -> LayerRoutingStats:
    num_experts = (counts.numel() - 1) // 2
    tokens = counts[0].item()
    picked, kept = counts[1 : 1 + num_experts], counts[1 + num_experts :]
    return LayerRoutingStats(
        layer=router.layer_number,
        tokens=int(tokens),
        picked=_shares(router, picked, tokens),
        kept=_shares(router, kept, tokens),
        dropped_fraction=((picked - kept).sum() / picked.sum().clamp_min(1.0)).item(),
    )


def _shares(router: RoutingCounters, assignments: torch.Tensor, tokens: float) -> RoutingShares:
    """``assignments``: count per expert (router column order) over ``tokens`` tokens."""
    num_ffn = router.num_ffn_experts
    slots = max(tokens * router.topk, 1.0)
    zc_share, start = {}, num_ffn
    for kind, count in router.zc_experts:
        zc_share[kind] = assignments[start : start + count].sum().item() / slots
        start += count
    ffn = assignments[:num_ffn]
    return RoutingShares(
        ffn_experts_per_token=ffn.sum().item() / max(tokens, 1.0),
        zc_share=zc_share,
        expert_load=(assignments / slots).tolist(),
        ffn_load_imbalance=(ffn.max() / ffn.mean().clamp_min(1e-9)).item(),
    )


def collect_aux_losses(config, track_names: Sequence[str] | None = None) -> dict[str, list[float]]:
    """Per-layer aux losses (summed over the micro-batches since the last call), reduced
    like megatron reduces them (sum over TP/CP shares, mean over DP, gathered over PP) and
    then cleared. A pipeline stage without MoE layers contributes zeros instead of
    skipping the collective, which would hang the stages that have them."""
    if track_names is None:
        track_names = ["load_balancing_loss"] + (["z_loss"] if config.moe_z_loss_coeff else [])
    return reduce_and_clear_aux_losses(track_names, config.num_layers)
