#!/usr/bin/env bash
# The project's GPU checks, in the order a short GPU lease should run them (each stage's log in $RESULTS/STAGE.log):
#   cuda   tests/test_cuda.py: bf16 grouped_mm values and gradients against a per-expert fp32 reference, the fp32
#          fallback operator, bf16 autocast training, cached / static-cache generation, a compiled bf16 step
#   bench  bench/bench_moe_gpu.py: routed projection, LLaMA-1B training and generation, PNet / dense ratios
#   eval   SmolLM2-135M-Instruct (models/smollm2-135m-instruct, scripts/get_real_model.sh): full ARC-Easy, BoolQ,
#          HellaSwag and SST-2 sets and held-out perplexity, float32 (as the CPU figures in results/smollm2.md)
#   study  dense vs upcycled continued pretraining of that model, 2 seeds (scripts/gpu/upcycle_smollm2_h200.sh)
#
#   bash scripts/gpu/run_gpu_checks.sh                 # all four stages
#   bash scripts/gpu/run_gpu_checks.sh cuda bench      # some of them
# A failed stage does not stop the next; the exit status is 1 if any failed. PYTHON (default .venv/bin/python) and
# RESULTS (default runs/gpu) are read from the environment.
set -uo pipefail
cd "$(dirname "$0")/../.."
export PYTHON=${PYTHON:-.venv/bin/python} HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
RESULTS=${RESULTS:-runs/gpu}
MODEL=models/smollm2-135m-instruct
STAGES=("$@")
[ ${#STAGES[@]} -eq 0 ] && STAGES=(cuda bench eval study)
for stage in "${STAGES[@]}"; do
    case $stage in cuda|bench|eval|study) ;; *) echo "unknown stage '$stage' (cuda, bench, eval, study)" >&2; exit 2 ;; esac
done
mkdir -p "$RESULTS"

run_stage() {  # NAME COMMAND...: run it, log it, time it; report the load average and the exit status
    local name=$1 start=$SECONDS
    shift
    echo "== $name: start $(date -u +%H:%M:%S), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    "$@" 2>&1 | tee "$RESULTS/$name.log"
    local status=${PIPESTATUS[0]}
    echo "== $name: exit $status after $((SECONDS - start)) s, load average $(cut -d' ' -f1-3 /proc/loadavg)"
    return "$status"
}

failed=0
for stage in "${STAGES[@]}"; do
    case $stage in
        cuda) run_stage cuda "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py ;;
        bench) run_stage bench "$PYTHON" bench/bench_moe_gpu.py ;;
        eval) run_stage eval "$PYTHON" -m pnet_eval.zero_shot "$MODEL" --tasks arc_easy,boolq,hellaswag,sst2 \
                  --perplexity heldout --max-length 2048 --device cuda --dtype float32 --batch-size 64 \
                  --output-dir "$RESULTS/eval" --overwrite ;;
        study) run_stage study bash scripts/gpu/upcycle_smollm2_h200.sh ;;
    esac || failed=1
done
exit $failed
