"""CPU latency of ParameterNet vs the GhostNet of the same FLOPs class: eager torch and onnxruntime, ratios measured
in one run.

    python bench/vision_latency.py --runs 20                      # 300M and 600M, batch 1 and 8, 1 and 2 threads
    python bench/vision_latency.py --sizes 300m --batch-sizes 1 --threads 1 --repeats 3 --skip-onnx   # quick look

For each pair (ghostnet-XXXm.json, parameternet-XXXm.json in configs/vision, random weights, 224x224) both models
are measured in their inference form, `reparameterize()` (BatchNorm folded into the convolution before it: static,
or each expert of a dynamic one; `--as-trained` measures the training form instead), on:
  * eager torch, NCHW and (batch 1) channels-last (`torch.inference_mode`);
  * onnxruntime at its default level ORT_ENABLE_ALL and at ORT_ENABLE_EXTENDED (without the NCHWc layout transform,
    which takes only convolutions whose weight is a constant; a dynamic convolution's per-sample kernel is not).
Every (batch size, threads, backend) cell runs `--repeats` rounds; in each round the two models are called
alternately (`--runs` timed calls each at batch 1, a quarter of that at batch 8), so that load drifts on a shared
machine hit both alike. The ratio ParameterNet / GhostNet of each round is taken from the two medians of that round;
the table shows the median ratio over rounds and its range. Goal: ratio <= 1.15 at batch 1 in every column (the
FLOPs ratio is 1.033 / 1.034; the paper measures ONNX on one Xeon thread). Batch 8 is reported as throughput.
The machine's load average is printed at the start and the end: a figure taken at load > ~0.5 is not a figure.

`--routing-ablation` adds two ParameterNet variants to the eager batch-1 rounds, to bound what faster routing code
could gain: every dynamic convolution given fixed coefficients (no pooling, no router: the kernel mixing and the
convolution alone), and pooling only (the global average pooling each router reads, then fixed coefficients).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from export_onnx import export_onnx  # noqa: E402  (scripts/ is not a package)

from modeling_parameternet import ParameterNetConfig, ParameterNetForImageClassification  # noqa: E402
from modeling_parameternet.modeling_parameternet import DynamicConv2d  # noqa: E402
from pnet.vision_counting import count_parameternet  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "vision")
GOAL_RATIO = 1.15
BACKENDS = ("eager", "eager-channels-last", "ort-all", "ort-extended")


def build(name: str, as_trained: bool) -> tuple[ParameterNetForImageClassification, dict]:
    with open(os.path.join(CONFIG_DIR, f"{name}.json")) as f:
        config_dict = json.load(f)
    config_dict.pop("model_type", None)
    torch.manual_seed(0)
    model = ParameterNetForImageClassification(ParameterNetConfig(**config_dict)).eval()
    return (model if as_trained else model.reparameterize()), config_dict


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose 4-D convolution weights are channels-last (dynamic kernels are built per call and converted by the
    convolution)."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.weight.data = module.weight.data.contiguous(memory_format=torch.channels_last)
    return model


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def time_rounds(runners: dict[str, callable], warmup: int, runs: int, repeats: int) -> list[dict[str, float]]:
    """For each round, the median seconds per call of each runner, calls interleaved round-robin."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    rounds = []
    for _ in range(repeats):
        samples = {name: [] for name in runners}
        for _ in range(runs):
            for name, run in runners.items():
                start = time.perf_counter()
                run()
                samples[name].append(time.perf_counter() - start)
        rounds.append({name: statistics.median(values) for name, values in samples.items()})
    return rounds


