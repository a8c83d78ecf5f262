#!/usr/bin/env bash
# Launch moepp-train with torchrun on this node (one of NNODES).
#   scripts/pretrain.sh CONFIG [dotted.key=value ...]
# Topology comes from the environment; hyperparameters live in the config.
#   NNODES (1)  NODE_RANK (0)  NPROC_PER_NODE (number of GPUs, else 2)
#   MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   MOEPP_CPU_MODE=1 runs on CPU with gloo (development only).
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG [dotted.key=value ...]" >&2
    exit 2
fi
config=$1
shift
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
exec torchrun \
    --nnodes="${NNODES:-1}" \
    --node-rank="${NODE_RANK:-0}" \
    --nproc-per-node="${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)}" \
    --master-addr="${MASTER_ADDR:-127.0.0.1}" \
    --master-port="${MASTER_PORT:-29500}" \
    -m moepp_megatron.training.train --config "$config" "$@"
