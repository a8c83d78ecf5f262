"""Exact resume: N steps straight and N/2 + stop + resume + N/2 give bitwise identical
losses at every step, for a MoE++ model with EP=2 on 2 processes, in fp32 and in bf16
(bf16 parameters, fp32 main parameters and Adam state in the checkpoint)."""

from __future__ import annotations

import pytest
import yaml

from tests.distributed import run_distributed
from tests.training.runs import train_losses, train_rank


@pytest.mark.slow
@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_stop_and_resume_is_bitwise_identical(run_config, tmp_path, bf16):
    straight = run_config("straight", training={"bf16": bf16})
    stopped = run_config("stopped", training={"bf16": bf16})
    assert run_distributed(train_rank, 2, str(straight), []) == [0, 0]
    assert run_distributed(train_rank, 2, str(stopped), ["training.exit_after_iters=4"]) == [75, 75]
    assert sorted(train_losses(tmp_path / "stopped")) == [1, 2, 3, 4]
    assert run_distributed(train_rank, 2, str(stopped), []) == [0, 0]

    expected, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "stopped")
    assert sorted(expected) == list(range(1, 9))
    assert resumed == expected  # exact float equality, every iteration
    assert expected[8] < expected[1] - 0.5, "the loss must fall"
    saved = yaml.safe_load((tmp_path / "stopped/checkpoints/iter_0000008/config.yaml").read_text())
    assert saved["parallel"]["expert"] == 2 and saved["model"]["vocab_size"] == 512
    assert saved["training"]["bf16"] is bf16
