#!/usr/bin/env bash
# One per node, started by scripts/slurm/pretrain.sbatch through
# `srun --ntasks-per-node=1` (inside the container when IMAGE is set): Slurm's view of this
# node becomes scripts/pretrain.sh's topology, then torchrun takes over.
#   NNODES     = SLURM_JOB_NUM_NODES      NODE_RANK = SLURM_NODEID (0 on the first node)
#   NPROC_PER_NODE = NPROC_PER_NODE, else SLURM_GPUS_ON_NODE, else pretrain.sh's default
#   MASTER_ADDR / MASTER_PORT from the batch script (the allocation's first host)
set -euo pipefail
trap '' USR1  # see scripts/pretrain.sh: the trainer handles it, nothing above it may die of it
: "${SLURM_NODEID:?node.sh runs under srun}"
export NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
export NODE_RANK=$SLURM_NODEID
if [ -z "${NPROC_PER_NODE:-}" ] && [[ ${SLURM_GPUS_ON_NODE:-} =~ ^[1-9][0-9]*$ ]]; then
    export NPROC_PER_NODE=$SLURM_GPUS_ON_NODE
fi
echo "[node.sh $(hostname)] node $NODE_RANK of $NNODES, ${NPROC_PER_NODE:-auto} process(es), rendezvous ${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}"
exec bash "$(dirname "$0")/../pretrain.sh" "$@"
