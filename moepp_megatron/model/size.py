"""Model arithmetic from the config alone (no torch, no megatron): parameter counts, FLOPs
per token and an estimate of the memory one training rank needs. ``moepp-train --dry-run``
and the start-up block print them, the training log turns FLOPs into TFLOP/s; the parameter
counts are tested against the parameters of built models.

Symbols: D hidden size, q = heads * head_dim, g = query groups * head_dim, S sequence length,
F expert FFN size, V vocabulary, N router width (FFN + ZC experts), e FFN experts per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moepp_megatron.config.schema import ModelConfig, MoEConfig, ParallelConfig

ROUTER_MLP_EXPANSION = 8  # the MLP router's hidden width is 8N (moepp/router.py)


def moe_layer_pattern(model: ModelConfig) -> list[bool]:
    """Which layers have experts: megatron's moe_layer_freq (an int f: layer i when
    i % f == 0; a list: one 0/1 per layer)."""
    freq = model.moe.layer_freq
    if isinstance(freq, int):
        return [i % freq == 0 for i in range(model.num_layers)]
    return [bool(x) for x in freq]


def expected_ffn_experts_per_token(moe: MoEConfig) -> float:
    """FFN experts per token when routing is balanced as the load-balance loss asks:
    k for vanilla MoE, k * tau*N_ffn / (tau*N_ffn + N_zc) for MoE++ (paper section 3)."""
    if moe.method == "vanilla" or moe.num_zc_experts == 0:
        return float(moe.topk)
    ffn = moe.tau * moe.num_ffn_experts
    return moe.topk * ffn / (ffn + moe.num_zc_experts)


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    # Per token: every non-expert weight plus the FFN experts a token is expected to use.
    active: float
    embedding: int  # input embedding + output layer (untied)
    expert: int  # all FFN expert weights


def _attention(model: ModelConfig) -> int:
    d = model.hidden_size
    q = model.num_attention_heads * model.head_dim
    g = (model.num_query_groups or model.num_attention_heads) * model.head_dim
    return d * (q + 2 * g) + q * d + 2 * d  # QKV, output projection, the two RMSNorms


def _router(model: ModelConfig) -> int:
    moe, d = model.moe, model.hidden_size
    if moe.method == "vanilla":
        return moe.num_ffn_experts * d
    n = moe.num_ffn_experts + moe.num_zc_experts
    width = ROUTER_MLP_EXPANSION * n if moe.router == "mlp" else n
    router = width * d + (n * width if moe.router == "mlp" else 0) + n * n  # + gate_map W_g
    return router + 3 * d * moe.num_constant_experts  # constant vector and its 2 x D gate


def _expert(model: ModelConfig) -> int:
    return 3 * model.hidden_size * model.moe.ffn_hidden_size  # SwiGLU: three D x F weights


def parameter_counts(model: ModelConfig) -> ParameterCounts:
    """Parameters of the whole model (all pipeline stages, unsharded), with the vocabulary
    as ``model.vocab_size`` says (the trainer pads it first)."""
    pattern = moe_layer_pattern(model)
    moe_layers = sum(pattern)
    dense_layers = len(pattern) - moe_layers
    embedding = 2 * model.vocab_size * model.hidden_size
    expert = moe_layers * model.moe.num_ffn_experts * _expert(model)
    shared = (
        model.num_layers * _attention(model)
        + moe_layers * _router(model)
        + dense_layers * 3 * model.hidden_size * model.ffn_hidden_size
        + model.hidden_size  # final norm
        + embedding
    )
    active = shared + moe_layers * expected_ffn_experts_per_token(model.moe) * _expert(model)
    return ParameterCounts(total=shared + expert, active=active, embedding=embedding, expert=expert)


def forward_flops_per_token(model: ModelConfig, ffn_experts_per_token: float | None = None) -> float:
    """Model FLOPs of one token's forward pass (training: 3x, 4x with full recompute).

    per layer: attention 2*D*(q + 2g) + 2*q*D + 4*S*q (QKV, output, QK^T and AV; no causal
               discount) + router 2*D*N (MLP router: 2*D*8N + 2*8N*N; gating residual
               + 2*N*N) + experts e * 6*D*F + constant experts 4*D each
    model:     layers * per layer + LM head 2*D*V

    ``ffn_experts_per_token``: e as measured; by default the expected value at balance.
    """
    moe = model.moe
    d, s = model.hidden_size, model.seq_length
    q = model.num_attention_heads * model.head_dim
    g = (model.num_query_groups or model.num_attention_heads) * model.head_dim
    n = moe.num_ffn_experts + moe.num_zc_experts
    e = expected_ffn_experts_per_token(moe) if ffn_experts_per_token is None else ffn_experts_per_token
    attention = 2 * d * (q + 2 * g) + 2 * q * d + 4 * s * q
    if moe.method == "moepp" and moe.router == "mlp":
        router = 2 * d * 8 * n + 2 * 8 * n * n
    else:
        router = 2 * d * n
    if moe.method == "moepp":
        router += 2 * n * n * moe.gating_residual + 4 * d * moe.num_constant_experts
    pattern = moe_layer_pattern(model)
    moe_layers = sum(pattern)
    dense = (len(pattern) - moe_layers) * 6 * d * model.ffn_hidden_size
    return (
        model.num_layers * attention + moe_layers * (router + e * 6 * d * moe.ffn_hidden_size)
        + dense + 2 * d * model.vocab_size
    )


def training_flops_per_token(model: ModelConfig, parallel: ParallelConfig,
                             ffn_experts_per_token: float | None = None) -> float:
    """Forward + backward (2x forward), plus one more forward under full recompute."""
    passes = 4 if parallel.recompute == "full" else 3
    return passes * forward_flops_per_token(model, ffn_experts_per_token)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on the busiest rank (first pipeline stage) during a training step."""

    weights: int  # parameters and their gradients
    optimizer: int  # fp32 main parameters and Adam moments
    activations: int  # kept for backward, micro-batches in flight, logits

    @property
    def total(self) -> int:
        return self.weights + self.optimizer + self.activations


