#!/usr/bin/env bash
# Install everything a fresh CPU machine needs, then run the test suite.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k router -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
# torch 2.13.0 resolves to the local CPU build on dev/CI machines; GPU images bring their own.
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e ".[test]"
python -m pytest -q "$@"
