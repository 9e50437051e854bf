"""Export a GhostNet / ParameterNet classifier to ONNX and check onnxruntime against torch.

    python scripts/export_onnx.py runs/fmnist-parameternet/final --output parameternet.onnx
    python scripts/export_onnx.py configs/vision/parameternet-600m.json --output pn600m.onnx   # random weights

The input is a saved model folder (weights loaded) or a model config JSON (randomly initialised weights: enough to
export the architecture, check parity and measure latency). The batch size is fixed in the graph (`--batch-size`):
a dynamic convolution folds the batch into the groups of one grouped convolution, and ONNX `Conv.group` is a static
attribute. Prints the max abs difference of the logits between torch and onnxruntime on random inputs and exits
with status 1 when it exceeds `--atol`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

import numpy as np
import torch
from torch import nn
from transformers import AutoModelForImageClassification

from modeling_pnet_llama import ParameterNetConfig, ParameterNetForImageClassification


class LogitsOnly(nn.Module):
    """pixel_values -> logits, the graph's single output."""

    def __init__(self, model: ParameterNetForImageClassification):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def load_model(path: str) -> ParameterNetForImageClassification:
    """A saved folder (with weights) or a config JSON (random weights), in eval mode."""
    if os.path.isdir(path):
        return AutoModelForImageClassification.from_pretrained(path, trust_remote_code=True).eval()
    with open(path) as f:
        config_dict = json.load(f)
    config_dict.pop("model_type", None)
    return ParameterNetForImageClassification(ParameterNetConfig(**config_dict)).eval()


def export_onnx(
    model: ParameterNetForImageClassification,
    output: str,
    batch_size: int = 1,
    image_size: int | None = None,
    exporter: str = "dynamo",
    opset: int = 18,
) -> str:
    """Write `model` as ONNX (input `pixel_values`, output `logits`) and return the path."""
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"exporter={exporter!r} invalid; allowed: 'dynamo', 'torchscript'")
    image_size = image_size or model.config.image_size
    example = torch.randn(batch_size, model.config.num_channels, image_size, image_size)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about the Python-level input checks
        torch.onnx.export(
            LogitsOnly(model).eval(),
            (example,),
            output,
            dynamo=exporter == "dynamo",
            input_names=["pixel_values"],
            output_names=["logits"],
            opset_version=opset,
            **({"verbose": False} if exporter == "dynamo" else {}),
        )
    return output


def onnx_max_abs_diff(model: nn.Module, onnx_path: str, batch_size: int, image_size: int, trials: int = 2) -> float:
    """Largest |logits_torch - logits_onnxruntime| over `trials` random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    worst = 0.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(trials):
        pixel_values = torch.randn(batch_size, model.config.num_channels, image_size, image_size, generator=generator)
        with torch.no_grad():
            expected = model(pixel_values=pixel_values).logits.numpy()
        (actual,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
        worst = max(worst, float(np.abs(actual - expected).max()))
    return worst


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="saved model folder or model config .json")
    parser.add_argument("--output", required=True, help="path of the .onnx file to write")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=None, help="defaults to config.image_size")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--atol", type=float, default=1e-4, help="max abs logits difference allowed")
    args = parser.parse_args(argv)

    model = load_model(args.model)
    image_size = args.image_size or model.config.image_size
    export_onnx(model, args.output, args.batch_size, image_size, args.exporter, args.opset)
    diff = onnx_max_abs_diff(model, args.output, args.batch_size, image_size)
    status = "OK" if diff <= args.atol else "MISMATCH"
    print(f"{args.output}: exporter={args.exporter} batch={args.batch_size} image={image_size} "
          f"max_abs_diff={diff:.3e} atol={args.atol:.0e} {status}")
    return 0 if diff <= args.atol else 1


if __name__ == "__main__":
    sys.exit(main())
