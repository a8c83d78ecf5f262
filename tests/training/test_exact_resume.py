"""Exact resume: N steps straight and N/2 + stop + resume + N/2 give bitwise identical
losses at every step, for a MoE++ model with EP=2 on 2 processes."""

from __future__ import annotations

import pytest
import yaml

from tests.distributed import run_distributed
from tests.training.runs import train_losses, train_rank


@pytest.mark.slow
def test_stop_and_resume_is_bitwise_identical(run_config, tmp_path):
    straight = run_config("straight")
    stopped = run_config("stopped")
    assert run_distributed(train_rank, 2, str(straight), []) == [0, 0]
    assert run_distributed(train_rank, 2, str(stopped), ["training.exit_after_iters=4"]) == [0, 0]
    assert sorted(train_losses(tmp_path / "stopped")) == [1, 2, 3, 4]
    assert run_distributed(train_rank, 2, str(stopped), []) == [0, 0]

    expected, resumed = train_losses(tmp_path / "straight"), train_losses(tmp_path / "stopped")
    assert sorted(expected) == list(range(1, 9))
    assert resumed == expected  # exact float equality, every iteration
    assert expected[8] < expected[1] - 0.5, "the loss must fall"
    saved = yaml.safe_load((tmp_path / "stopped/checkpoints/iter_0000008/config.yaml").read_text())
    assert saved["parallel"]["expert"] == 2 and saved["model"]["vocab_size"] == 512
