"""The step-time estimate (model/step_time.py) worked by hand for the paper's two layouts:
expert parallelism 8 over 32 GPUs (0.6B, strategy 1) and TP=1 x PP=8 (7B, strategy 2);
and the record rows it takes its per-layer costs from."""

from __future__ import annotations

import dataclasses

import pytest

from moepp_megatron.config import load_config
from moepp_megatron.model.hardware import find_gpu
from moepp_megatron.model.size import parameter_counts
from moepp_megatron.model.step_time import LayerCosts, estimate_step_time, matching_costs
from moepp_megatron.training.plan import batch_geometry

H200, A100 = find_gpu("NVIDIA H200"), find_gpu("NVIDIA A100-SXM4-80GB")
COSTS = LayerCosts(measured_on=H200, layer_s=0.010, ends_s=0.020, optimizer_s_per_param=1e-10)
COMPUTE = 989e12 / 312e12  # H200 over A100, peak bf16
MEMORY = 4.8e12 / 2.039e12  # HBM bandwidth


def _estimate(config, world_size=32, costs=COSTS):
    g = batch_geometry(config, world_size // (config.parallel.tensor * config.parallel.pipeline))
    return g, estimate_step_time(config.model, config.parallel, config.optim, world_size=world_size,
                                 micro_batch=g.micro_batch_size, num_microbatches=g.num_microbatches,
                                 costs=costs, target=A100)


def test_expert_parallel_layout_of_the_small_runs():
    config = load_config(["moepp-0.6b-8+4e", "recipes/strategy1"], ["parallel.expert=8"])
    g, step = _estimate(config)
    assert g.num_microbatches == 16  # 2048 sequences / (4 per micro-batch x 32 data-parallel ranks)
    stage = (12 * 0.010 + 0.020) * COMPUTE
    assert step.compute_s == pytest.approx(16 * stage) and step.bubble_s == 0 and step.pipeline_s == 0
    # 4 all-to-alls per layer and micro-batch; 1.2 FFN experts per token at tau 0.75
    # (2 x 6 / (6 + 4)); 7/8 of the bytes leave the GPU, over NVLink (300 GB/s).
    tokens_bytes = 4 * 2048 * 768 * 2
    assert step.all_to_all_s == pytest.approx(16 * 12 * 4 * tokens_bytes * 1.2 * 7 / 8 / 300e9)
    counts = parameter_counts(config.model)
    dense = counts.total - counts.expert - counts.embedding / 2
    expert = counts.expert / 8
    # The distributed optimizer: dense parameters over 32 ranks, experts over 4.
    assert step.optimizer_s == pytest.approx(1e-10 * (dense / 32 + expert / 4) * MEMORY)
    # fp32 gradients reduce-scattered, bf16 parameters gathered, at 25 GB/s per GPU...
    assert step.data_parallel_s == pytest.approx((dense * 6 * 31 / 32 + expert * 6 * 3 / 4) / 25e9)
    # ... behind the compute, as the recipe overlaps both.
    assert step.data_parallel_exposed_s == 0
    assert step.total_s == pytest.approx(step.compute_s + step.all_to_all_s + step.optimizer_s)

    blocking = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, overlap_grad_reduce=False))
    assert _estimate(blocking)[1].data_parallel_exposed_s == pytest.approx(step.data_parallel_s)


def test_pipeline_layout_of_the_7b():
    config = load_config(["moepp-7b-16+4e", "recipes/strategy2"])
    g, step = _estimate(config)
    assert g.num_microbatches == 512  # 2048 sequences / (1 x 4 data-parallel ranks)
    stage = (3 * 0.010 + 0.020) * COMPUTE  # 24 layers over 8 stages
    assert step.compute_s == pytest.approx(512 * stage)
    assert step.bubble_s == pytest.approx(7 * stage)
    assert step.all_to_all_s == 0  # no expert parallelism
    # An activation forward and a gradient backward per slot of the schedule, over the network.
    assert step.pipeline_s == pytest.approx((512 + 7) * 2 * 2048 * 1536 * 2 / 25e9)

    interleaved = dataclasses.replace(config, parallel=dataclasses.replace(config.parallel, virtual_pipeline=3))
    assert _estimate(interleaved)[1].bubble_s == pytest.approx(7 / 3 * stage)


def test_tensor_parallel_layouts_are_not_estimated():
    config = load_config(["moepp-0.6b-8+4e", "recipes/strategy1"], ["parallel.tensor=2", "parallel.expert=4"])
    with pytest.raises(ValueError, match="TP = 1"):
        _estimate(config)


def _record(path: str, device: dict, rows: list[dict]) -> dict:
    return {"path": path, "device": device, "results": rows}


def test_costs_come_from_the_newest_gpu_row_of_the_same_model_and_micro_batch():
    model = load_config(["moepp-0.6b-8+4e"]).model
    row = {"run": "moepp-0.6b-tau0.75", "micro_batch": 4, "model": dataclasses.asdict(model),
           "layer_ms": 10.0, "ends_ms": 20.0, "optimizer_ns_per_param": 0.1}
    deeper = dict(row, model=dataclasses.asdict(dataclasses.replace(model, num_layers=2)))
    other_tau = dict(row, model=dataclasses.asdict(dataclasses.replace(model, moe=dataclasses.replace(model.moe, tau=0.5))))
    gpu, cpu = {"type": "cuda", "name": "NVIDIA H200"}, {"type": "cpu", "name": "some CPU"}
    records = [
        _record("4_cpu_costs.json", cpu, [row]),  # no GPU: nothing to scale from
        _record("3_h200_costs.json", gpu, [dict(row, micro_batch=1), other_tau]),
        _record("2_h200_costs.json", gpu, [deeper]),  # the depth does not matter
        _record("1_h200_costs.json", gpu, [row]),
    ]
    costs, source = matching_costs(records, model, micro_batch=4)
    assert costs == LayerCosts(H200, 0.010, 0.020, 1e-10)
    assert source == "2_h200_costs.json, run moepp-0.6b-tau0.75"
    assert matching_costs(records, model, micro_batch=2) is None
