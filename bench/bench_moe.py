"""Benchmark PNet-LLaMA's routed projections against dense LLaMA, measured in the same run (CPU, fp32).

    python bench/bench_moe.py                  # 1 and 2 threads, medians of --repeats rounds
    python bench/bench_moe.py --threads 1      # one thread count
    python bench/bench_moe.py --parts generation --hidden 1024   # one part, a larger model

Every comparison is interleaved (each round runs baseline and candidate in rotating order) and reported as the ratio
of medians, so load from other processes hits both sides alike, with the lowest and highest ratio of single rounds
beside it; absolute numbers still move with that load, which is printed at the start (and should be below ~0.5 for
figures worth quoting).

Prints, per thread count, each as a ratio against its baseline from this run (goals from issue 12):
  1. routed projection (router + ExpertLinear, E experts) forward+backward vs the dense projection of the same active
     FLOPs (goal >= 0.90); the same with the router compiled (logits, softmax and top-1 fused: the candidate fast
     path); the experts alone (sort + grouped matmul, no router; goal >= 0.95); the products alone (the floor of
     any implementation on these kernels, see `products_floor`); a naive per-expert loop; and one decode token
     through ExpertLinear's CPU decode path vs the general routed matmul;
  2. whole-model training tokens/s, PNet (E experts on one projection) vs dense LLaMA of the same dims, forward+backward
     (goal >= 0.95) and with the AdamW step (which scales with parameters, not tokens);
  3. greedy generation tokens/s, batch 1, KV cache (goal >= 0.95); the router's per-token cost is fixed, so the
     ratio grows with the model (`--hidden 1024`);
  4. once: peak resident memory of building each model and running two AdamW steps, each in a fresh process.

`--against REV` adds the model package of a git revision (e.g. the commit an issue was filed on) as a third model with
the same weights to parts 2 and 3, so that "speed holds" is a same-run ratio, not a comparison of figures taken on
different days.
"""

import argparse
import atexit
import importlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from modeling_pnet_llama import PNetLlamaConfig, PNetLlamaForCausalLM
from modeling_pnet_llama.routed_linear import ExpertLinear, TopOneRouter, routed_matmul, sort_by_expert


PARTS = ("projection", "training", "generation", "memory")  # [1] to [4] of the docstring


def interleaved_seconds(fns: dict[str, Callable[[], object]], repeats: int, inner: int = 1) -> dict[str, list[float]]:
    """Per round (`repeats` of them), the mean wall time of `inner` calls of each function. Each round runs every
    function once, in rotating order, so that load from other processes on a shared machine hits all alike."""
    for fn in fns.values():  # warm-up
        fn()
    names = list(fns)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            for _ in range(inner):
                fns[name]()
            times[name].append((time.perf_counter() - start) / inner)
    return times


def medians(times: dict[str, list[float]]) -> dict[str, float]:
    return {name: statistics.median(values) for name, values in times.items()}


def round_ratios(times: dict[str, list[float]], baseline: str, candidate: str) -> str:
    """The lowest and highest per-round throughput ratio candidate / baseline: how far this machine's noise moves the
    ratio of medians that the report quotes."""
    ratios = [base / cand for base, cand in zip(times[baseline], times[candidate])]
    return f"(rounds {min(ratios):.2f}-{max(ratios):.2f})"


def candidate_spreads(rounds: dict[str, list[float]]) -> dict[tuple[str, str], str]:
    """The round spread of every (baseline, candidate) pair printed: each model against dense, and today's PNet
    against the PNet of `--against`."""
    pairs = [("dense", kind) for kind in rounds if kind != "dense"]
    pairs += [(kind, "pnet") for kind in rounds if kind.startswith("pnet@")]
    return {pair: round_ratios(rounds, *pair) for pair in pairs}


def print_ratios(throughput: dict, goal: str) -> None:
    """One line per (baseline, candidate) pair of `throughput` (tokens/s per model, its "spread" from
    `candidate_spreads`)."""
    for (baseline, candidate), spread in throughput["spread"].items():
        ratio = throughput[candidate] / throughput[baseline]
        goal_note = goal if (baseline, candidate) == ("dense", "pnet") else ""
        print(f"      {candidate + ' / ' + baseline:<25} {ratio:.3f} {spread}{goal_note}")


def model_configs(args) -> tuple[dict, dict]:
    dense = dict(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        max_position_embeddings=max(2048, args.seq_len + args.new_tokens + 16),
        bos_token_id=1,
        eos_token_id=2,
    )
    pnet = dict(dense, num_experts=args.experts, moe_projections=[args.projection])
    return dense, pnet


