"""A tiny blended corpus and run configs for trainer tests."""

from __future__ import annotations

import pytest

from tests.fixtures import tiny_blend
from tests.training.runs import CONFIGS, run_config_writer  # noqa: F401 (CONFIGS: imported from here)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    return tiny_blend(tmp_path_factory.mktemp("blend"))


@pytest.fixture
def run_config(tiny_data, tmp_path):
    """``run_config(name, **sections)``: see :func:`run_config_writer` (in ``tmp_path``)."""
    return run_config_writer(tiny_data, tmp_path)
