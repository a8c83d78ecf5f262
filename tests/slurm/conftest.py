"""Fixtures for the Slurm tests: a real one-node cluster (tests/slurm/cluster.py) and a tiny
CPU training config on a corpus built from CPython's documentation.

The cluster is required, not optional: when Slurm is missing the tests try
tests/slurm/setup_slurm.sh (root + apt-get), and fail with the reason when that is
impossible. MOEPP_SKIP_SLURM=1 skips them explicitly (and says so).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests.fixtures import tiny_blend
from tests.slurm.cluster import LocalSlurm, SlurmUnavailable, missing_commands
from tests.training.runs import run_config_writer

REPO = Path(__file__).resolve().parents[2]


def pytest_configure(config):
    config.addinivalue_line("markers", "slurm: needs a real Slurm (a one-node cluster the tests start)")


def pytest_collection_modifyitems(items):
    """One cluster for all: the tests that use it run in one pytest-xdist worker."""
    for item in items:
        if "slurm" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.fixture(scope="session")
def slurm():
    if os.environ.get("MOEPP_SKIP_SLURM") == "1":
        pytest.skip("MOEPP_SKIP_SLURM=1: Slurm tests skipped on request")
    if missing_commands():
        setup = subprocess.run(["bash", str(REPO / "tests/slurm/setup_slurm.sh")],
                               capture_output=True, text=True, timeout=600)
        if setup.returncode != 0 or missing_commands():
            pytest.fail(
                "Slurm is not installed and tests/slurm/setup_slurm.sh could not install it "
                f"(missing: {', '.join(missing_commands())}):\n{setup.stdout}{setup.stderr}",
                pytrace=False,
            )
    base = Path(tempfile.mkdtemp(prefix="moepp-slurm-"))
    cluster = LocalSlurm(base)
    try:
        cluster.start()
    except SlurmUnavailable as e:
        shutil.rmtree(base, ignore_errors=True)
        pytest.fail(f"could not start a local Slurm cluster: {e}", pytrace=False)
    yield cluster
    cluster.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def slurm_workdir():
    """Where the tests' jobs write (a plain /tmp directory: jobs run from the spool)."""
    path = Path(tempfile.mkdtemp(prefix="moepp-slurm-runs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_config(slurm_workdir) -> Path:
    """The tiny MoE++ (EP=2, 2 CPU processes) for 40 iterations, checkpoints every 10."""
    write = run_config_writer(tiny_blend(slurm_workdir / "blend"), slurm_workdir)
    return write(
        "tiny-run",
        run_dir=str(slurm_workdir / "default-run"),
        data={"num_workers": 1},
        training={"train_iters": 40, "eval_interval": 10},
        checkpoint={"save_interval": 10, "keep_last": 2},
    )