def build(kind: str, args) -> torch.nn.Module:
    dense, pnet = model_configs(args)
    torch.manual_seed(0)
    if kind == "dense":
        return LlamaForCausalLM(LlamaConfig(**dense))
    return PNetLlamaForCausalLM(PNetLlamaConfig(**pnet))


def package_at_revision(revision: str):
    """`modeling_pnet_llama` as it was at git `revision`, imported under another name beside today's package. Its
    `__init__` (which would re-register the Auto classes) is left out: the bench builds the classes directly."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    archive = subprocess.run(
        ["git", "-C", repo, "archive", revision, "modeling_pnet_llama"], capture_output=True, check=False
    )
    if archive.returncode:
        raise SystemExit(f"--against {revision!r}: git archive failed: {archive.stderr.decode().strip()}")
    root = tempfile.mkdtemp(prefix="pnet-bench-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    name = "pnet_llama_at_" + "".join(c if c.isalnum() else "_" for c in revision)
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    os.rename(os.path.join(root, "modeling_pnet_llama"), os.path.join(root, name))
    open(os.path.join(root, name, "__init__.py"), "w").close()
    sys.path.insert(0, root)
    configuration = importlib.import_module(f"{name}.configuration_pnet_llama")
    modeling = importlib.import_module(f"{name}.modeling_pnet_llama")
    return configuration.PNetLlamaConfig, modeling.PNetLlamaForCausalLM


def build_at_revision(revision: str, args, same_weights_as: torch.nn.Module) -> torch.nn.Module:
    config_class, model_class = package_at_revision(revision)
    model = model_class(config_class(**model_configs(args)[1]))
    model.load_state_dict(same_weights_as.state_dict(), strict=True)  # same weights: same routing, same work
    return model


@torch.no_grad()
def products_alone(
    sorted_x: torch.Tensor,
    sorted_upstream: torch.Tensor,
    router_upstream: torch.Tensor,
    end_offsets: torch.Tensor,
    router_weight: torch.Tensor,
    expert_weight: torch.Tensor,
) -> tuple[torch.Tensor, ...]:
    """The floor of a routed projection's forward+backward on these kernels: only the products no implementation can
    drop, on tokens already sorted by expert (group e ends at `end_offsets[e]`). The experts' three grouped products
    and the router's three, the router's input gradient written into the experts' (the fused-router lever, free);
    no sort, permutation, softmax, top-1, scaling or autograd. Returns (output, router logits, input gradient,
    expert-weight gradient, router-weight gradient), all in sorted token order."""
    output = F.grouped_mm(sorted_x, expert_weight.transpose(-2, -1), offs=end_offsets)
    router_logits = F.linear(sorted_x, router_weight)
    input_grad = F.grouped_mm(sorted_upstream, expert_weight, offs=end_offsets)
    input_grad.addmm_(router_upstream, router_weight)
    expert_grad = F.grouped_mm(sorted_upstream.t(), sorted_x, offs=end_offsets)
    router_grad = router_upstream.t() @ sorted_x
    return output, router_logits, input_grad, expert_grad, router_grad


def bench_projection(args) -> dict:
    """One routed projection (router + experts) vs the dense projection vs a naive per-expert loop."""
    tokens, experts = args.batch * args.seq_len, args.experts
    in_f, out_f = (4 * args.hidden, args.hidden) if args.projection == "down" else (args.hidden, 4 * args.hidden)
    torch.manual_seed(0)
    x = torch.randn(tokens, in_f, requires_grad=True)
    upstream = torch.randn(tokens, out_f)
    dense = torch.nn.Linear(in_f, out_f, bias=False)
    router = TopOneRouter(in_f, experts, jitter_noise=0.0, expert_output_scaling="router_prob")
    expert_linear = ExpertLinear(in_f, out_f, experts, capacity_factor=None)
    torch.nn.init.normal_(router.weight, std=0.02)
    torch.nn.init.normal_(expert_linear.weight, std=0.02)

    parameters = [x, dense.weight, router.weight, expert_linear.weight]

    def clear_grads():  # as `zero_grad(set_to_none=True)` in training: no accumulation into old gradients
        for param in parameters:
            param.grad = None

    def dense_step():
        clear_grads()
        y = dense(x)
        y.backward(upstream)

    def routed_step():
        clear_grads()
        route = router(x)
        y = expert_linear(x, route.expert_index, route.expert_scale)
        y.backward(upstream)

    with torch.no_grad():
        fixed_route = router(x)

    def experts_only_step():  # without the router: what the sort + grouped matmul costs by itself
        clear_grads()
        y = expert_linear(x, fixed_route.expert_index, fixed_route.expert_scale)
        y.backward(upstream)

    compiled_router = torch.compile(router, fullgraph=True)

    def fused_router_step():  # the router's logits, softmax and top-1 fused by inductor into one compiled region
        clear_grads()
        route = compiled_router(x)
        y = expert_linear(x, route.expert_index, route.expert_scale)
        y.backward(upstream)

    order, _, end = sort_by_expert(fixed_route.expert_index, experts)
    sorted_x, sorted_upstream, offsets = x.detach()[order], upstream[order], end.to(torch.int32)
    router_upstream = torch.randn(tokens, experts)

    def products_floor():
        products_alone(sorted_x, sorted_upstream, router_upstream, offsets, router.weight, expert_linear.weight)

    def naive_step():
        clear_grads()
        route = router(x)
        y = torch.zeros(tokens, out_f)
        for e in range(experts):  # the loop the grouped path replaces
            idx = (route.expert_index == e).nonzero().squeeze(-1)
            if idx.numel():
                part = F.linear(x[idx], expert_linear.weight[e]) * route.expert_scale[idx, None]
                y = y.index_add(0, idx, part)
        y.backward(upstream)

    rounds = interleaved_seconds(
        {
            "dense": dense_step,
            "routed": routed_step,
            "fused_router": fused_router_step,
            "experts_only": experts_only_step,
            "products_floor": products_floor,
            "naive_loop": naive_step,
        },
        args.repeats,
        inner=3,
    )
    result = medians(rounds)
    result["spread"] = {
        name: round_ratios(rounds, "dense", name)
        for name in ("routed", "fused_router", "experts_only", "products_floor")
    }
    # Decode (one token, no gradient): ExpertLinear's CPU decode path vs the general routed matmul vs dense.
    one, index = x[:1].detach(), fixed_route.expert_index[:1]
    with torch.no_grad():
        decode = medians(interleaved_seconds(
            {
                "dense": lambda: dense(one),
                "decode_path": lambda: expert_linear(one, index, fixed_route.expert_scale[:1]),
                "routed_matmul": lambda: routed_matmul(one, expert_linear.weight, index),
            },
            args.repeats,
            inner=200,
        ))
    result["decode"] = decode
    counts = torch.bincount(router(x).expert_index, minlength=experts).tolist()
    result["tokens_per_expert"] = counts
    result["shape"] = f"{args.projection}: {tokens} tokens x ({in_f} -> {out_f}), E={experts}"
    return result


def bench_training(args, models: dict) -> dict:
    """Tokens/s of forward+backward, and of a full step with AdamW (whose cost grows with the parameter count, not
    the token count: it amortises over larger batches)."""
    torch.manual_seed(1)
    batch = torch.randint(3, args.vocab, (args.batch, args.seq_len))
    optimizers = {kind: torch.optim.AdamW(model.parameters(), lr=1e-4) for kind, model in models.items()}

    def forward_backward(kind: str) -> Callable[[], None]:
        def run():
            models[kind].train()
            models[kind].zero_grad(set_to_none=True)
            models[kind](batch, labels=batch).loss.backward()

        return run

    def full_step(kind: str) -> Callable[[], None]:
        def run():
            forward_backward(kind)()
            optimizers[kind].step()

        return run

    tokens = args.batch * args.seq_len
    result = {}
    for key, fn in (("fwd_bwd", forward_backward), ("step", full_step)):
        rounds = interleaved_seconds({kind: fn(kind) for kind in models}, args.repeats)
        result[key] = {kind: tokens / seconds for kind, seconds in medians(rounds).items()}
        result[key]["spread"] = candidate_spreads(rounds)
    return result


def bench_generation(args, models: dict) -> dict:
    torch.manual_seed(2)
    prompt = torch.randint(3, args.vocab, (1, 16))

    def generate(kind: str) -> Callable[[], None]:
        def run():
            models[kind].eval()
            with torch.inference_mode():
                # eos disabled so that both models generate exactly `new_tokens` tokens
                models[kind].generate(
                    prompt,
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    use_cache=True,
                    eos_token_id=None,
                    pad_token_id=0,
                )

        return run

    rounds = interleaved_seconds({kind: generate(kind) for kind in models}, args.repeats)
    result = {kind: args.new_tokens / seconds for kind, seconds in medians(rounds).items()}
    result["spread"] = candidate_spreads(rounds)
    return result


def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(kind: str, args) -> None:
    """Runs in a fresh process: builds the model and runs two AdamW training steps; prints the peak resident memory
    above the post-import baseline (Linux: the peak VmHWM is reset through /proc/self/clear_refs after imports)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    baseline = _rss_mib("VmRSS")
    model = build(kind, args).train()
    batch = torch.randint(3, args.vocab, (args.batch, args.seq_len))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(2):
        loss = model(batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    params = sum(p.numel() for p in model.parameters())
    print(json.dumps({"kind": kind, "params": params, "peak_mib": _rss_mib("VmHWM") - baseline}))


def bench_memory(args) -> dict:
    result = {}
    for kind in ("dense", "pnet"):
        command = [sys.executable, __file__, "--memory-child", kind] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("memory_child", "threads", "parts", "against")
        ] + ["--threads", str(args.threads[0])]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result[kind] = json.loads(out.strip().splitlines()[-1])
    return result


