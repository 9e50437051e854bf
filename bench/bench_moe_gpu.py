"""GPU benchmark: PNet-LLaMA's routed projections and whole-model training against dense LLaMA, bf16, on CUDA.

    python bench/bench_moe_gpu.py                      # both parts, LLaMA-1B shapes
    python bench/bench_moe_gpu.py --part projection    # ExpertLinear vs nn.Linear only (fast)

Part 1: a routed projection (router + `ExpertLinear`, E experts) against the dense projection of the same active
FLOPs, forward+backward, bf16, at the LLaMA-1B FFN shapes (2048 -> 8192 as gate/up, 8192 -> 2048 as down), E = 4
and 8, 8k to 64k tokens, with balanced random routing.
Part 2: training tokens/s (forward+backward+AdamW, bf16 autocast over fp32 master weights, as accelerate's bf16
runs) of LLaMA-1B dense against PNet-LLaMA-1B with up_proj x 8 experts.
Part 3: greedy generation tokens/s of the same two models in bf16 (batch 1 and 8, dynamic cache).

Every comparison is interleaved (rounds alternate baseline and candidate) and reported as a ratio of medians of
--repeats rounds, timed with CUDA events after a warm-up.
"""

import argparse
import json
import os
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_pnet_llama import PNetLlamaConfig, PNetLlamaForCausalLM
from modeling_pnet_llama.routed_linear import ExpertLinear, TopOneRouter

REPO = Path(__file__).resolve().parents[1]


def cuda_median_ms(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 3) -> dict[str, float]:
    """Median over `repeats` interleaved rounds of each function's CUDA time in milliseconds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    torch.cuda.synchronize()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    return {name: statistics.median(values) for name, values in times.items()}


def bench_projection(in_features: int, out_features: int, experts: int, tokens: int, repeats: int) -> dict:
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(tokens, in_features, device=device, dtype=dtype, requires_grad=True)
    upstream = torch.randn(tokens, out_features, device=device, dtype=dtype)
    dense = torch.nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)
    router = TopOneRouter(in_features, experts, jitter_noise=0.0, expert_output_scaling="router_prob").to(device, dtype)
    expert_linear = ExpertLinear(in_features, out_features, experts, capacity_factor=None).to(device, dtype)
    for param in (router.weight, expert_linear.weight):
        torch.nn.init.normal_(param, std=0.02)
    params = [x, dense.weight, router.weight, expert_linear.weight]

    def clear():
        for param in params:
            param.grad = None

    def dense_step():
        clear()
        dense(x).backward(upstream)

    def routed_step():
        clear()
        route = router(x)
        expert_linear(x, route.expert_index, route.expert_scale).backward(upstream)

    result = cuda_median_ms({"dense": dense_step, "routed": routed_step}, repeats)
    result["ratio"] = result["dense"] / result["routed"]
    return result


def build_1b_models() -> dict[str, torch.nn.Module]:
    """LLaMA-1B and PNet-LLaMA-1B (up_proj x 8), fp32, built directly on the GPU (initialising 3B parameters on the
    host would take longer than the benchmark)."""
    dense_config = json.loads((REPO / "configs/models/llama-1b.json").read_text())
    pnet_config = json.loads((REPO / "configs/models/pnet-1b-up-e8.json").read_text())
    for config in (dense_config, pnet_config):
        config.pop("model_type", None)
        config.pop("architectures", None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        return {"dense": LlamaForCausalLM(LlamaConfig(**dense_config)),
                "pnet": PNetLlamaForCausalLM(PNetLlamaConfig(**pnet_config))}


def bench_training(args, models: dict[str, torch.nn.Module]) -> dict:
    device = torch.device("cuda")
    optimizers = {kind: torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True) for kind, model in models.items()}
    batch = torch.randint(3, 32000, (args.batch, args.seq_len), device=device)

    def step(kind: str) -> Callable[[], None]:
        def run():
            model = models[kind].train()
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(batch, labels=batch).loss
            loss.backward()
            optimizers[kind].step()
            optimizers[kind].zero_grad(set_to_none=True)

        return run

    ms = cuda_median_ms({kind: step(kind) for kind in models}, args.repeats)
    tokens = args.batch * args.seq_len
    del optimizers
    for model in models.values():
        model.zero_grad(set_to_none=True)
    return {kind: tokens / (value / 1e3) for kind, value in ms.items()}


def bench_generate(models: dict[str, torch.nn.Module], batch: int, new_tokens: int, repeats: int) -> dict:
    """Greedy tokens/s in bf16 (every call generates exactly `new_tokens` after a 32-token prompt)."""
    bf16 = {kind: model.to(torch.bfloat16).eval() for kind, model in models.items()}
    prompt = torch.randint(3, 32000, (batch, 32), device="cuda", generator=torch.Generator("cuda").manual_seed(0))

    def run(kind: str) -> Callable[[], None]:
        def generate():
            with torch.no_grad():
                bf16[kind].generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                    pad_token_id=0)

        return generate

    ms = cuda_median_ms({kind: run(kind) for kind in bf16}, repeats, warmup=2)
    return {kind: batch * new_tokens / (value / 1e3) for kind, value in ms.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "projection", "training", "generate"], default="all")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=4, help="training: sequences per step")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=32, help="generate: greedy tokens per call")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_moe_gpu.py needs a CUDA device; the CPU benchmark is bench/bench_moe.py")
    import transformers

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"medians of {args.repeats} rounds; host load average {os.getloadavg()[0]:.2f} "
          f"({os.cpu_count()} CPUs) at the start")
    if args.part in ("all", "projection"):
        print("\n[1] routed projection fwd+bwd vs dense projection (ratio = dense time / routed time)")
        for name, (in_f, out_f) in {"gate/up 2048->8192": (2048, 8192), "down 8192->2048": (8192, 2048)}.items():
            for experts in args.experts:
                for tokens in args.tokens:
                    r = bench_projection(in_f, out_f, experts, tokens, args.repeats)
                    print(f"    {name:<18} E={experts} tokens={tokens:>6}: dense {r['dense']:7.2f} ms  "
                          f"routed {r['routed']:7.2f} ms  ratio {r['ratio']:.3f}")
    models = build_1b_models() if args.part in ("all", "training", "generate") else {}
    if args.part in ("all", "training"):
        train = bench_training(args, models)
        print(f"\n[2] LLaMA-1B training tokens/s (batch {args.batch} x {args.seq_len}, bf16 autocast, fused AdamW)")
        print(f"    dense {train['dense']:9.0f}   pnet up x8 {train['pnet']:9.0f}   ratio "
              f"{train['pnet'] / train['dense']:.3f}")
    if args.part in ("all", "generate"):
        print(f"\n[3] LLaMA-1B greedy generation tokens/s (bf16, {args.new_tokens} new tokens, dynamic cache)")
        for batch in (1, 8):
            gen = bench_generate(models, batch, args.new_tokens, max(3, args.repeats // 2))
            print(f"    batch {batch}: dense {gen['dense']:8.1f}   pnet up x8 {gen['pnet']:8.1f}   ratio "
                  f"{gen['pnet'] / gen['dense']:.3f}")
    print(f"\nhost load average {os.getloadavg()[0]:.2f} at the end")


if __name__ == "__main__":
    main()
