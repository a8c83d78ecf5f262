"""One blocking host synchronisation per training step in the loop: the loss all-reduce
carries the stop flag, and the step reads both back at once. Counted as the calls that
bring a tensor's value to Python (item, tolist, bool, float, int) made from this package's
training code from one step's start to the next; megatron-core's own (the grad norm) are
not ours to fold."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.distributed import run_distributed

pytestmark = pytest.mark.slow
SYNCS = {"item", "tolist", "__bool__", "__float__", "__int__"}
TRAINING_CODE = str(Path(__file__).resolve().parents[2] / "moepp_megatron" / "training")


def _count_syncs(config_path: str, steps: int) -> list[int]:
    from torch.overrides import TorchFunctionMode

    from moepp_megatron.config import load_config
    from moepp_megatron.training.trainer import Trainer

    class CountSyncs(TorchFunctionMode):
        count = 0

        def __torch_function__(self, func, types, args=(), kwargs=None):
            caller = sys._getframe(1).f_code.co_filename
            if getattr(func, "__name__", "") in SYNCS and caller.startswith(TRAINING_CODE):
                CountSyncs.count += 1
            return func(*args, **(kwargs or {}))

    # Nothing but steps until the last iteration: no logging, validation or checkpoint.
    trainer = Trainer(load_config(config_path, [
        "parallel.expert=1", f"training.train_iters={steps}", "logging.interval=1000",
        "training.eval_interval=1000", "checkpoint.save_interval=1000",
    ]))
    at_step_start = []
    step = trainer.train_step

    def counted_step():
        at_step_start.append(CountSyncs.count)
        return step()

    trainer.train_step = counted_step
    with CountSyncs():
        assert trainer.run() == 0
    # Syncs from one step's start to the next: the step and the rest of its iteration.
    return [b - a for a, b in zip(at_step_start, at_step_start[1:])]


def test_one_host_sync_per_step(run_config):
    (counts,) = run_distributed(_count_syncs, 1, str(run_config()), 5, timeout=600)
    assert counts == [1, 1, 1, 1]
