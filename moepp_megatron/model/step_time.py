"""Expected time of one training step of a layout on a given GPU, from per-layer costs
measured on one GPU (``moepp-bench costs``; scripts/gpu_check.sh records them). No torch.

Measured, for one micro-batch of the run's shape (micro-batch x sequence, bf16, balanced
routing at the config's tau), on one GPU:
  layer_s       one decoder layer forward + backward: t(2 layers) - t(1 layer)
  ends_s        embedding, output layer and loss forward + backward: t(1 layer) - layer_s
  optimizer_s_per_param   the optimizer step (fp32 main parameters, Adam) per parameter

Estimated for the layout (m micro-batches per data-parallel rank, p pipeline stages, v
virtual stages, e expert-parallel size, L layers on the busiest stage):
  compute       m x (L x layer_s + ends_s) x c, c = measured GPU's peak bf16 FLOP/s over the
                target's (the layers are GEMMs at these shapes: compute-bound); TP = 1 only
  bubble        (p - 1) / v x (L x layer_s + ends_s) x c (1F1B; interleaving divides it)
  all-to-all    e > 1: per MoE layer and micro-batch, four all-to-alls (dispatch and combine,
                forward and backward) of tokens x FFN experts per token x hidden x 2 bytes,
                (e-1)/e of it leaving the GPU; at NVLink speed while the expert group fits a
                node, else the network's; megatron-core 0.16 does not overlap them
  pipeline      p > 1: an activation forward and a gradient backward per micro-batch and
                stage boundary, tokens x hidden x 2 bytes each, over the network, for m + p - 1
                slots of the schedule
  optimizer     optimizer_s_per_param x the parameters the rank updates x (measured GPU's
                memory bandwidth over the target's: the step is memory-bound)
  data parallel gradient reduce-scatter (fp32) and parameter all-gather (bf16; all-reduce
                without the distributed optimizer), (n-1)/n of the bytes per GPU at network
                speed (the group spans nodes); overlapped with backward / forward when the
                config overlaps them, so only what exceeds the compute time adds to the step

The bandwidths are data-sheet peaks, so the communication terms are lower bounds; the result
is a planning number, to be compared with the training log's step time on the cluster.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Sequence

from moepp_megatron.config.schema import ModelConfig, OptimConfig, ParallelConfig
from moepp_megatron.model.hardware import GPU, find_gpu
from moepp_megatron.model.size import expected_ffn_experts_per_token, moe_layer_pattern, rank_parameters, stage_layers

GPUS_PER_NODE = 8
BF16_BYTES = 2


@dataclass(frozen=True)
class LayerCosts:
    """What ``moepp-bench costs`` measured for one model at one micro-batch shape."""

    measured_on: GPU
    layer_s: float
    ends_s: float
    optimizer_s_per_param: float


@dataclass(frozen=True)
class StepTime:
    """Seconds per training step, by part (module docstring)."""

    compute_s: float
    bubble_s: float
    all_to_all_s: float
    pipeline_s: float
    optimizer_s: float
    data_parallel_s: float
    data_parallel_exposed_s: float  # the part not hidden behind compute

    @property
    def total_s(self) -> float:
        return (self.compute_s + self.bubble_s + self.all_to_all_s + self.pipeline_s + self.optimizer_s
                + self.data_parallel_exposed_s)


def estimate_step_time(model: ModelConfig, parallel: ParallelConfig, optim: OptimConfig, *, world_size: int,
                       micro_batch: int, num_microbatches: int, costs: LayerCosts, target: GPU) -> StepTime:
    """Raises ValueError for tensor parallelism (the costs are of whole layers on one GPU)."""
    if parallel.tensor != 1:
        raise ValueError("the step-time estimate covers TP = 1 layouts (the paper's); "
                         f"parallel.tensor is {parallel.tensor}")
    p, v, e = parallel.pipeline, parallel.virtual_pipeline or 1, parallel.expert
    compute_scale = costs.measured_on.bf16_flops / target.bf16_flops
    layers = stage_layers(model, parallel)
    stage_s = (layers * costs.layer_s + costs.ends_s) * compute_scale
    tokens = micro_batch * model.seq_length
    hidden_bytes = tokens * model.hidden_size * BF16_BYTES

    all_to_all = 0.0
    if e > 1:
        moe_layers = sum(moe_layer_pattern(model)) * layers / model.num_layers
        ffn_per_token = expected_ffn_experts_per_token(model.moe)
        bandwidth = target.nvlink if e <= GPUS_PER_NODE else target.network
        per_layer = 4 * hidden_bytes * ffn_per_token * (e - 1) / e / bandwidth
        all_to_all = num_microbatches * moe_layers * per_layer

    pipeline = (num_microbatches + p - 1) * 2 * hidden_bytes / target.network if p > 1 else 0.0

    rank = rank_parameters(model, parallel, world_size)
    distributed = optim.use_distributed_optimizer
    memory_scale = costs.measured_on.memory_bandwidth / target.memory_bandwidth
    optimizer = costs.optimizer_s_per_param * rank.updated(distributed) * memory_scale

    # fp32 gradients reduce-scattered, then bf16 parameters all-gathered (an all-reduce of
    # the fp32 gradients without the distributed optimizer): (n-1)/n of the bytes each.
    per_param = 4 + (BF16_BYTES if distributed else 4)
    data_parallel = (_ring_bytes(rank.dense * per_param, rank.data_parallel)
                     + _ring_bytes(rank.expert * per_param, rank.expert_data_parallel)) / target.network
    compute = num_microbatches * stage_s
    overlapped = parallel.overlap_grad_reduce and (parallel.overlap_param_gather or not distributed)
    exposed = max(0.0, data_parallel - compute) if overlapped else data_parallel
    return StepTime(
        compute_s=compute, bubble_s=(p - 1) / v * stage_s, all_to_all_s=all_to_all, pipeline_s=pipeline,
        optimizer_s=optimizer, data_parallel_s=data_parallel, data_parallel_exposed_s=exposed,
    )


def _ring_bytes(total: float, group: int) -> float:
    return total * (group - 1) / group


def matching_costs(records: Sequence[dict], model: ModelConfig, micro_batch: int) -> tuple[LayerCosts, str] | None:
    """From ``moepp-bench costs`` records, newest first: the first row measured on a known GPU
    for exactly ``model`` (every field but the number of layers) at this micro-batch, and
    where it comes from; None without one."""
    wanted = _shape(dataclasses.asdict(model))
    for record in records:
        gpu = find_gpu(record["device"]["name"]) if record["device"]["type"] == "cuda" else None
        row = next((r for r in record["results"] if gpu and r["micro_batch"] == micro_batch
                    and _shape(r["model"]) == wanted), None)
        if row:
            costs = LayerCosts(gpu, row["layer_ms"] / 1e3, row["ends_ms"] / 1e3, row["optimizer_ns_per_param"] / 1e9)
            return costs, f"{record['path']}, run {row['run']}"
    return None


def _shape(model: dict) -> dict:
    """The model as JSON has it (tuples become lists), without its depth."""
    return {k: v for k, v in json.loads(json.dumps(model)).items() if k != "num_layers"}
