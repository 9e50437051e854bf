"""Greedy tokens of `vllm serve DIR` (the OpenAI completions endpoint) against HF `generate` on the same folder.

    .venv/bin/python bench/vllm_serve_greedy.py hf DIR runs/hf-5.25.json            # any venv: HF reference
    .venv-vllm/bin/python bench/vllm_serve_greedy.py hf DIR runs/hf-5.19.json
    .venv-vllm/bin/python bench/vllm_serve_greedy.py serve DIR runs/served.json     # starts and stops the server
    python3 bench/vllm_serve_greedy.py compare runs/served.json runs/hf-5.19.json runs/hf-5.25.json

HF decodes each prompt on its own (no padding), fp32; the server is queried one prompt at a time with temperature 0
and `ignore_eos`, so both sides make exactly --new-tokens tokens. Each step prints its wall time and load average.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import urllib.request
from pathlib import Path

from pnet.vllm_server import vllm_server

PROMPTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Photosynthesis is the process by which plants",
    "The three primary colors are",
    "Q: What is 12 times 12?\nA:",
    "In 1905, Albert Einstein published four papers that changed physics: on the photoelectric effect, Brownian "
    "motion, special relativity and",
    "Here is a short recipe for pancakes:",
)


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def write(out: str, record: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps(record) + "\n")
    print(f"{out}: {record['source']}, {record['wall_s']:.1f} s, load average before {record['load_before']}")


def hf(model_dir: str, out: str, new_tokens: int) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import modeling_pnet_llama  # noqa: F401  (registers pnet_llama: the folder's code need not run)

    load_before, start = load_average(), time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokens = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, return_tensors="pt").input_ids
            out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                     min_new_tokens=new_tokens, do_sample=False)
            tokens.append(out_ids[0, ids.shape[1]:].tolist())
    write(out, {"source": f"HF generate, transformers {transformers.__version__}, torch {torch.__version__}",
                "tokens": tokens, "text": tokenizer.batch_decode(tokens), "wall_s": time.perf_counter() - start,
                "load_before": load_before})


def serve(model_dir: str, out: str, new_tokens: int) -> None:
    env = {**os.environ}
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")  # GiB; vLLM's default (92% of memory) fails on a shared machine
    load_before, start = load_average(), time.perf_counter()
    # No start deadline: a large model compiles for minutes on a loaded CPU (the 692M upcycle took 298 s).
    with vllm_server(model_dir, Path(out).with_suffix(".serve.log"), "model", env=env, timeout_s=None) as url:
        ready_s = time.perf_counter() - start
        tokens, text = [], []
        for prompt in PROMPTS:
            body = {"model": "model", "prompt": prompt, "max_tokens": new_tokens, "min_tokens": new_tokens,
                    "temperature": 0.0, "ignore_eos": True, "return_token_ids": True}
            request = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(),
                                             {"Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=600) as response:
                choice = json.loads(response.read())["choices"][0]
            tokens.append(choice["token_ids"])
            text.append(choice["text"])
    import vllm

    write(out, {"source": f"vllm serve, vllm {vllm.__version__}", "tokens": tokens, "text": text,
                "wall_s": time.perf_counter() - start, "server_ready_s": ready_s, "load_before": load_before})


def compare(served: str, references: list[str]) -> None:
    got = json.loads(Path(served).read_text())
    for reference in references:
        expected = json.loads(Path(reference).read_text())
        same = sum(a == b for a, b in zip(got["tokens"], expected["tokens"]))
        print(f"{got['source']} vs {expected['source']}: identical greedy continuations {same}/{len(PROMPTS)}")
    for prompt, text in zip(PROMPTS, got["text"]):
        print(f"  {prompt!r} -> {text!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("hf", "serve"):
        step = sub.add_parser(name)
        step.add_argument("model_dir")
        step.add_argument("out", help="JSON file to write the tokens to")
        step.add_argument("--new-tokens", type=int, default=32)
    step = sub.add_parser("compare")
    step.add_argument("served")
    step.add_argument("references", nargs="+")
    args = parser.parse_args()
    if args.command == "compare":
        compare(args.served, args.references)
    else:
        {"hf": hf, "serve": serve}[args.command](args.model_dir, args.out, args.new_tokens)


if __name__ == "__main__":
    main()
