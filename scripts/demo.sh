#!/usr/bin/env bash
# The embedded default job: a tiny MoE++ model trained with expert parallelism on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==2.13.0"
python -m pip install --quiet -e .
exec moepp-demo "$@"
