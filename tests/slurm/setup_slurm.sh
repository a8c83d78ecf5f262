#!/usr/bin/env bash
# Install what tests/slurm needs: Debian's Slurm (slurmctld, slurmd, client commands) and
# munge. Idempotent: does nothing when they are already there. Needs root and apt-get
# (CI: Debian 12). The tests start their own one-node cluster on the loopback address with
# their own munge key, socket, ports and state directories (tests/slurm/cluster.py); the
# system services these packages install are neither configured nor used.
set -euo pipefail
needed=(slurmctld slurmd sbatch srun scontrol squeue scancel munged)
missing=()
for cmd in "${needed[@]}"; do
    PATH=$PATH:/usr/sbin:/sbin command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if [ ${#missing[@]} -eq 0 ]; then
    echo "setup_slurm.sh: Slurm and munge are installed"
    exit 0
fi
echo "setup_slurm.sh: missing ${missing[*]}; installing Debian's slurmctld slurmd slurm-client munge"
if [ "$(id -u)" != 0 ]; then
    echo "setup_slurm.sh: needs root to apt-get install (run: sudo bash $0)" >&2
    exit 1
fi
if ! command -v apt-get >/dev/null; then
    echo "setup_slurm.sh: no apt-get on this machine; install Slurm (slurmctld, slurmd, client) and munge by hand" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge >/dev/null
echo "setup_slurm.sh: installed $(PATH=$PATH:/usr/sbin slurmctld -V)"
