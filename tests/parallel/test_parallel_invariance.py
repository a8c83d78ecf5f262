"""Parallel layouts compute the same model: EP=1/2/4 with both dispatchers, TP=2 + SP,
pipeline parallelism (1F1B and interleaved, uneven splits, dense layers, a stage without
MoE++ layers, recompute) with the gating residual crossing stage boundaries, and the
combinations PP x EP, PP x TP, TP x EP, DP x EP.

The reference is one process running the same global batch as micro-batches. Each
layout loads the reference's initial weights from a dist checkpoint, runs one training
step through megatron's DDP, schedule and finalize_model_grads, and saves its gradients
as a dist checkpoint; a single process loads that (megatron reshards) and compares every
parameter's gradient, the per-micro-batch losses and the per-layer load-balance losses.
Capacity is per rank and per micro-batch in megatron, so with EP (each rank routes its
own micro-batches) it is comparable and switched on; sequence parallelism splits a
micro-batch's tokens over TP ranks, so the TP comparison is dropless.
"""

from __future__ import annotations

import pytest
import torch

from moepp_megatron.config.schema import ParallelConfig
from tests.distributed import run_distributed
from tests.parallel import workers
from tests.tiny_models import assert_close, tiny_model, with_moe

NUM_MICROBATCHES, MICRO_BATCH = 4, 2
TOL = dict(rtol=1e-4, atol=1e-6)
# bf16 layouts: both runs round to bf16 after every GEMM but group some sums differently (an
# EP rank's expert GEMM holds both ranks' tokens; DP sums gradients per rank first), and one
# different rounding moves a value by up to one unit at its scale (measured: <= 2 units).
# Values are compared as fp32: norm weights stay fp32 in the loading process, which does not
# apply the Float16Module cast.
BF16_UNITS = 4

MODELS = {
    "capacity": tiny_model(routing="release", router="mlp", capacity_factor=1.0),
    "dropless": tiny_model(routing="paper", router="linear"),
    # Capacity is per micro-batch and pipelining does not split tokens: comparable.
    "deep": tiny_model(num_layers=4, routing="release", router="mlp", capacity_factor=1.0),
    "deep-dropless": tiny_model(num_layers=4, routing="paper"),
    # Layer 1 is dense: with first_stage_layers=1, stage 0 has no MoE++ layer at all.
    "dense-first": tiny_model(num_layers=4, routing="paper", layer_freq=[0, 1, 1, 1]),
}


def _batches(model):
    return workers.microbatches(model.vocab_size, NUM_MICROBATCHES, MICRO_BATCH, model.seq_length)


def _reference_rank(model, init_dir, bf16):
    chunks = workers.setup(model, ParallelConfig(cpu_mode=True), bf16=bf16)
    workers.save_checkpoint(chunks, init_dir)
    result = workers.train_step(chunks, _batches(model))
    workers.grads_into_params(chunks)
    return {**result, "grads": workers.full_state(chunks)}


def _layout_rank(model, parallel, init_dir, grads_dir, bf16):
    chunks = workers.setup(model, parallel, bf16=bf16)
    workers.load_checkpoint(chunks, init_dir)
    result = workers.train_step(chunks, _batches(model))
    workers.grads_into_params(chunks)
    workers.save_checkpoint(chunks, grads_dir)
    return result