def with_fixed_routing(model: torch.nn.Module, pool: bool) -> torch.nn.Module:
    """A copy of `model` whose dynamic convolutions mix their experts with fixed coefficients (batch 1): routing
    costs nothing, or (`pool`) only the global average pooling of its input."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if isinstance(module, DynamicConv2d):
            coefficients = torch.full((1, module.num_experts), 1.0 / module.num_experts)

            def fixed(hidden_states, coefficients=coefficients):
                if pool:
                    hidden_states.mean(dim=(2, 3))
                return coefficients

            module.routing_weights = fixed
    return model


ABLATIONS = {"routing fixed": dict(pool=False), "pooling only": dict(pool=True)}  # --routing-ablation


def eager_runner(model: torch.nn.Module, pixel_values: torch.Tensor):
    def run():
        with torch.inference_mode():
            model(pixel_values=pixel_values)

    return run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["300m", "600m"], choices=["300m", "600m"])
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--runs", type=int, default=20, help="timed calls per model per round at batch 1")
    parser.add_argument("--repeats", type=int, default=5, help="rounds per cell (>= 5 for a reported figure)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--skip-onnx", action="store_true")
    parser.add_argument("--as-trained", action="store_true", help="measure the models without reparameterize()")
    parser.add_argument(
        "--routing-ablation", action="store_true",
        help="eager batch 1 also times ParameterNet with fixed routing coefficients, and with pooling only",
    )
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    for name in ("runs", "repeats"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name} {getattr(args, name)} is invalid; allowed: an integer >= 1")
    if any(b < 1 for b in args.batch_sizes) or any(t < 1 for t in args.threads):
        raise ValueError(f"--batch-sizes {args.batch_sizes} / --threads {args.threads}: allowed: integers >= 1")
    backends = [b for b in args.backends if not (args.skip_onnx and b.startswith("ort"))]

    import onnxruntime as ort

    start_load = load_average()
    print(f"start: {start_load}; {platform.processor() or platform.machine()}; torch {torch.__version__}, "
          f"onnxruntime {ort.__version__}, exporter {args.exporter}")
    levels = {"ort-all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
              "ort-extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED}

    print(header())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            names = (f"ghostnet-{size}", f"parameternet-{size}")
            models, flops = {}, {}
            for name in names:
                models[name], config_dict = build(name, args.as_trained)
                flops[name] = count_parameternet(config_dict, name=name, image_size=args.image_size).flops
            models_cl = {name: channels_last(model) for name, model in models.items()}
            for batch_size in args.batch_sizes:
                pixel_values = torch.randn(batch_size, 3, args.image_size, args.image_size)
                pixel_values_cl = pixel_values.contiguous(memory_format=torch.channels_last)
                onnx_paths = {}
                if any(b.startswith("ort") for b in backends):
                    for name, model in models.items():
                        onnx_paths[name] = export_onnx(
                            model, os.path.join(tmp, f"{name}-b{batch_size}.onnx"), batch_size, args.image_size,
                            args.exporter,
                        )
                runs = args.runs if batch_size == 1 else max(2, args.runs // 4)
                for threads in args.threads:
                    torch.set_num_threads(threads)
                    for backend in backends:
                        if backend == "eager-channels-last" and batch_size > 1:
                            continue  # a batch folds into the groups of an NCHW convolution: channels-last copies
                        if backend == "eager":
                            runners = {n: eager_runner(m, pixel_values) for n, m in models.items()}
                            if args.routing_ablation and batch_size == 1:
                                for label, options in ABLATIONS.items():
                                    ablated = with_fixed_routing(models[names[1]], **options)
                                    runners[label] = eager_runner(ablated, pixel_values)
                        elif backend == "eager-channels-last":
                            runners = {n: eager_runner(m, pixel_values_cl) for n, m in models_cl.items()}
                        else:
                            options = ort.SessionOptions()
                            options.intra_op_num_threads = threads
                            options.inter_op_num_threads = 1
                            options.graph_optimization_level = levels[backend]
                            feed = {"pixel_values": pixel_values.numpy()}
                            runners = {}
                            for name in names:
                                session = ort.InferenceSession(onnx_paths[name], options, providers=["CPUExecutionProvider"])
                                runners[name] = lambda session=session: session.run(["logits"], feed)
                        rounds = time_rounds(runners, args.warmup, runs, args.repeats)
                        for candidate in list(runners)[1:]:  # ParameterNet, then any ablations
                            ratios = [r[candidate] / r[names[0]] for r in rounds]
                            row = {
                                "size": size, "batch_size": batch_size, "threads": threads,
                                "backend": backend if candidate == names[1] else f"{backend} ({candidate})",
                                "ghostnet_ms": 1e3 * statistics.median(r[names[0]] for r in rounds),
                                "parameternet_ms": 1e3 * statistics.median(r[candidate] for r in rounds),
                                "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                                "flops_ratio": flops[names[1]] / flops[names[0]],
                                "ablation": candidate in ABLATIONS,
                            }
                            rows.append(row)
                            print(format_row(row), flush=True)

    end_load = load_average()
    print(f"\nend: {end_load}")
    print(f"form: {'as trained' if args.as_trained else 'reparameterize() (BatchNorm folded)'}; "
          f"{args.repeats} rounds x {args.runs} calls (batch 1; batch > 1: {max(2, args.runs // 4)}) per model, "
          f"interleaved; ratio = median over rounds of (ParameterNet median / GhostNet median) [range]")
    print(header())
    for row in rows:
        print(format_row(row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"start_load": start_load, "end_load": end_load, "args": vars(args), "rows": rows}, f, indent=2)
    return 0


def header() -> str:
    return (f"{'size':<6}{'batch':>6}{'thr':>4}  {'backend':<30}{'GhostNet ms':>12}{'PNet ms':>10}{'img/s G':>9}"
            f"{'img/s P':>9}{'ratio':>8}  {'range':<13}{'FLOPs':>7}  goal <= {GOAL_RATIO} (batch 1)")


def format_row(row: dict) -> str:
    batch = row["batch_size"]
    verdict = ("ok" if row["ratio"] <= GOAL_RATIO else "ABOVE GOAL") if batch == 1 else "throughput"
    if row.get("ablation"):
        verdict = "ablation: the bound of faster routing code"
    return (f"{row['size']:<6}{batch:>6}{row['threads']:>4}  {row['backend']:<30}{row['ghostnet_ms']:>12.2f}"
            f"{row['parameternet_ms']:>10.2f}{1e3 * batch / row['ghostnet_ms']:>9.1f}"
            f"{1e3 * batch / row['parameternet_ms']:>9.1f}{row['ratio']:>8.3f}  "
            f"[{row['ratio_min']:.3f}-{row['ratio_max']:.3f}]{row['flops_ratio']:>7.3f}  {verdict}")


if __name__ == "__main__":
    sys.exit(main())