def print_projection(proj: dict) -> None:
    print(f"[1] routed projection fwd+bwd, {proj['shape']}, tokens per expert {proj['tokens_per_expert']}")
    for name in ("dense", "routed", "fused_router", "experts_only", "products_floor", "naive_loop"):
        print(f"    {name:<12} {proj[name] * 1e3:8.2f} ms")
    spread = proj["spread"]
    print(f"    routed / dense throughput        {proj['dense'] / proj['routed']:.3f} {spread['routed']}"
          "   (goal >= 0.90)")
    print(f"    fused router / dense throughput  {proj['dense'] / proj['fused_router']:.3f} {spread['fused_router']}"
          "   (worth keeping if above routed)")
    print(f"    experts only / dense throughput  {proj['dense'] / proj['experts_only']:.3f} {spread['experts_only']}"
          "   (goal >= 0.95)")
    print(f"    products alone / dense           {proj['dense'] / proj['products_floor']:.3f} "
          f"{spread['products_floor']}   (the floor: a goal above it needs other kernels)")
    print(f"    routed / naive-loop throughput   {proj['naive_loop'] / proj['routed']:.3f}")
    decode = proj["decode"]
    print(f"    decode, 1 token: dense {decode['dense'] * 1e6:.1f} us, decode path "
          f"{decode['decode_path'] * 1e6:.1f} us, routed matmul {decode['routed_matmul'] * 1e6:.1f} us; "
          f"decode path / routed matmul throughput {decode['routed_matmul'] / decode['decode_path']:.3f}")


