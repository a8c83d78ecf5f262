#!/usr/bin/env bash
# The MoE++ paper's pretraining runs (docs/MOEPP_SPEC.md section 3), submitted to Slurm through
# scripts/slurm/pretrain.sbatch. Hyperparameters come from configs/ (model preset + recipe);
# this file only names the runs and picks their configs and tau.
#
#   scripts/slurm/paper_runs.sh --list
#   scripts/slurm/paper_runs.sh [--dry-run] [--chain N] [--after JOBID] RUN|GROUP ... [-- key=value ...]
#
# Runs (strategy 1 = 100B tokens of mixture S1; configs/recipes/strategy1.yaml):
#   moepp-{0.6b,1b,2b}-tau{0.10,0.25,0.50,0.75,1.00}   MoE++ (8+4)E / (16+4)E / (32+8)E
#   vanilla-{0.6b,1b,2b}                                the vanilla MoE baselines
#   moepp-7b-s2   the 7B, strategy 2: 900B tokens of mixture S1
#   moepp-7b-s3   the 7B, strategy 3: 100B tokens of mixture S2 with the new schedule, a new
#                 run initialised from moepp-7b-s2's final checkpoint (checkpoint.init_from);
#                 submitted together with moepp-7b-s2 it waits for it (afterok)
# Groups: strategy1 (the 18 runs above), 7b (moepp-7b-s2 then moepp-7b-s3), all.
#
# Options:
#   --dry-run     print the sbatch commands instead of submitting
#   --chain N     submit every run as a dependency chain of N jobs (scripts/slurm/chain.sh)
#                 instead of one self-requeueing job
#   --after ID    the first submitted run waits for job ID to succeed (e.g. moepp-7b-s3 after
#                 an earlier moepp-7b-s2 job)
#   -- k=v ...    extra dotted overrides for every run (e.g. logging.wandb=true)
#
# Environment (defaults in brackets):
#   DATA_ROOT      directory of the moepp-preprocess outputs (configs/data/mix-s1.yaml) [required]
#   TOKENIZER      the sentencepiece tokenizer.model (LLaMA-2's) [required]
#   RUNS_ROOT      run directories go to RUNS_ROOT/<run> [<repo>/runs]
#   LOG_DIR        job logs, LOG_DIR/<run>-<jobid>.out [RUNS_ROOT/slurm-logs]
#   NODES [4]  GPUS_PER_NODE [8]  GPU_GRES [1: request --gpus-per-node; 0: whole nodes only]
#   EXPERT_PARALLEL  expert-parallel size of the 0.6B/1B/2B runs [8: one node's GPUs]; the
#                  7B uses its preset's layout (TP=1, PP=8). Layouts do not change results.
#   PARTITION, ACCOUNT, QOS, TIME   sbatch --partition/--account/--qos/--time [cluster defaults]
#   IMAGE, CONTAINER_MOUNTS         run in a container (pyxis), see pretrain.sbatch
#   SBATCH_FLAGS   more sbatch options, word-split (e.g. "--signal=B:USR1@600 --mail-type=END")
#   SBATCH         the sbatch command [sbatch]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/../.." && pwd)

STRATEGY1_SIZES=(0.6b 1b 2b)
TAUS=(0.10 0.25 0.50 0.75 1.00)
declare -A MOEPP_PRESET=([0.6b]=moepp-0.6b-8+4e [1b]=moepp-1b-16+4e [2b]=moepp-2b-32+8e)
declare -A VANILLA_PRESET=([0.6b]=vanilla-0.6b-8e [1b]=vanilla-1b-16e [2b]=vanilla-2b-32e)
declare -A LABEL=([0.6b]="0.6B (8+4)E" [1b]="1B (16+4)E" [2b]="2B (32+8)E")
declare -A VANILLA_LABEL=([0.6b]="0.6B 8E" [1b]="1B 16E" [2b]="2B 32E")

