"""Only the first and last pipeline stages read data: with PP=4 the two inner stages build
no datasets and start no data-loader workers (that the losses still equal one process's is
the pp4 layout of tests/parallel/test_training_layouts.py)."""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed

pytestmark = pytest.mark.slow


def _data_on_this_rank(config_path: str) -> dict:
    import psutil
    from megatron.core import parallel_state

    from moepp_megatron.config import load_config
    from moepp_megatron.training.trainer import Trainer

    trainer = Trainer(load_config(config_path, ["parallel.pipeline=4", "parallel.expert=1", "data.num_workers=1"]))
    try:
        return {
            "stage": parallel_state.get_pipeline_model_parallel_rank(),
            "datasets": [trainer.train_data is not None, trainer.valid_data is not None],
            "loader_workers": len(psutil.Process().children()),
        }
    finally:
        trainer.close()


def test_inner_pipeline_stages_read_no_data(run_config):
    results = run_distributed(_data_on_this_rank, 4, str(run_config()), timeout=600)
    by_stage = {r["stage"]: r for r in results}
    for stage in (0, 3):
        assert by_stage[stage]["datasets"] == [True, True] and by_stage[stage]["loader_workers"] == 1
    for stage in (1, 2):
        assert by_stage[stage]["datasets"] == [False, False] and by_stage[stage]["loader_workers"] == 0
