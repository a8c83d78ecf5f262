"""A run worked out before any process group exists: the whole config checked at once, and
what ``moepp-train --dry-run`` and the start-up block print.

``plan_run`` is called in the launching process (``scripts/pretrain.sh`` runs ``moepp-train
--check`` before torchrun) and again by every rank before it touches a process group, so a
mistake costs seconds and prints one message naming the field, instead of a traceback per
rank after the start-up of N processes. Besides our own cross-section checks (layout against
the world size, batch against micro-batches and data parallelism, the LR schedule against the
run's length, data files, the tokenizer, the device) it builds megatron's
``TransformerConfig``, whose own checks then run here too, with megatron's names for the
fields translated to ours.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from moepp_megatron.config.schema import OptimConfig, RunConfig
from moepp_megatron.model import size
from moepp_megatron.model.hardware import GPU
from moepp_megatron.model.step_time import StepTime, estimate_step_time, matching_costs


class ConfigError(ValueError):
    """The run config cannot work; the message names the field(s) to change."""


@dataclass
class BatchGeometry:
    global_batch_size: int  # sequences per optimizer step
    micro_batch_size: int
    num_microbatches: int  # per data-parallel rank
    seq_length: int
    train_iters: int


def batch_geometry(config: RunConfig, data_parallel_size: int) -> BatchGeometry:
    t, seq = config.training, config.model.seq_length
    if t.global_batch_tokens % seq:
        raise ConfigError(
            f"training.global_batch_tokens={t.global_batch_tokens} is not a multiple of "
            f"model.seq_length={seq}"
        )
    global_batch = t.global_batch_tokens // seq
    per_step = t.micro_batch_size * data_parallel_size
    if global_batch % per_step:
        raise ConfigError(
            f"training.global_batch_tokens gives {global_batch} sequences per step, not a "
            f"multiple of micro_batch_size ({t.micro_batch_size}) x data-parallel size "
            f"({data_parallel_size})"
        )
    if t.train_iters is not None:
        if t.train_iters < 1:
            raise ConfigError(f"training.train_iters must be >= 1, got {t.train_iters}")
        train_iters = t.train_iters
    else:
        train_iters = t.train_tokens // t.global_batch_tokens
        if train_iters < 1:
            raise ConfigError(
                f"training.train_tokens={t.train_tokens} is smaller than one global batch "
                f"(training.global_batch_tokens={t.global_batch_tokens})"
            )
    return BatchGeometry(global_batch, t.micro_batch_size, global_batch // per_step, seq, train_iters)


def check_schedule(optim: OptimConfig, train_iters: int) -> None:
    """What megatron's OptimizerParamScheduler asserts, said with our field names."""
    decay_iters = optim.decay_iters or train_iters
    if optim.warmup_iters >= decay_iters:
        raise ConfigError(
            f"optim.warmup_iters={optim.warmup_iters} must be smaller than the decay length "
            f"({'optim.decay_iters' if optim.decay_iters else 'training iterations'} = {decay_iters})"
        )
    if optim.warmup_init_lr > optim.lr:
        raise ConfigError(
            f"optim.warmup_init_lr={optim.warmup_init_lr:g} is above optim.lr={optim.lr:g}: warmup "
            "rises from warmup_init_lr to lr"
        )


@dataclass(frozen=True)
class Layout:
    world_size: int
    tensor: int
    pipeline: int
    data: int
    expert: int
    expert_data: int


@dataclass(frozen=True)
class SourcePlan:
    prefix: str
    share: float  # of the training blend (normalised weight)
    tokens: int  # in the source's training split
    epochs: float  # passes over those tokens in the whole run
    held_out: bool = False  # a data.valid_sources entry


@dataclass(frozen=True)
class RunPlan:
    """The resolved config (CPU mode from the environment, data cache under the run
    directory, the tokenizer's padded vocabulary) and what follows from it."""

    config: RunConfig
    layout: Layout
    geometry: BatchGeometry
    tokenizer_pieces: int
    params: size.ParameterCounts
    training_flops_per_token: float
    memory: size.MemoryEstimate
    sources: list[SourcePlan]
    resume_iteration: int | None  # the newest saved checkpoint (verified when loading)


def resolve(config: RunConfig) -> RunConfig:
    """What the environment and the run directory decide: MOEPP_CPU_MODE=1 means
    parallel.cpu_mode, megatron's index cache goes under the run directory."""
    from moepp_megatron.compat.cpu import cpu_mode_requested

    if cpu_mode_requested() and not config.parallel.cpu_mode:
        config = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, cpu_mode=True))
    if config.data.cache_dir is None:
        cache = str(Path(config.run_dir) / "data_cache")
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, cache_dir=cache))
    return config


