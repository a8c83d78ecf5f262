"""Batch geometry and run length: the paper's recipe (4M-token batches of 2048-token
sequences, 100B tokens, 32 GPUs) in micro-batches and iterations, and errors that name the
fields to change."""

from __future__ import annotations

import pytest

from moepp_megatron.config.schema import ModelConfig, OptimConfig, RunConfig, TrainingConfig
from moepp_megatron.training.plan import batch_geometry


def _run(seq_length=2048, **training) -> RunConfig:
    training = {"train_tokens": 100_000_000_000, "global_batch_tokens": 4_194_304, "micro_batch_size": 1,
                **training}
    return RunConfig(model=ModelConfig(seq_length=seq_length), training=TrainingConfig(**training))


def test_paper_recipe_on_32_ranks():
    g = batch_geometry(_run(), data_parallel_size=32)
    assert g.global_batch_size == 2048  # sequences of 2048 tokens per step
    assert g.num_microbatches == 64  # per rank: 2048 / (1 x 32)
    assert g.train_iters == 23_841  # 100e9 / 4_194_304 = 23841.86, whole iterations
    assert (g.micro_batch_size, g.seq_length) == (1, 2048)


@pytest.mark.parametrize(
    "dp, micro_batch_size, expected", [(1, 1, 2048), (8, 4, 64), (64, 2, 16), (2048, 1, 1)]
)
def test_micro_batches_per_rank(dp, micro_batch_size, expected):
    assert batch_geometry(_run(micro_batch_size=micro_batch_size), dp).num_microbatches == expected


def test_train_iters_wins_over_tokens_when_given():
    assert batch_geometry(_run(train_tokens=None, train_iters=7), 32).train_iters == 7


def test_batch_not_a_multiple_of_seq_length():
    with pytest.raises(ValueError) as error:
        batch_geometry(_run(global_batch_tokens=4_194_304 + 1000), 32)
    message = str(error.value)
    assert "training.global_batch_tokens=4195304" in message and "model.seq_length=2048" in message


def test_batch_not_divisible_into_micro_batches():
    with pytest.raises(ValueError) as error:
        batch_geometry(_run(micro_batch_size=3), 32)
    message = str(error.value)
    assert "training.global_batch_tokens gives 2048 sequences" in message
    assert "micro_batch_size (3)" in message and "data-parallel size (32)" in message


def test_train_tokens_smaller_than_one_batch():
    with pytest.raises(ValueError) as error:
        batch_geometry(_run(train_tokens=4_000_000), 32)
    message = str(error.value)
    assert "training.train_tokens=4000000" in message and "training.global_batch_tokens=4194304" in message


def test_train_iters_below_one():
    with pytest.raises(ValueError, match=r"training.train_iters must be >= 1, got 0"):
        batch_geometry(_run(train_tokens=None, train_iters=0), 32)


def test_warmup_longer_than_the_run_is_a_clear_error(single_process):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from moepp_megatron.config.schema import ParallelConfig
    from moepp_megatron.model.builder import build_model
    from moepp_megatron.training.optimizer import build_optimizer
    from tests.tiny_models import tiny_model

    (gpt,) = build_model(tiny_model(), ParallelConfig(cpu_mode=True))
    ddp = DistributedDataParallel(gpt.config, DistributedDataParallelConfig(), gpt)
    with pytest.raises(ValueError) as error:
        build_optimizer([ddp], OptimConfig(warmup_iters=2000), bf16=False, train_iters=1000)
    message = str(error.value)
    assert "optim.warmup_iters=2000 must be smaller than the decay length" in message
    assert "1000" in message
