#!/usr/bin/env bash
# Dependency chain for multi-day runs on clusters where jobs may not requeue themselves:
# submit the same job N times, each link starting after the previous one ended
# (sbatch --dependency=afterany:PREVIOUS). Every link resumes from the run's latest
# checkpoint; a link stopped by the time limit exits 75 instead of requeueing
# (MOEPP_REQUEUE=0), and links after the end of the run exit 0 at once.
#
#   scripts/slurm/chain.sh N [--after JOBID] [sbatch options] scripts/slurm/pretrain.sbatch CONFIG ... [key=value ...]
#
# Prints the N job ids, one per line; the last one ends the chain (make a later stage wait
# for it with --after LAST / --dependency=afterok:LAST). --after JOBID makes the first link
# wait for JOBID to succeed (afterok). The sbatch options apply to every link and must not
# contain --dependency. SBATCH (default: sbatch) is the command used.
set -euo pipefail
usage() {
    echo "usage: $0 N [--after JOBID] [sbatch options] SCRIPT [args ...]" >&2
    exit 2
}
[ $# -ge 2 ] && [[ $1 =~ ^[1-9][0-9]*$ ]] || usage
links=$1
shift
dependency=()
if [ "$1" = --after ]; then
    [ $# -ge 3 ] || usage
    dependency=(--dependency="afterok:$2")
    shift 2
fi
for arg in "$@"; do
    case $arg in --dependency* | -d) echo "$0: use --after instead of $arg" >&2; exit 2 ;; esac
done
export MOEPP_REQUEUE=0
for ((i = 1; i <= links; i++)); do
    out=$(${SBATCH:-sbatch} --parsable ${dependency[@]+"${dependency[@]}"} "$@") || {
        echo "$0: link $i failed: $out" >&2
        exit 1
    }
    previous=${out%%;*}
    dependency=(--dependency="afterany:$previous")
    echo "$previous"
done
