#!/usr/bin/env bash
# The GPU check (moepp_megatron/bench/gpu_check.py): everything only a GPU can show, < 8 min.
#   scripts/gpu_check.sh prepare            on a CPU machine with network: pinned wheels -> .whl/
#   scripts/gpu_check.sh [--out DIR]        on the GPU (Python 3.12, CUDA torch, no network)
#   scripts/gpu_check.sh --cpu-dry-run ...  the same stages on CPU at tiny shapes (CI)
# On the GPU the wheels in .whl/ are installed offline into a target directory first, unless
# megatron-core already imports.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = prepare ]; then
    exec python3 -m moepp_megatron.bench.gpu_check prepare
fi
site=${MOEPP_GPU_CHECK_SITE:-/tmp/moepp-gpu-check-site}
if ! python3 -c "import megatron.core" 2>/dev/null; then
    shopt -s nullglob
    wheels=(.whl/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "$0: megatron-core is not installed and .whl/ holds no wheels: run '$0 prepare' where there is network" >&2
        exit 2
    fi
    echo "installing ${#wheels[@]} wheel(s) from .whl/ into $site (offline)"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The package runs from this checkout (no install needed).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 -m moepp_megatron.bench.gpu_check run "$@"