all_runs() {
    local size tau
    for size in "${STRATEGY1_SIZES[@]}"; do
        for tau in "${TAUS[@]}"; do echo "moepp-$size-tau$tau"; done
        echo "vanilla-$size"
    done
    echo moepp-7b-s2
    echo moepp-7b-s3
}

# spec RUN -> sets CONFIGS (array), OVERRIDES (array), DESCRIPTION; fails on unknown names.
spec() {
    local run=$1 size tau
    CONFIGS=() OVERRIDES=() DESCRIPTION=""
    if [[ $run =~ ^moepp-(0\.6b|1b|2b)-tau(0\.10|0\.25|0\.50|0\.75|1\.00)$ ]]; then
        size=${BASH_REMATCH[1]} tau=${BASH_REMATCH[2]}
        CONFIGS=("configs/${MOEPP_PRESET[$size]}.yaml" configs/recipes/strategy1.yaml)
        OVERRIDES=("model.moe.tau=$tau" "parallel.expert=${EXPERT_PARALLEL:-8}")
        DESCRIPTION="MoE++ ${LABEL[$size]}, tau $tau, strategy 1 (100B tokens, mixture S1)"
    elif [[ $run =~ ^vanilla-(0\.6b|1b|2b)$ ]]; then
        size=${BASH_REMATCH[1]}
        CONFIGS=("configs/${VANILLA_PRESET[$size]}.yaml" configs/recipes/strategy1.yaml)
        OVERRIDES=("parallel.expert=${EXPERT_PARALLEL:-8}")
        DESCRIPTION="vanilla MoE ${VANILLA_LABEL[$size]}, strategy 1 (100B tokens, mixture S1)"
    elif [ "$run" = moepp-7b-s2 ]; then
        CONFIGS=(configs/moepp-7b-16+4e.yaml configs/recipes/strategy2.yaml)
        DESCRIPTION="MoE++ 7B (16+4)E, strategy 2 (900B tokens, mixture S1), TP=1 PP=8"
    elif [ "$run" = moepp-7b-s3 ]; then
        CONFIGS=(configs/moepp-7b-16+4e.yaml configs/recipes/strategy3.yaml)
        OVERRIDES=("checkpoint.init_from=$RUNS_ROOT/moepp-7b-s2/checkpoints")
        DESCRIPTION="MoE++ 7B, strategy 3 (100B tokens, mixture S2), from moepp-7b-s2's final checkpoint"
    else
        return 1
    fi
}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

dry_run=0 chain=0 after="" names=() extra=()
while [ $# -gt 0 ]; do
    case $1 in
        --list) list=1 ;;
        --dry-run) dry_run=1 ;;
        --chain) chain=${2:?--chain N}; shift ;;
        --after) after=${2:?--after JOBID}; shift ;;
        --) shift; extra=("$@"); break ;;
        -h | --help) usage ;;
        -*) echo "unknown option $1" >&2; usage ;;
        strategy1) mapfile -t group < <(all_runs | grep -v 7b); names+=("${group[@]}") ;;
        7b) names+=(moepp-7b-s2 moepp-7b-s3) ;;
        all) mapfile -t group < <(all_runs); names+=("${group[@]}") ;;
        *) names+=("$1") ;;
    esac
    shift
done

RUNS_ROOT=${RUNS_ROOT:-$REPO/runs}
LOG_DIR=${LOG_DIR:-$RUNS_ROOT/slurm-logs}

if [ "${list:-0}" = 1 ]; then
    while read -r run; do
        spec "$run"
        printf '%-22s %s\n%-22s   %s %s\n' "$run" "$DESCRIPTION" "" "${CONFIGS[*]}" "${OVERRIDES[*]}"
    done < <(all_runs)
    exit 0
