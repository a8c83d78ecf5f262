#!/usr/bin/env bash
# The embedded default job: a tiny MoE++ model trained with expert parallelism on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_torch.sh
echo "installing moepp-megatron and its dependencies (megatron-core, sentencepiece, tensorboard) ..."
python -m pip install --quiet -e .
exec moepp-demo "$@"