def _load_full_rank(model, directory, bf16):
    chunks = workers.setup(model, ParallelConfig(cpu_mode=True), bf16=bf16)
    workers.load_checkpoint(chunks, directory)
    return workers.full_state(chunks)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One single-process reference per (model, precision) that some layout uses."""
    out = {}
    for name, bf16 in sorted({(layout[0], layout[4]) for layout in LAYOUTS.values()}):
        init_dir = tmp_path_factory.mktemp(f"init-{name}-{'bf16' if bf16 else 'fp32'}")
        (result,) = run_distributed(_reference_rank, 1, MODELS[name], str(init_dir), bf16)
        out[name, bf16] = (init_dir, result)
    return out


SP = dict(sequence_parallel=True)
FP32, BF16 = False, True
# name: (model, world size, parallel fields, dispatcher, bf16)
LAYOUTS = {
    "ep2-allgather": ("capacity", 2, dict(expert=2), "allgather", FP32),
    "ep2-alltoall": ("capacity", 2, dict(expert=2), "alltoall", FP32),
    "ep4-allgather": ("capacity", 4, dict(expert=4), "allgather", FP32),
    "ep4-alltoall": ("capacity", 4, dict(expert=4), "alltoall", FP32),
    "tp2-sp-allgather": ("dropless", 2, dict(tensor=2, **SP), "allgather", FP32),
    "tp2-sp-alltoall": ("dropless", 2, dict(tensor=2, **SP), "alltoall", FP32),
    "pp2": ("deep", 2, dict(pipeline=2), "alltoall", FP32),
    "pp2-recompute": ("deep", 2, dict(pipeline=2, recompute="full"), "alltoall", FP32),
    "pp2-vpp2": ("deep", 2, dict(pipeline=2, virtual_pipeline=2), "alltoall", FP32),
    "pp2-uneven-dense-stage": ("dense-first", 2, dict(pipeline=2, first_stage_layers=1), "alltoall", FP32),
    "pp2-ep2": ("deep", 4, dict(pipeline=2, expert=2), "alltoall", FP32),
    "dp2-ep2": ("deep", 4, dict(expert=2), "alltoall", FP32),
    "tp2-ep2-sp": ("deep-dropless", 4, dict(tensor=2, expert=2, **SP), "alltoall", FP32),
    "pp2-tp2-sp": ("deep-dropless", 4, dict(pipeline=2, tensor=2, **SP), "alltoall", FP32),
    # bf16 parameters and activations (Float16Module), fp32 router, fp32 gradient reduction;
    # under PP the hidden states and the gating residual cross stages in bf16.
    "ep2-alltoall-bf16": ("capacity", 2, dict(expert=2), "alltoall", BF16),
    "pp2-bf16": ("deep", 2, dict(pipeline=2), "alltoall", BF16),
}
# Every micro-batch runs exactly the reference's ops (same shapes, same order): losses are
# bitwise equal. The gating residual crosses the stage boundary rounded to bf16, which
# moves router gradients by less than a bf16 unit but no loss.
SAME_OPS_LOSSES = {"pp2", "pp2-bf16"}


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(references, tmp_path, layout):
    model_name, world, parallel_fields, dispatcher, bf16 = LAYOUTS[layout]
    model = with_moe(MODELS[model_name], token_dispatcher=dispatcher)
    init_dir, reference = references[model_name, bf16]
    parallel = ParallelConfig(cpu_mode=True, **parallel_fields)
    grads_dir = tmp_path / "grads"
    grads_dir.mkdir()
    results = run_distributed(_layout_rank, world, model, parallel, str(init_dir), str(grads_dir), bf16)
    (grads,) = run_distributed(_load_full_rank, 1, model, str(grads_dir), bf16)

    dp_losses = {r["dp_rank"]: r["losses"] for r in results if r["losses"] is not None}
    losses = torch.cat([dp_losses[rank] for rank in sorted(dp_losses)])
    if layout in SAME_OPS_LOSSES:
        assert torch.equal(losses, reference["losses"]), f"{losses} != {reference['losses']}"
    units = BF16_UNITS if bf16 else None
    assert_close(losses, reference["losses"], units, **TOL)
    for r in results:
        assert_close(r["lb_loss"], reference["lb_loss"], units, **TOL)
    assert grads.keys() == reference["grads"].keys()
    worst = max((grads[k].float() - v.float()).abs().max().item() for k, v in reference["grads"].items())
    print(f"{layout}: max |grad diff| = {worst:.3e}")
    for name, expected in reference["grads"].items():
        assert_close(grads[name], expected, units, **TOL, msg=lambda m: f"{name}: {m}")

