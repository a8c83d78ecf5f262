"""Per-layer training costs on one device: what the step-time estimate of ``moepp-train
--dry-run`` and README's paper-run table are computed from (model/step_time.py).

For each paper run (bench/presets.py: model preset + recipe, MoE++ at tau 0.75) at its
recipe's micro-batch and sequence length: the forward-backward of one micro-batch (the
trainer's schedule, bench/train.py's TrainingStep, balanced routing in every layer) of the
model cut to 1 and to 2 decoder layers. The difference is one layer; what one layer leaves
of the 1-layer time is the embedding, output layer and loss. The optimizer step (fp32 main
parameters and Adam) of the 2-layer model, per parameter, scales to any size. Medians after
warm-up; the peak memory of each (GPU: max allocated).
"""

from __future__ import annotations

import dataclasses

import torch

from moepp_megatron.bench.measure import peak_memory, reset_peak_memory, summarize, time_calls
from moepp_megatron.bench.presets import PAPER_RUNS
from moepp_megatron.bench.train import TrainingStep
from moepp_megatron.config.loader import load_config
from moepp_megatron.config.schema import ModelConfig


def measure_run(model: ModelConfig, micro_batch: int, device, warmup: int, repeats: int) -> dict:
    """The costs of ``model`` (every layer an expert layer) for one micro-batch."""
    if model.moe.layer_freq != 1:
        raise ValueError("per-layer costs need every layer alike: model.moe.layer_freq must be 1")
    depths = {}
    for layers in (1, 2):
        reset_peak_memory(device)
        with TrainingStep(dataclasses.replace(model, num_layers=layers), device, micro_batch, 1, "balanced") as step:
            forward_backward = summarize(time_calls(step.forward_backward, device, warmup, repeats))
            optimizer = summarize(time_calls(step.optimizer_step, device, warmup, repeats))
            parameters = sum(p.numel() for p in step.gpt.parameters())
        depths[layers] = {"forward_backward": forward_backward, "optimizer": optimizer,
                          "parameters": parameters, "peak_memory": peak_memory(device)}
        del step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    one, two = (depths[n]["forward_backward"]["median_ms"] for n in (1, 2))
    optimizer = depths[2]["optimizer"]
    return {
        "micro_batch": micro_batch,
        "seq_length": model.seq_length,
        "model": dataclasses.asdict(model),
        "one_layer": depths[1],
        "two_layers": depths[2],
        "layer_ms": two - one,
        "ends_ms": 2 * one - two,
        "optimizer_ns_per_param": optimizer["median_ms"] * 1e6 / depths[2]["parameters"],
    }


def summary_line(name: str, row: dict) -> str:
    return (f"{name}: layer {row['layer_ms']:.2f} ms, embedding + output + loss {row['ends_ms']:.2f} ms, "
            f"optimizer {row['optimizer_ns_per_param']:.3f} ns/parameter (micro-batch {row['micro_batch']} x "
            f"{row['seq_length']}; 1 / 2 layers {row['one_layer']['forward_backward']['median_ms']:.1f} / "
            f"{row['two_layers']['forward_backward']['median_ms']:.1f} ms)")


def bench(runs: list[str], overrides: list[str], micro_batch: int | None, seq_length: int | None, device,
          warmup: int, repeats: int) -> list[dict]:
    """One row per paper run; ``overrides`` (model.*) and the shape options replace the run's."""
    unknown = [name for name in runs if name not in PAPER_RUNS]
    if unknown:
        raise ValueError(f"unknown run(s) {', '.join(unknown)}; choose from {', '.join(PAPER_RUNS)}")
    rows = []
    for name in runs:
        run = PAPER_RUNS[name]
        shape = [f"model.seq_length={seq_length}"] if seq_length else []
        config = load_config(run.configs, [*run.overrides, *overrides, *shape])
        row = measure_run(config.model, micro_batch or config.training.micro_batch_size, device, warmup, repeats)
        rows.append({"run": name, **row})
        print(summary_line(name, row), flush=True)
    return rows
