#!/usr/bin/env bash
# Create .venv and install pnet with every extra (train, eval, vision, peft, gguf, deepspeed, dev) on a machine that has
# only Python. Idempotent: re-running it only installs what is missing.
#   TRANSFORMERS=min bash scripts/setup_env.sh   # the oldest transformers the project declares (CI's second pass)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
# Every install goes through the constraints file: torch stays the local CPU wheel whatever a package asks for.
PIP=".venv/bin/python -m pip"
CONSTRAINTS="-c scripts/constraints-cpu.txt"
$PIP install -q --upgrade pip
$PIP install -q $CONSTRAINTS torch
$PIP install -q $CONSTRAINTS -e ".[train,eval,vision,peft,gguf,dev]"
if [ "${TRANSFORMERS:-}" = "min" ]; then
    # The lower bound of the range pyproject.toml declares (transformers>=A,<B): install exactly A.
    MIN=$(.venv/bin/python -c 'import re, tomllib
deps = " ".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"])
print(re.search(r"transformers>=([0-9.]+)", deps).group(1))')
    $PIP install -q $CONSTRAINTS "transformers==$MIN"
fi
# DeepSpeed. On a CPU machine its CPU ops (CPU Adam, shared-memory comm) are built now rather than
# JIT-compiled for minutes at the first run; on a CUDA machine DeepSpeed builds its CUDA ops when first used.
if ! .venv/bin/python -c "import deepspeed" 2>/dev/null; then
    if command -v nvidia-smi >/dev/null 2>&1; then
        $PIP install -q $CONSTRAINTS "deepspeed==0.19.8"
    else
        $PIP install -q $CONSTRAINTS setuptools wheel  # --no-build-isolation builds with the venv's own tools
        DS_ACCELERATOR=cpu DS_BUILD_OPS=0 DS_BUILD_CPU_ADAM=1 DS_BUILD_SHM_COMM=1 \
            $PIP install -q $CONSTRAINTS --no-build-isolation "deepspeed==0.19.8"
    fi
fi
.venv/bin/python -c "import torch, transformers, accelerate, datasets, deepspeed, lm_eval, modeling_pnet_llama; \
print(f'pnet environment ready: torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}')"
