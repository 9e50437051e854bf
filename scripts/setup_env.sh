#!/usr/bin/env bash
# Create .venv and install pnet with every extra (train, eval, vision, deepspeed, dev) on a machine that has
# only Python. Idempotent: re-running it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# torch first and pinned exactly: anything unpinned would pull a multi-GB CUDA build on a CPU machine.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[train,eval,vision,dev]"
# DeepSpeed. On a CPU machine its CPU ops (CPU Adam, shared-memory comm) are built now rather than
# JIT-compiled for minutes at the first run; on a CUDA machine DeepSpeed builds its CUDA ops when first used.
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        $PIP install -q "deepspeed==0.19.8"
    else
        $PIP install -q setuptools wheel  # --no-build-isolation builds with the venv's own tools
        DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 \
            $PIP install -q --no-build-isolation "deepspeed==0.19.8"
    fi
fi
.venv/bin/python -c "import torch, transformers, accelerate, datasets, deepspeed, lm_eval, modeling_pnet_llama; \
print(f'pnet environment ready: torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}')"
