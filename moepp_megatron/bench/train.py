"""End-to-end training throughput: tokens/s, peak memory and MFU of full training steps.

A step is what the trainer does: megatron's forward-backward schedule over the
micro-batches (DDP, ``finalize_model_grads``), then the optimizer and LR-scheduler step,
on random tokens. Each method runs in its own fresh process, so the peak memory (GPU:
``torch.cuda.max_memory_allocated`` over the timed steps; CPU: the process's peak RSS) is
its own.

Model FLOPs per token: :func:`moepp_megatron.model.size.forward_flops_per_token` with e the
FFN experts that processed a token (measured: k for vanilla MoE without drops, fewer for
MoE++); training counts 3x (backward = 2x forward; no recompute).

MFU = training FLOPs per step / step time / peak dense bf16 FLOP/s of the GPU (table
below); no MFU on CPU.

Routing: ``balanced`` (default) imposes, in every layer, the balance the trained models
reach (MoE++ at its tau, vanilla uniform; ``distributions.py``), so the step does the FFN
work the paper's timings reflect; ``init`` keeps what the fresh routers pick.

The issue's end-to-end target: with s the share of vanilla's step spent in its expert
layers (one of the model's own expert layers timed forward+backward on a micro-batch, times
layers x micro-batches, over the step time) and g the paper's expert-forward gain for the
preset (0.6B at tau 0.75: 535.3 / 427.6 ms), MoE++ should beat vanilla's step by at least
1 / (1 - s + s / g) (Amdahl's law).
"""

from __future__ import annotations

import contextlib
import dataclasses
import statistics
from typing import Optional

import torch

from moepp_megatron.bench import expert_layer
from moepp_megatron.bench.distributions import forced_routing
from moepp_megatron.bench.launch import launch
from moepp_megatron.bench.layer import time_layer
from moepp_megatron.bench.measure import peak_memory, reset_peak_memory, resolve_device, summarize, time_calls
from moepp_megatron.bench.paper import paper_speedup
from moepp_megatron.config.schema import ModelConfig, OptimConfig, ParallelConfig
from moepp_megatron.model.hardware import peak_flops
from moepp_megatron.model.size import forward_flops_per_token


def _batch(model: ModelConfig, micro_batch: int, device, generator) -> dict:
    tokens = torch.randint(0, model.vocab_size, (micro_batch, model.seq_length + 1), generator=generator)
    return {
        "tokens": tokens[:, :-1].to(device),
        "labels": tokens[:, 1:].to(device),
        "loss_mask": torch.ones(micro_batch, model.seq_length, device=device),
        "position_ids": torch.arange(model.seq_length, device=device).expand(micro_batch, -1),
    }


def _expert_layers(gpt) -> list:
    return [layer.mlp for layer in gpt.decoder.layers if hasattr(layer.mlp, "router")]


class TrainingStep:
    """What the trainer's step does, on one device and random tokens: megatron's
    forward-backward schedule over the micro-batches (DDP, ``finalize_model_grads``), then the
    optimizer and LR-scheduler step. ``routing``: ``balanced`` forces every router to the
    balance its loss aims at (module docstring), ``init`` keeps the fresh routers' picks. A
    context manager: the forced routing ends with it. Needs megatron's parallel state."""

    def __init__(self, model: ModelConfig, device, micro_batch: int, num_microbatches: int, routing: str) -> None:
        from megatron.core.transformer.moe.router import TopKRouter

        from moepp_megatron.compat.megatron_internals import forget_aux_losses
        from moepp_megatron.model.builder import build_model
        from moepp_megatron.training.optimizer import build_optimizer
        from moepp_megatron.training.trainer import wrap_for_training

        forget_aux_losses()  # sized by an earlier model of this process
        cpu = device.type == "cpu"
        self.model, self.micro_batch, self.num_microbatches = model, micro_batch, num_microbatches
        (self.gpt,) = build_model(model, ParallelConfig(cpu_mode=cpu), bf16=not cpu)
        self.ddp = wrap_for_training(self.gpt, cpu_mode=cpu, bf16=not cpu)
        self.optimizer, self.scheduler = build_optimizer(
            [self.ddp], OptimConfig(warmup_iters=1), bf16=not cpu, train_iters=100
        )
        self.routers = [m for m in self.gpt.modules() if isinstance(m, TopKRouter)]
        self._forcing = contextlib.ExitStack()
        if routing == "balanced":
            picks_TK = expert_layer.balanced_picks(model, micro_batch * model.seq_length)
            for router in self.routers:
                self._forcing.enter_context(forced_routing(router, picks_TK))
        generator = torch.Generator().manual_seed(0)
        self.batches = [_batch(model, micro_batch, device, generator) for _ in range(num_microbatches)]

    def __enter__(self) -> "TrainingStep":
        return self

    def __exit__(self, *exc) -> None:
        self._forcing.close()

    def forward_backward(self) -> float:
        """The schedule over the micro-batches; their mean loss."""
        from megatron.core.pipeline_parallel import get_forward_backward_func

        from moepp_megatron.training.forward_step import gpt_forward_step

        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        losses = get_forward_backward_func()(
            forward_step_func=gpt_forward_step, data_iterator=iter(self.batches), model=[self.ddp],
            num_microbatches=self.num_microbatches, seq_length=self.model.seq_length,
            micro_batch_size=self.micro_batch, forward_only=False,
        )
        return float(torch.stack([item["lm loss"] for item in losses]).mean())

    def optimizer_step(self) -> None:
        self.optimizer.step()
        self.scheduler.step(increment=1)

    def __call__(self) -> float:
        loss = self.forward_backward()
        self.optimizer_step()
        return loss


