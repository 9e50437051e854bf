"""Batch-1, single-thread CPU latency of ParameterNet vs the GhostNet of the same FLOPs class, eager torch and ONNX.

    python bench/vision_latency.py                       # 300M and 600M pairs at 224x224, 40 timed runs each
    python bench/vision_latency.py --sizes 300m --runs 100 --exporter torchscript

For each pair (ghostnet-XXXm.json, parameternet-XXXm.json in configs/vision, random weights) it prints the median
latency of each model and the ratio ParameterNet / GhostNet, measured in the same run; the goal is a ratio <= 1.15
(the FLOPs ratio is 1.033 / 1.034; the paper measures ONNX on one Xeon thread). onnxruntime is measured at
ORT_ENABLE_ALL (default) and ORT_ENABLE_EXTENDED (without the NCHWc layout transform, which needs constant weights). Runs of the two models are
interleaved so that load drifts on a shared machine hit both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts"))
from export_onnx import export_onnx  # noqa: E402  (scripts/ is not a package)

from modeling_pnet_llama import ParameterNetConfig, ParameterNetForImageClassification  # noqa: E402
from pnet.vision_counting import count_parameternet  # noqa: E402

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "vision")
GOAL_RATIO = 1.15


def build(name: str) -> tuple[ParameterNetForImageClassification, dict]:
    with open(os.path.join(CONFIG_DIR, f"{name}.json")) as f:
        config_dict = json.load(f)
    config_dict.pop("model_type", None)
    torch.manual_seed(0)
    return ParameterNetForImageClassification(ParameterNetConfig(**config_dict)).eval(), config_dict


def time_interleaved(runners: dict[str, callable], warmup: int, runs: int) -> dict[str, float]:
    """Median seconds per call of each runner, calls interleaved round-robin."""
    for _ in range(warmup):
        for run in runners.values():
            run()
    samples = {name: [] for name in runners}
    for _ in range(runs):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["300m", "600m"], choices=["300m", "600m"])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--skip-onnx", action="store_true")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    torch.set_num_threads(1)
    # ORT_ENABLE_ALL includes the NCHWc layout transform, which prepacks constant conv weights only: the
    # per-sample kernels of a dynamic conv are graph inputs of their Conv, so it cannot apply to them.
    # ORT_ENABLE_EXTENDED (no layout transform) is measured too, to show how much of the gap that accounts for.
    session_options = {}
    for label, level in (("ort-all", ort.GraphOptimizationLevel.ORT_ENABLE_ALL),
                         ("ort-extended", ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = level
        session_options[label] = options

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            names = (f"ghostnet-{size}", f"parameternet-{size}")
            pixel_values = torch.randn(1, 3, args.image_size, args.image_size)
            eager, flops = {}, {}
            onnx_runs = {label: {} for label in session_options}
            for name in names:
                model, config_dict = build(name)
                flops[name] = count_parameternet(config_dict, name=name, image_size=args.image_size).flops

                def run_eager(model=model):
                    with torch.inference_mode():
                        model(pixel_values=pixel_values)

                eager[name] = run_eager
                if not args.skip_onnx:
                    path = export_onnx(model, os.path.join(tmp, f"{name}.onnx"), 1, args.image_size, args.exporter)
                    feed = {"pixel_values": pixel_values.numpy()}
                    for label, options in session_options.items():
                        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
                        onnx_runs[label][name] = lambda session=session, feed=feed: session.run(["logits"], feed)
            for backend, runners in (("eager", eager), *onnx_runs.items()):
                if not runners:
                    continue
                medians = time_interleaved(runners, args.warmup, args.runs)
                ratio = medians[names[1]] / medians[names[0]]
                rows.append((size, backend, medians[names[0]], medians[names[1]], ratio, flops[names[1]] / flops[names[0]]))

    print(f"batch 1, 1 thread, {args.image_size}x{args.image_size}, median of {args.runs} runs "
          f"(torch {torch.__version__}, onnxruntime {ort.__version__}, exporter {args.exporter})")
    print(f"{'size':<6}{'backend':<13}{'GhostNet ms':>13}{'ParameterNet ms':>17}{'ratio':>8}{'FLOPs ratio':>13}  goal <= {GOAL_RATIO}")
    for size, backend, ghost, param, ratio, flops_ratio in rows:
        verdict = "ok" if ratio <= GOAL_RATIO else "ABOVE GOAL"
        print(f"{size:<6}{backend:<13}{ghost * 1e3:>13.2f}{param * 1e3:>17.2f}{ratio:>8.3f}{flops_ratio:>13.3f}  {verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
