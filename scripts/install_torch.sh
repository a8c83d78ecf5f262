#!/usr/bin/env bash
# torch for a machine without a GPU, installed before anything else can pull PyPI's default
# torch (the CUDA build: 17 nvidia wheels, several GB). Nothing to do when torch is there
# (GPU images bring their own).
set -euo pipefail
if python -c "import torch" 2>/dev/null; then
    exit 0
fi
echo "installing torch 2.13.0, CPU-only build (about 200 MB) ..."
# PyTorch's CPU wheel index has the CPU-only build for any machine; where it cannot be
# reached, PyPI (whose torch is the CPU build on machines with a local CPU wheel).
python -m pip install --quiet --retries 0 --timeout 15 "torch==2.13.0" \
        --index-url https://download.pytorch.org/whl/cpu ||
    python -m pip install --quiet "torch==2.13.0"
