#!/usr/bin/env bash
# Launch moepp-train with torchrun on this node (one of NNODES).
#   scripts/pretrain.sh CONFIG [CONFIG ...] [--config CONFIG ...] [dotted.key=value ...]
# Leading arguments without '=' are config files (layered left to right, like repeated
# --config); hyperparameters live in the configs. Topology comes from the environment:
#   NNODES (1)  NODE_RANK (0)  NPROC_PER_NODE (number of GPUs, else 2)
#   MASTER_ADDR (127.0.0.1)  MASTER_PORT (29500)
#   MOEPP_CPU_MODE=1 runs on CPU with gloo (development only).
# Ranks are static: node NODE_RANK holds global ranks NODE_RANK*NPROC_PER_NODE + (0..N-1),
# the same on every restart, so a resumed job gets every rank's RNG stream back.
#
# Stopping: SIGUSR1 or SIGTERM to the training processes makes every rank finish its step,
# save a checkpoint and exit 75. Slurm delivers a step's signals to every process in it,
# torchrun included, and SIGUSR1's default action would kill torchrun and orphan the
# workers; it is ignored here (an ignored signal stays ignored across exec and fork) and
# the trainer installs its own handler. SIGTERM to torchrun is forwarded to the workers,
# which then get TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds to save before SIGKILL.
set -euo pipefail
if [ $# -lt 1 ]; then
    echo "usage: $0 CONFIG [CONFIG ...] [--config CONFIG ...] [dotted.key=value ...]" >&2
    exit 2
fi
configs=()
while [ $# -gt 0 ] && [[ $1 != *=* && $1 != -* ]]; do
    configs+=(--config "$1")
    shift
done
if [ ${#configs[@]} -eq 0 ] && [[ " $* " != *" --config "* ]]; then
    echo "$0: no config file given" >&2
    exit 2
fi
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}
trap '' USR1
exec torchrun \
    --nnodes="${NNODES:-1}" \
    --node-rank="${NODE_RANK:-0}" \
    --nproc-per-node="${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)}" \
    --master-addr="${MASTER_ADDR:-127.0.0.1}" \
    --master-port="${MASTER_PORT:-29500}" \
    -m moepp_megatron.training.train ${configs[@]+"${configs[@]}"} "$@"