def stage_layers(model: ModelConfig, parallel: ParallelConfig) -> int:
    """Layers of the largest pipeline stage."""
    pp, first, last = parallel.pipeline, parallel.first_stage_layers, parallel.last_stage_layers
    rest = model.num_layers - (first or 0) - (last or 0)
    middle = pp - (first is not None) - (last is not None)
    even = math.ceil(rest / middle) if middle > 0 else 0
    return max(first or 0, last or 0, even)


def training_memory(model: ModelConfig, parallel: ParallelConfig, *, world_size: int, micro_batch: int,
                    num_microbatches: int, bf16: bool, distributed_optimizer: bool) -> MemoryEstimate:
    """An estimate, not a measurement (no allocator overhead, CUDA context or buffers):

    weights:     parameters (2 bytes in bf16, else 4) + fp32 gradients (4), sharded by TP,
                 PP and (experts) EP; the stage with the embedding or output layer
    optimizer:   fp32 main parameters (bf16 only) + Adam's two moments, divided by the
                 data-parallel size (experts: expert-data-parallel) with the distributed
                 optimizer
    activations: per token and layer what backward keeps, in the activation dtype: norm
                 inputs, QKV, attention output, expert inputs and SwiGLU intermediates for
                 e FFN experts per token (only the layer input where recomputed), for
                 min(PP, micro-batches) micro-batches in flight; plus fp32 logits
    """
    rank = rank_parameters(model, parallel, world_size)
    param_bytes = 2 if bf16 else 4
    weights = (param_bytes + 4) * (rank.dense + rank.expert)
    moments = (4 if bf16 else 0) + 8
    optimizer = moments * rank.updated(distributed_optimizer)
    activations = _activation_bytes(model, parallel, micro_batch, stage_layers(model, parallel), param_bytes)
    in_flight = min(parallel.pipeline, num_microbatches)
    return MemoryEstimate(int(weights), int(optimizer), int(activations * in_flight))


@dataclass(frozen=True)
class RankParameters:
    """The parameters one rank of the busiest pipeline stage holds."""

    dense: float  # everything but the FFN experts: sharded by TP (and PP)
    expert: float  # FFN experts: sharded by EP x TP (and PP)
    data_parallel: int
    expert_data_parallel: int

    def updated(self, distributed_optimizer: bool) -> float:
        """Parameters whose optimizer state the rank keeps and updates: with the distributed
        optimizer, its shard over the (expert-)data-parallel group."""
        if not distributed_optimizer:
            return self.dense + self.expert
        return self.dense / self.data_parallel + self.expert / self.expert_data_parallel


def rank_parameters(model: ModelConfig, parallel: ParallelConfig, world_size: int) -> RankParameters:
    """Half the embedding parameters (input embedding or output layer) count on the stage."""
    tp, pp, ep = parallel.tensor, parallel.pipeline, parallel.expert
    share = stage_layers(model, parallel) / model.num_layers
    counts = parameter_counts(model)
    dense = ((counts.total - counts.expert - counts.embedding) * share + counts.embedding / 2) / tp
    return RankParameters(dense=dense, expert=counts.expert * share / (ep * tp),
                          data_parallel=world_size // (tp * pp), expert_data_parallel=world_size // (tp * ep * pp))


def _activation_bytes(model: ModelConfig, parallel: ParallelConfig, micro_batch: int, layers: int,
                      elt: int) -> float:
    tp, d = parallel.tensor, model.hidden_size
    tokens = micro_batch * model.seq_length
    q = model.num_attention_heads * model.head_dim
    g = (model.num_query_groups or model.num_attention_heads) * model.head_dim
    e = expected_ffn_experts_per_token(model.moe)
    attention = 2 * d + (q + 2 * g + 2 * q) / tp
    experts = d + e * (d + 3 * model.moe.ffn_hidden_size / tp)
    recompute = parallel.recompute
    if recompute == "full":
        per_layer = d
    elif recompute == "selective" and "moe" in parallel.recompute_modules:
        per_layer = attention + d
    else:
        per_layer = attention + experts
    logits = 4 * tokens * model.vocab_size / tp
    return elt * tokens * per_layer * layers + logits


def format_count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


def format_bytes(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"