def smallest_world_size(config: RunConfig) -> int:
    p = config.parallel
    model_parallel = p.tensor * p.pipeline
    return math.lcm(model_parallel, p.tensor * p.expert * p.pipeline)


def plan_run(config: RunConfig, world_size: int) -> RunPlan:
    """Check ``config`` for ``world_size`` processes and work out the run; raises
    :class:`ConfigError` (or the data / device errors) naming what to change."""
    config = resolve(config)
    # Cheapest first: a mistake in the arithmetic is reported before torch is imported.
    layout = run_layout(config, world_size)
    geometry = batch_geometry(config, layout.data)
    check_schedule(config.optim, geometry.train_iters)
    _check_device(config)
    tokenizer_pieces, vocab = _vocabulary(config)
    config = dataclasses.replace(config, model=dataclasses.replace(config.model, vocab_size=vocab))
    _check_with_megatron(config)
    sources = _sources(config, geometry)
    return RunPlan(
        config=config, layout=layout, geometry=geometry, tokenizer_pieces=tokenizer_pieces,
        params=size.parameter_counts(config.model),
        training_flops_per_token=size.training_flops_per_token(config.model, config.parallel),
        memory=run_memory(config, world_size, geometry),
        sources=sources, resume_iteration=_resume_iteration(config),
    )


def run_memory(config: RunConfig, world_size: int, geometry: BatchGeometry) -> size.MemoryEstimate:
    """The memory estimate of one rank of the run (model/size.py)."""
    return size.training_memory(
        config.model, config.parallel, world_size=world_size, micro_batch=geometry.micro_batch_size,
        num_microbatches=geometry.num_microbatches, bf16=config.bf16,
        distributed_optimizer=config.optim.use_distributed_optimizer,
    )


def _check_device(config: RunConfig) -> None:
    import torch

    from moepp_megatron.parallel.layout import NoCudaError

    cuda = torch.cuda.is_available()
    if config.parallel.cpu_mode and cuda:
        raise ConfigError(
            "parallel.cpu_mode (or MOEPP_CPU_MODE=1) on a machine with CUDA: CPU mode is for "
            "machines without a GPU; unset it"
        )
    if not config.parallel.cpu_mode and not cuda:
        raise NoCudaError()


