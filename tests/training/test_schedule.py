"""LR schedule of the paper's recipe: linear warmup from 1e-7, then cosine (or linear)
decay to the final LR, at chosen iterations (values computed by hand)."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

from moepp_megatron.config.schema import OptimConfig, ParallelConfig
from moepp_megatron.model.builder import build_model
from moepp_megatron.training.optimizer import build_optimizer
from tests.tiny_models import tiny_model


def _scheduler(decay_style: str, train_iters=1000):
    (gpt,) = build_model(tiny_model(), ParallelConfig(cpu_mode=True))
    ddp = DistributedDataParallel(gpt.config, DistributedDataParallelConfig(), gpt)
    optim = OptimConfig(lr=5e-4, min_lr=5e-5, warmup_iters=100, decay_style=decay_style)
    optimizer, scheduler = build_optimizer([ddp], optim, bf16=False, train_iters=train_iters)
    return optimizer, scheduler


def _lr_after(scheduler, optimizer, iterations):
    scheduler.step(increment=iterations)
    return optimizer.param_groups[0]["lr"]


@pytest.mark.parametrize(
    "decay_style, at, expected",
    [
        ("cosine", 0, 1e-7),  # warmup starts at 1e-7
        ("cosine", 50, 1e-7 + (5e-4 - 1e-7) * 0.5),  # half-way up the linear warmup
        ("cosine", 100, 5e-4),  # peak at the end of warmup
        ("cosine", 550, 5e-5 + (5e-4 - 5e-5) * 0.5),  # cosine midpoint of 900 decay iters
        ("cosine", 325, 5e-5 + (5e-4 - 5e-5) * 0.5 * (1 + math.cos(math.pi * 0.25))),
        ("cosine", 1000, 5e-5),  # final LR
        ("cosine", 1200, 5e-5),  # stays there
        ("linear", 550, 5e-5 + (5e-4 - 5e-5) * 0.5),
        ("linear", 775, 5e-5 + (5e-4 - 5e-5) * 0.25),
    ],
)
def test_lr_at_iteration(single_process, decay_style, at, expected):
    optimizer, scheduler = _scheduler(decay_style)
    assert _lr_after(scheduler, optimizer, at) == pytest.approx(expected, rel=1e-9)


def test_weight_decay_skips_norms_and_is_point_one_elsewhere(single_process):
    optimizer, _ = _scheduler("cosine")
    decays = {g["wd_mult"] * g["weight_decay"] for g in optimizer.param_groups}
    assert decays == {0.0, 0.1}
    torch.testing.assert_close(torch.tensor(optimizer.config.clip_grad), torch.tensor(1.0))
