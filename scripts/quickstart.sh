#!/usr/bin/env bash
# The main job on the bundled data, offline, on CPU: pretrain the tiny PNet-LLaMA (configs/pretrain/tiny-cpu.yaml,
# ~3 min on 2 cores), evaluate it zero-shot on ARC-Easy / BoolQ / HellaSwag (first EVAL_LIMIT documents of
# each bundled set; EVAL_LIMIT=0 scores them all), write its Table 7 row and its model card.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
EVAL_LIMIT=${EVAL_LIMIT:-500}
RUN=${RUN:-runs/tiny-cpu}
PATH="$PWD/.venv/bin:$PATH"

resume=()
if compgen -G "$RUN/checkpoint-*" >/dev/null; then resume=(--resume); fi  # a killed quickstart continues
if [ ! -f "$RUN/final/model.safetensors" ]; then
    accelerate launch -q --config_file configs/accelerate/single-process.yaml \
        scripts/pretrain.py --config configs/pretrain/tiny-cpu.yaml "output_dir=$RUN" "${resume[@]}"
fi
limit=(); if [ "$EVAL_LIMIT" != 0 ]; then limit=(--limit "$EVAL_LIMIT"); fi
pnet-eval "$RUN/final" --data-dir bundled --batch-size 16 "${limit[@]}" --overwrite   # a rerun scores again
pnet-report "$RUN/final" --out "$RUN/table7.md"
pnet-card "$RUN/final"
echo "done: model $RUN/final (README.md = model card), table $RUN/table7.md, training plot $RUN/training.png"