fi
[ ${#names[@]} -gt 0 ] || usage
for run in "${names[@]}"; do
    spec "$run" || { echo "unknown run '$run' (see --list)" >&2; exit 2; }
done
[[ $chain =~ ^[0-9]+$ ]] || { echo "--chain takes a number" >&2; exit 2; }
if [ "$dry_run" = 0 ]; then
    for var in DATA_ROOT TOKENIZER; do
        [ -n "${!var:-}" ] || { echo "set $var (see $0 --help)" >&2; exit 2; }
    done
    mkdir -p "$LOG_DIR"
fi

# sbatch options shared by every run.
common=(--nodes="${NODES:-4}" --output="$LOG_DIR/%x-%j.out")
[ "${GPU_GRES:-1}" = 1 ] && [ "${GPUS_PER_NODE:-8}" -gt 0 ] && common+=(--gpus-per-node="${GPUS_PER_NODE:-8}")
[ -n "${PARTITION:-}" ] && common+=(--partition="$PARTITION")
[ -n "${ACCOUNT:-}" ] && common+=(--account="$ACCOUNT")
[ -n "${QOS:-}" ] && common+=(--qos="$QOS")
[ -n "${TIME:-}" ] && common+=(--time="$TIME")
# shellcheck disable=SC2206  # word-split on purpose
common+=(${SBATCH_FLAGS:-})

# What every job gets in its environment (sbatch exports the submitting environment).
export MOEPP_REPO=$REPO
# (a dry run without them shows them as "$DATA_ROOT" / "$TOKENIZER")
# shellcheck disable=SC2016
export DATA_ROOT=${DATA_ROOT:-'$DATA_ROOT'} TOKENIZER=${TOKENIZER:-'$TOKENIZER'}
if [ "${GPUS_PER_NODE:-8}" -gt 0 ]; then NPROC_PER_NODE=${NPROC_PER_NODE:-${GPUS_PER_NODE:-8}}; fi

declare -A job_of=()
for run in "${names[@]}"; do
    spec "$run"
    dependency=""
    if [ "$run" = moepp-7b-s3 ] && [ -n "${job_of[moepp-7b-s2]:-}" ]; then
        dependency=${job_of[moepp-7b-s2]}
    elif [ -n "$after" ]; then
        dependency=$after
        after=""
    fi
    if [ "$chain" -gt 0 ]; then
        submit=(bash "$REPO/scripts/slurm/chain.sh" "$chain" ${dependency:+--after "$dependency"})
    else
        submit=("${SBATCH:-sbatch}" --parsable ${dependency:+--dependency="afterok:$dependency"})
    fi
    submit+=(--job-name="$run" "${common[@]}" "$REPO/scripts/slurm/pretrain.sbatch"
             "${CONFIGS[@]}" ${OVERRIDES[@]+"${OVERRIDES[@]}"} ${extra[@]+"${extra[@]}"})
    environment=(RUN_DIR="$RUNS_ROOT/$run" DATA_ROOT="$DATA_ROOT" TOKENIZER="$TOKENIZER")
    [ -n "${NPROC_PER_NODE:-}" ] && environment+=(NPROC_PER_NODE="$NPROC_PER_NODE")
    if [ "$dry_run" = 1 ]; then
        echo "# $run: $DESCRIPTION"
        # shellcheck disable=SC2016
        printf '%q ' "${environment[@]}" "${submit[@]}" \
            | sed -e 's/ $//' -e 's/\\\$DATA_ROOT/"$DATA_ROOT"/g' -e 's/\\\$TOKENIZER/"$TOKENIZER"/g'
        echo
        job_of[$run]=JOBID_$run
        continue
    fi
    ids=$(env "${environment[@]}" "${submit[@]}") || { echo "submitting $run failed" >&2; exit 1; }
    job_of[$run]=$(tail -n1 <<<"$ids")
    echo "$run: job(s) $(tr '\n' ' ' <<<"$ids")-> $RUNS_ROOT/$run, log $LOG_DIR/$run-<jobid>.out"
done
