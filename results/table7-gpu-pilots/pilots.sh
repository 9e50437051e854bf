#!/bin/bash
# The Table 7 pilots of this folder's README: scripts/pretrain.py through drive.py (router patches off unless
# ROUTER_MODE is set), one process per run, all runs at once on one GPU. Run from the repository root:
#   bash results/table7-gpu-pilots/pilots.sh <time limit s> "name|ENV=V ...|key=value overrides" ...
# CORPUS (default ../shared/data/corpus) is the offline corpus; logs go to /tmp/p/<name>/log.jsonl.
set -u
limit=$1; shift
corpus=${CORPUS:-../shared/data/corpus}
mkdir -p /tmp/p
# The CPU recipe with the corpus path swapped; precision auto = bf16 autocast on CUDA.
sed "s#\.\./shared/data/corpus#$corpus#g" configs/pretrain/corpus-cpu.yaml > /tmp/p/corpus-gpu.yaml
for spec in "$@"; do
  IFS='|' read -r name envs extra <<< "$spec"
  env $envs OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 timeout "$limit" \
    python3 results/table7-gpu-pilots/drive.py --config /tmp/p/corpus-gpu.yaml output_dir=/tmp/p/$name seed=0 \
      micro_batch_size=8 data.validation_sequences=16 save_every=0 keep_last=1 tensorboard=false log_every=10 $extra \
      > /tmp/p/$name.out 2>&1 &
done
wait
