"""Data pipeline throughput vs training throughput, and dense vs PNet training throughput (CPU, fp32).

Measured in one run, same process, same thread count:

1. data pipeline tokens/s: ``build_train_stream`` of a run config (streaming from the gzip JSONL files +
   tokenisation + packing + interleaving), timed after the first batch (start-up reported separately) for
   ``--pipeline-seconds`` or until the mix is exhausted;
2. training tokens/s of the config's model and of the dense / PNet tiny models: forward + backward + AdamW
   step on real packed batches (``micro_batch_size x seq_len`` tokens per step), after one warm-up step.

Prints the ratio pipeline / training (goal >= 10x: the data never limits training) and PNet / dense.

    python bench/bench_data_pipeline.py [--config configs/pretrain/tiny-cpu.yaml] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

import modeling_pnet_llama  # noqa: E402,F401  (registers pnet_llama)
from pnet.data import DataExhaustedError, PackedBatchIterator, build_train_stream, load_tokenizer  # noqa: E402
from pnet.config import load_pretrain_config as load_config  # noqa: E402


def pipeline_tokens_per_s(config, tokenizer, seconds: float) -> tuple[float, float]:
    """(tokens/s in steady state, seconds to the first batch) of the streaming pipeline."""
    start = time.perf_counter()
    batches = PackedBatchIterator(build_train_stream(config.data, tokenizer, seed=config.seed), config.micro_batch_size)
    batches.next_batch()
    startup = time.perf_counter() - start
    tokens, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            tokens += batches.next_batch().numel()
        except DataExhaustedError:  # the bundled mix is small: time what there is
            break
    return tokens / (time.perf_counter() - start), startup


def train_tokens_per_s(model_file: str, batches: list[torch.Tensor], lr: float) -> tuple[float, int]:
    """(tokens/s of forward + backward + AdamW step, parameter count); the first batch is a warm-up step."""
    with open(model_file, encoding="utf-8") as f:
        model_config = AutoConfig.for_model(**json.load(f))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    routed = model_config.model_type == "pnet_llama"

    def step(batch: torch.Tensor) -> None:
        outputs = model(input_ids=batch, labels=batch, output_router_logits=True) if routed else model(
            input_ids=batch, labels=batch)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(batches[0])
    start = time.perf_counter()
    for batch in batches[1:]:
        step(batch)
    elapsed = time.perf_counter() - start
    return sum(b.numel() for b in batches[1:]) / elapsed, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/pretrain/tiny-cpu.yaml")
    parser.add_argument("--dense-model", default="configs/models/llama-tiny.json")
    parser.add_argument("--pnet-model", default="configs/models/pnet-tiny-down-e8.json")
    parser.add_argument("--train-steps", type=int, default=6, help="timed steps per model (after 1 warm-up)")
    parser.add_argument("--pipeline-seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    config = load_config(args.config)
    tokenizer = load_tokenizer(config.data.tokenizer)
    seq, micro = config.data.seq_len, config.micro_batch_size
    print(f"config {args.config}: seq_len {seq}, micro batch {micro}, {args.threads} threads, fp32 CPU")

    data_tps, startup = pipeline_tokens_per_s(config, tokenizer, args.pipeline_seconds)
    print(f"data pipeline (stream + tokenise + pack + interleave): {data_tps:12,.0f} tokens/s "
          f"(first batch after {startup:.1f} s)")

    stream = PackedBatchIterator(build_train_stream(config.data, tokenizer, seed=config.seed), micro)
    batches = [stream.next_batch() for _ in range(args.train_steps + 1)]
    results = {}
    for name, model_file in (("dense", args.dense_model), ("pnet", args.pnet_model)):
        tps, params = train_tokens_per_s(model_file, batches, config.lr)
        results[name] = tps
        print(f"training {name:5s} {model_file}: {params:,} params, {tps:10,.0f} tokens/s "
              f"({micro} x {seq} tokens per step)")
    with open(config.model, encoding="utf-8") as f:
        config_model = "pnet" if json.load(f)["model_type"] == "pnet_llama" else "dense"
    print(f"ratio data pipeline / training ({config_model}, the config's model): "
          f"{data_tps / results[config_model]:.1f}x (goal >= 10x)")
    print(f"ratio data pipeline / training (dense): {data_tps / results['dense']:.1f}x")
    print(f"ratio training PNet / dense: {results['pnet'] / results['dense']:.2f}x")


if __name__ == "__main__":
    main()