def _train_rank(model: ModelConfig, device_name: str, threads: int, micro_batch: int,
                num_microbatches: int, warmup: int, repeats: int, routing: str) -> dict:
    from moepp_megatron.parallel.initialize import initialize_parallel

    device = resolve_device(device_name)
    cpu = device.type == "cpu"
    if cpu:
        torch.set_num_threads(threads)
    initialize_parallel(cpu_mode=cpu)
    counts = {"tokens": 0, "ffn": 0}

    def count_ffn(router, args, output):
        routing_map_TN = output[1]
        counts["tokens"] += routing_map_TN.shape[0]
        counts["ffn"] += routing_map_TN[:, : router.config.num_moe_experts].sum()

    with TrainingStep(model, device, micro_batch, num_microbatches, routing) as step:
        for router in step.routers:
            router.register_forward_hook(count_ffn)
        for _ in range(warmup):
            step()
        counts.update(tokens=0, ffn=0)
        reset_peak_memory(device)
        losses = []
        times = time_calls(lambda: losses.append(step()), device, warmup=0, repeats=repeats)
        peak = peak_memory(device)
        ffn_experts_per_token = float(counts["ffn"]) / max(counts["tokens"], 1)
        # One of the model's expert layers (its parameters, dtype, routing) on one micro-batch.
        layers = _expert_layers(step.gpt)
        x_SBD = expert_layer.layer_input(model, micro_batch * model.seq_length, device)
        layer_time = time_layer(layers[0], x_SBD, device, 1, repeats)
    return {
        "times": times,
        "expert_layer": layer_time["forward_backward"],
        "num_expert_layers": len(layers),
        "losses": losses,
        "peak_memory": peak,
        "ffn_experts_per_token": ffn_experts_per_token,
        "num_parameters": sum(p.numel() for p in step.gpt.parameters()),
        "device_name": torch.cuda.get_device_name(device) if not cpu else "cpu",
    }


def end_to_end_target(model_name: str, tau: float, rows: list[dict]) -> dict:
    """The numbers behind the end-to-end target (module docstring) and the measured speed-up."""
    moepp, vanilla = (next(r for r in rows if r["method"] == m) for m in ("moepp", "vanilla"))
    share = vanilla["expert_layer_share"]
    gain = paper_speedup(model_name, tau)
    return {
        "vanilla_expert_layer_share": share,
        "paper_expert_forward_speedup": gain,
        "target_speedup": 1 / (1 - share + share / gain) if gain else None,
        "measured_speedup": vanilla["step"]["median_ms"] / moepp["step"]["median_ms"],
    }


def bench(model_name: str, models: dict[str, ModelConfig], device_name: str, threads: int,
          micro_batch: int, num_microbatches: int, warmup: int, repeats: int, routing: str) -> list[dict]:
    """One row per method; the MoE++ row also carries ``end_to_end`` (the target's numbers)."""
    rows = []
    for method, model in models.items():
        (run,) = launch(
            _train_rank, 1, model, device_name, threads, micro_batch, num_microbatches, warmup, repeats,
            routing,
        )
        tokens_per_step = micro_batch * num_microbatches * model.seq_length
        step_s = statistics.median(run["times"])
        train_flops = 3 * forward_flops_per_token(model, run["ffn_experts_per_token"]) * tokens_per_step
        peak = peak_flops(run["device_name"])
        rows.append({
            "method": method,
            "model": dataclasses.asdict(model),
            "num_parameters": run["num_parameters"],
            "tokens_per_step": tokens_per_step,
            "step": summarize(run["times"]),
            "tokens_per_s": tokens_per_step / step_s,
            "losses": run["losses"],
            "ffn_experts_per_token": run["ffn_experts_per_token"],
            "train_flops_per_step": train_flops,
            "achieved_tflops": train_flops / step_s / 1e12,
            "mfu": train_flops / step_s / peak if peak else None,
            "peak_memory": run["peak_memory"],
            "expert_layer_forward_backward": run["expert_layer"],
            "num_expert_layers": run["num_expert_layers"],
            "expert_layer_share": (
                run["expert_layer"]["median_ms"] * run["num_expert_layers"] * num_microbatches
                / (step_s * 1e3)
            ),
        })
        row = rows[-1]
        print(
            f"{method:>7}: {row['tokens_per_s']:10.1f} tokens/s, step {row['step']['median_ms']:.0f} ms, "
            f"{row['achieved_tflops']:.3f} TFLOP/s, peak memory {row['peak_memory']['bytes'] / 2**30:.2f} GiB "
            f"({row['peak_memory']['kind']}), FFN experts/token {row['ffn_experts_per_token']:.2f}, "
            f"expert layers {row['expert_layer_share']:.0%} of the step",
            flush=True,
        )
    target = end_to_end_target(model_name, models["moepp"].moe.tau, rows)
    next(r for r in rows if r["method"] == "moepp")["end_to_end"] = target
    print(
        f"vanilla expert layers {target['vanilla_expert_layer_share']:.0%} of the step; target "
        f"speed-up {_f(target['target_speedup'])} (paper gain {_f(target['paper_expert_forward_speedup'])}); "
        f"measured {target['measured_speedup']:.3f}x",
        flush=True,
    )
    return rows


def _f(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}x"
