"""A tiny blended corpus, run configs, and one logged run for trainer tests."""

from __future__ import annotations

import pytest

from tests.distributed import run_distributed
from tests.fixtures import tiny_blend
from tests.training.runs import CONFIGS, run_config_writer, train_rank  # noqa: F401 (CONFIGS: imported from here)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return tiny_blend(tmp_path_factory.mktemp("blend"))


@pytest.fixture
def run_config(tiny_data, tmp_path):
    """``run_config(name, **sections)``: see :func:`run_config_writer` (in ``tmp_path``)."""
    return run_config_writer(tiny_data, tmp_path)


@pytest.fixture(scope="session")
def logged_run(tiny_data, tmp_path_factory):
    """The run directory of a 4-iteration 2-rank ``moepp-train`` job logging every iteration
    to every sink and validating (also dropless) every 2."""
    directory = tmp_path_factory.mktemp("metrics")
    config = run_config_writer(tiny_data, directory)(
        "logged", training={"train_iters": 4, "eval_interval": 2, "eval_dropless": True},
        logging={"interval": 1, "tensorboard": True, "wandb": True, "wandb_mode": "offline"},
    )
    assert run_distributed(train_rank, 2, str(config), []) == [0, 0]
    return directory / "logged"