def run_layout(config: RunConfig, world_size: int) -> Layout:
    """The process groups' sizes of the run on ``world_size`` processes; ConfigError if it does not fit."""
    from moepp_megatron.parallel.layout import check_sizes

    p, moe = config.parallel, config.model.moe
    try:
        check_sizes(world_size, p.tensor, p.pipeline, p.expert, p.virtual_pipeline, None)
    except ValueError as e:
        raise ConfigError(f"parallel (tensor={p.tensor}, pipeline={p.pipeline}, expert={p.expert}) "
                          f"on {world_size} processes: {e}") from None
    if p.overlap_param_gather and not config.optim.use_distributed_optimizer:
        raise ConfigError("parallel.overlap_param_gather needs optim.use_distributed_optimizer=true (only the "
                          "distributed optimizer gathers parameters)")
    if moe.num_ffn_experts % p.expert:
        raise ConfigError(f"model.moe.num_ffn_experts={moe.num_ffn_experts} is not divisible by "
                          f"parallel.expert={p.expert}")
    return Layout(world_size, p.tensor, p.pipeline, world_size // (p.tensor * p.pipeline), p.expert,
                  world_size // (p.tensor * p.expert * p.pipeline))


def _vocabulary(config: RunConfig) -> tuple[int, int]:
    """The tokenizer's pieces and the embedding rows megatron pads them to."""
    from moepp_megatron.data.tokenizer import load_tokenizer, padded_vocab_size

    if not config.data.tokenizer_model:
        raise ConfigError("data.tokenizer_model is not set: give the sentencepiece .model file "
                          "(moepp-tokenizer train makes one from your corpus)")
    try:
        pieces = load_tokenizer(config.data.tokenizer_model).vocab_size
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.tokenizer_model: {e}") from None
    return pieces, padded_vocab_size(pieces, config.parallel.tensor, config.data.vocab_size_divisible_by)


# megatron's TransformerConfig fields in its messages -> ours.
MEGATRON_NAMES = {
    "num_attention_heads": "model.num_attention_heads",
    "num_query_groups": "model.num_query_groups",
    "tensor_model_parallel_size": "parallel.tensor",
    "virtual_pipeline_model_parallel_size": "parallel.virtual_pipeline",
    "pipeline_model_parallel_size": "parallel.pipeline",
    "num_layers_in_first_pipeline_stage": "parallel.first_stage_layers",
    "num_layers_in_last_pipeline_stage": "parallel.last_stage_layers",
    "expert_model_parallel_size": "parallel.expert",
    "moe_layer_freq": "model.moe.layer_freq",
    "moe_router_topk": "model.moe.topk",
    "num_moe_experts": "model.moe.num_ffn_experts",
    "recompute_granularity": "parallel.recompute",
    "recompute_modules": "parallel.recompute_modules",
    "sequence_parallel": "parallel.sequence_parallel",
    "num_layers": "model.num_layers",
}


def _check_with_megatron(config: RunConfig) -> None:
    """Build megatron's TransformerConfig (and ours on top), so that its __post_init__
    checks run now; their messages name megatron's fields, translated here."""
    import re

    from moepp_megatron.model.builder import transformer_config

    try:
        transformer_config(config.model, config.parallel, bf16=config.bf16,
                           deterministic=config.training.deterministic)
    except (ValueError, AssertionError, TypeError) as e:
        message = str(e) or type(e).__name__
        for theirs, ours in MEGATRON_NAMES.items():
            message = re.sub(rf"(?<![\w.]){theirs}(?!\w)", ours, message)
        raise ConfigError(f"model / parallel: {message}") from None


def _sources(config: RunConfig, geometry: BatchGeometry) -> list[SourcePlan]:
    from moepp_megatron.data.blend import check_sources, resolve_sources

    try:
        sources = resolve_sources(config.data)
    except (OSError, ValueError) as e:
        raise ConfigError(str(e)) from None
    tokens = check_sources(sources)
    held_out = len(config.data.valid_sources)
    train_sources = sources[: len(sources) - held_out]
    train_share = 1.0 if held_out else _train_fraction(config.data.split)
    total_weight = sum(s.weight for s in train_sources)
    run_tokens = geometry.train_iters * geometry.global_batch_size * geometry.seq_length
    plans = []
    for i, (source, count) in enumerate(zip(sources, tokens)):
        if i >= len(train_sources):
            plans.append(SourcePlan(source.prefix, 0.0, count, 0.0, held_out=True))
            continue
        share = source.weight / total_weight
        split_tokens = int(count * train_share)
        plans.append(SourcePlan(source.prefix, share, split_tokens,
                                run_tokens * share / split_tokens if split_tokens else math.inf))
    return plans


def _train_fraction(split: str) -> float:
    try:
        parts = [float(x) for x in split.replace("/", ",").split(",")]
    except ValueError:
        raise ConfigError(f"data.split={split!r}: expected three numbers like '98,1,1'") from None
    if len(parts) != 3 or min(parts) < 0 or not sum(parts) > 0 or parts[0] == 0:
        raise ConfigError(f"data.split={split!r}: expected three non-negative numbers, the first > 0")
    return parts[0] / sum(parts)


def _resume_iteration(config: RunConfig) -> int | None:
    from moepp_megatron.checkpoint.checkpointer import saved_iterations

    if not config.checkpoint.resume:
        return None
    if config.checkpoint.load_iteration is not None:
        return config.checkpoint.load_iteration
    saved = saved_iterations(Path(config.run_dir) / "checkpoints")
    return max(saved) if saved else None


def describe(plan: RunPlan) -> str:
    """The start-up block (and ``--dry-run``'s output)."""
    c, lay, g, p = plan.config, plan.layout, plan.geometry, plan.params
    moe = c.model.moe
    experts = f"{moe.num_ffn_experts} FFN experts"
    if moe.method == "moepp":
        experts += (f" + {moe.num_zero_experts} zero / {moe.num_copy_experts} copy / "
                    f"{moe.num_constant_experts} constant, tau {moe.tau:g}")
    capacity = f"capacity factor {moe.capacity_factor:g}" if moe.capacity_factor else "dropless"
    run_tokens = g.train_iters * g.global_batch_size * g.seq_length
    m = plan.memory
    lines = [
        f"model      {'MoE++' if moe.method == 'moepp' else 'vanilla MoE'}: {c.model.num_layers} layers, "
        f"hidden {c.model.hidden_size}, {experts}, top-{moe.topk}, {capacity}",
        f"parameters {size.format_count(p.total)} total, {size.format_count(p.active)} active per token "
        f"({size.expected_ffn_experts_per_token(moe):.2f} FFN experts per token at balance); "
        f"vocabulary {plan.tokenizer_pieces} pieces, {c.model.vocab_size} rows",
        f"layout     {lay.world_size} processes = TP {lay.tensor} x PP {lay.pipeline} x DP {lay.data}; "
        f"EP {lay.expert} (expert DP {lay.expert_data})"
        + (f", virtual PP {c.parallel.virtual_pipeline}" if c.parallel.virtual_pipeline else "")
        + (", CPU mode (gloo)" if c.parallel.cpu_mode else "")
        + (", bf16" if c.bf16 else ", fp32"),
        f"batch      {g.global_batch_size} x {g.seq_length} tokens per step; {g.num_microbatches} "
        f"micro-batch(es) of {g.micro_batch_size} per DP rank; {g.train_iters} steps = "
        f"{size.format_count(run_tokens)} tokens",
        f"compute    {plan.training_flops_per_token / 1e9:.3g} GFLOP per token (training, at balance), "
        f"{plan.training_flops_per_token * run_tokens:.3g} FLOP in all",
        f"memory     ~{size.format_bytes(m.total)} per rank (weights+grads {size.format_bytes(m.weights)}, "
        f"optimizer {size.format_bytes(m.optimizer)}, activations {size.format_bytes(m.activations)}; "
        "an estimate, see model/size.py)",
        f"data       tokenizer {c.data.tokenizer_model}; {sum(not s.held_out for s in plan.sources)} "
        "training source(s):",
    ]
    for s in plan.sources:
        if s.held_out:
            lines.append(f"             validation  {size.format_count(s.tokens):>8} tokens  {s.prefix}")
        else:
            lines.append(f"             {s.share:6.1%}  {size.format_count(s.tokens):>8} tokens  "
                         f"{s.epochs:6.2f} epochs  {s.prefix}")
    resume = ("new run" if plan.resume_iteration is None
              else f"resumes from iteration {plan.resume_iteration}, verified when loaded")
    lines.append(f"run dir    {Path(c.run_dir).absolute()} ({resume})")
    return "\n".join(lines)


def estimate_run_step(config: RunConfig, world_size: int, geometry: BatchGeometry, target: GPU,
                      costs_records: list[dict]) -> tuple[StepTime, str] | str:
    """The expected step time of the run on ``world_size`` ``target`` GPUs and where its
    per-layer costs come from; or why there is none."""
    found = matching_costs(costs_records, config.model, geometry.micro_batch_size)
    if found is None:
        return (f"no per-layer costs measured on a GPU for this model at micro-batch {geometry.micro_batch_size} x "
                f"{geometry.seq_length} (`moepp-bench costs` on a GPU measures the paper runs; "
                "scripts/gpu_check.sh runs it)")
    costs, source = found
    try:
        step = estimate_step_time(config.model, config.parallel, config.optim, world_size=world_size,
                                  micro_batch=geometry.micro_batch_size, num_microbatches=geometry.num_microbatches,
                                  costs=costs, target=target)
    except ValueError as e:
        return str(e)
    return step, f"per-layer costs measured on {costs.measured_on.name} ({source})"


def run_rate(step: StepTime, geometry: BatchGeometry) -> tuple[float, float]:
    """Tokens per second at ``step``'s pace, and days for the whole run."""
    return geometry.global_batch_size * geometry.seq_length / step.total_s, step.total_s * geometry.train_iters / 86400


def describe_step_time(plan: RunPlan, target: GPU, costs_records: list[dict]) -> str:
    """``--dry-run``'s step-time line."""
    g = plan.geometry
    estimate = estimate_run_step(plan.config, plan.layout.world_size, g, target, costs_records)
    if isinstance(estimate, str):
        return f"step time  not estimated: {estimate}"
    step, source = estimate
    tokens_per_s, days = run_rate(step, g)
    hidden = f", {step.data_parallel_s - step.data_parallel_exposed_s:.3f} overlapped" if step.data_parallel_s else ""
    return "\n".join([
        f"step time  ~{step.total_s:.2f} s on {plan.layout.world_size} x {target.name}: compute {step.compute_s:.3f} "
        f"+ pipeline bubble {step.bubble_s:.3f} + all-to-all {step.all_to_all_s:.3f} + pipeline sends "
        f"{step.pipeline_s:.3f} + optimizer {step.optimizer_s:.3f} + data parallel {step.data_parallel_exposed_s:.3f}"
        f"{hidden}; {size.format_count(tokens_per_s)} tokens/s, {days:.1f} days for the run",
        f"           from {source}; an estimate (model/step_time.py)",
    ])
