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
# Stopping: SIGUSR1, SIGTERM or SIGINT (Ctrl-C) makes every training process finish its
# step, save a checkpoint and exit; a second Ctrl-C exits at once. Slurm delivers a step's
# signals to every process in it; a signal sent to this script alone is forwarded to the
# training processes. torchrun must outlive them to collect their exit codes, so it ignores
# all three (an ignored signal stays ignored across exec; it handles SIGHUP/SIGQUIT only).
#
# Exit status: 0 the run is complete; 75 it stopped early with a checkpoint to resume from
# (a signal, or training.exit_after_iters): run the same command again; anything else: it
# failed (a config mistake: before torchrun starts, one message). The trainer reports its
# outcome in the file MOEPP_STATUS_FILE names and then exits 0, since torchrun would turn a
# worker's 75 into 1 and a failure report.
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
nproc=${NPROC_PER_NODE:-$([ "${gpus:-0}" -gt 0 ] && echo "$gpus" || echo 2)}
# The whole config, checked here once (seconds, one message) rather than by every rank.
python -m moepp_megatron.training.train --check --world-size $((${NNODES:-1} * nproc)) \
    ${configs[@]+"${configs[@]}"} "$@"
status_file=$(mktemp "${TMPDIR:-/tmp}/moepp-status.XXXXXX")
trap 'rm -f "$status_file"' EXIT
export MOEPP_STATUS_FILE=$status_file
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-240}
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT
# What torchrun sets (with a banner) when it is unset.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
trap '' USR1 TERM INT
torchrun \
    --nnodes="${NNODES:-1}" \
    --node-rank="${NODE_RANK:-0}" \
    --nproc-per-node="$nproc" \
    --master-addr="${MASTER_ADDR:-127.0.0.1}" \
    --master-port="${MASTER_PORT:-29500}" \
    -m moepp_megatron.training.train ${configs[@]+"${configs[@]}"} "$@" &
launcher=$!
# shellcheck disable=SC2329  # invoked by the traps below
forward() { pkill "-$1" -P "$launcher" 2>/dev/null || true; }
trap 'forward USR1' USR1
trap 'forward TERM' TERM
trap 'forward INT' INT
while :; do
    rc=0
    wait "$launcher" || rc=$?
    # A trapped signal interrupts `wait` (status > 128) while torchrun goes on.
    if [ "$rc" -gt 128 ] && kill -0 "$launcher" 2>/dev/null; then continue; fi
    break
done
case "$(cat "$status_file" 2>/dev/null)" in
    complete) exit 0 ;;
    stopped) exit 75 ;;
    *) exit $((rc == 0 ? 1 : rc)) ;;
esac