def weight_mib(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--projection", choices=["gate", "up", "down"], default="down")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="which parts to run")
    parser.add_argument(
        "--against", metavar="REV", help="also time the model package of this git revision (parts 2 and 3)"
    )
    parser.add_argument("--memory-child", choices=["dense", "pnet"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        torch.set_num_threads(args.threads[0])
        memory_child(args.memory_child, args)
        return
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())} ({os.cpu_count()} CPUs)")
    print(f"torch {torch.__version__}, fp32, medians of {args.repeats} interleaved rounds")
    print(f"config: {json.dumps({k: v for k, v in vars(args).items() if k != 'memory_child'})}")
    models = {"dense": build("dense", args), "pnet": build("pnet", args)}
    if args.against:
        models[f"pnet@{args.against}"] = build_at_revision(args.against, args, same_weights_as=models["pnet"])
    for threads in args.threads:
        torch.set_num_threads(threads)
        print(f"\n===== {threads} thread(s) =====")
        if "projection" in args.parts:
            print_projection(bench_projection(args))
        if "training" in args.parts:
            train = bench_training(args, models)
            print(f"[2] training tokens/s, batch {args.batch} x {args.seq_len}")
            for key, label, goal in (("fwd_bwd", "forward+backward", "   (goal >= 0.95)"),
                                     ("step", "step incl. AdamW", "")):
                print(f"    {label:<17} " + "   ".join(f"{kind} {train[key][kind]:9.1f}" for kind in models))
                print_ratios(train[key], goal)
        if "generation" in args.parts:
            gen = bench_generation(args, models)
            print(f"[3] greedy generation tokens/s, batch 1, KV cache, {args.new_tokens} new tokens; fp32 weights: "
                  + ", ".join(f"{kind} {weight_mib(model):.0f} MiB" for kind, model in models.items()))
            print("    " + "   ".join(f"{kind} {gen[kind]:9.1f}" for kind in models))
            print_ratios(gen, "   (goal >= 0.95)")

    if "memory" in args.parts:
        mem = bench_memory(args)
        print("\n[4] peak resident memory of build + 2 AdamW steps above the import baseline (fresh process each)")
        for kind in ("dense", "pnet"):
            print(f"    {kind:<6} params {mem[kind]['params']:>11,d}   peak {mem[kind]['peak_mib']:8.1f} MiB")
        print(f"    pnet / dense: peak {mem['pnet']['peak_mib'] / mem['dense']['peak_mib']:.3f} for "
              f"{mem['pnet']['params'] / mem['dense']['params']:.2f}x the parameters")
    print(f"\nload average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
