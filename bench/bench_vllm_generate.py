"""Greedy generation throughput of a saved PNet-LLaMA folder: vLLM (pnet's plugin) vs HF `generate`, same prompts, one
run each, in the vLLM venv (scripts/setup_vllm.sh):

    .venv-vllm/bin/python bench/bench_vllm_generate.py runs/tiny-cpu/final      # defaults: 32 prompts x 64 tokens

Prompts are the first documents of the bundled validation text (data/mix), cut to 16..128 tokens. Both sides make
exactly prompts x new-tokens tokens (EOS does not stop them) and run on one thread: vLLM's CPU worker takes one of
this machine's two cores and leaves the other to its scheduler. HF generates the whole batch at once (left padding).
Engine start-up and model loading are timed separately from generation. Also reports whether the greedy tokens of
the two agree (they should, in float32).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
VALIDATION_TEXT = REPO_ROOT / "data" / "mix" / "web" / "validation-00000-of-00001.jsonl.gz"


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    """`count` prompt token-id lists of 16..128 tokens (cycling), from the bundled validation documents."""
    lengths = [16, 32, 64, 128]
    prompts = []
    with gzip.open(VALIDATION_TEXT, "rt", encoding="utf-8") as lines:
        for line in lines:
            ids = tokenizer(json.loads(line)["text"]).input_ids
            length = lengths[len(prompts) % len(lengths)]
            if len(ids) >= length:
                prompts.append(ids[:length])
            if len(prompts) == count:
                return prompts
    raise ValueError(f"{VALIDATION_TEXT} holds fewer than {count} documents long enough")


def bench_hf(model_dir: str, prompts: list[list[int]], new_tokens: int, threads: int) -> tuple[dict, list[list[int]]]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    load_s = time.perf_counter() - start
    width = max(len(p) for p in prompts)
    pad = 0
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=pad,
        )
    generate_s = time.perf_counter() - start
    tokens = out[:, width:].tolist()
    return {"load_s": load_s, "generate_s": generate_s, "threads": threads}, tokens


def bench_vllm(model_dir: str, prompts: list[list[int]], new_tokens: int) -> tuple[dict, list[list[int]]]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=model_dir, dtype="float32", seed=0)
    start_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True)
    requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(requests[:2], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outputs = llm.generate(requests, params, use_tqdm=False)
    generate_s = time.perf_counter() - start
    return {"start_s": start_s, "generate_s": generate_s}, [list(o.outputs[0].token_ids) for o in outputs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for HF (vLLM's CPU worker uses 1 here)")
    args = parser.parse_args()
    # vLLM on CPU otherwise reserves 92% of the machine's memory (--gpu-memory-utilization) and refuses to start
    # when other processes hold more than 8%; 1 GiB of KV cache holds these requests many times over.
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from transformers import AutoTokenizer

    import modeling_pnet_llama  # noqa: F401  (the folder's tokenizer loads without running its code)

    prompts = make_prompts(AutoTokenizer.from_pretrained(args.model_dir), args.prompts)
    generated = args.prompts * args.new_tokens
    hf, hf_tokens = bench_hf(args.model_dir, prompts, args.new_tokens, args.threads)
    vllm, vllm_tokens = bench_vllm(args.model_dir, prompts, args.new_tokens)
    same = sum(a == b for a, b in zip(hf_tokens, vllm_tokens))
    print(
        f"{args.prompts} prompts of 16-128 tokens x {args.new_tokens} new tokens ({generated} tokens), greedy, fp32; "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    print(f"HF generate (batched, {hf['threads']} thread): {generated / hf['generate_s']:.1f} tokens/s "
          f"({hf['generate_s']:.2f} s; load {hf['load_s']:.1f} s)")  # fmt: skip
    print(f"vLLM LLM.generate: {generated / vllm['generate_s']:.1f} tokens/s "
          f"({vllm['generate_s']:.2f} s; engine start {vllm['start_s']:.1f} s)")  # fmt: skip
    print(f"vLLM / HF: {hf['generate_s'] / vllm['generate_s']:.2f}x; identical greedy continuations: "
          f"{same}/{args.prompts}")  # fmt: skip


if __name__ == "__main__":
    main()
