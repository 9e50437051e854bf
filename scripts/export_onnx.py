"""Export a GhostNet / ParameterNet classifier to ONNX and check onnxruntime against torch.

    python scripts/export_onnx.py runs/fmnist-parameternet/final --output parameternet.onnx
    python scripts/export_onnx.py configs/vision/parameternet-600m.json --output pn600m.onnx   # random weights

The input is a saved model folder (weights loaded) or a model config JSON (randomly initialised weights: enough to
export the architecture, check parity and measure latency). What is exported is the model's inference form,
`model.reparameterize()` (BatchNorms folded into the convolutions before them, RepConv branches merged;
`--no-reparameterize` exports the model as trained): onnxruntime folds a BatchNorm into a convolution only when the
weight is a constant, which a dynamic convolution's per-sample kernel is not, so without this the ParameterNet graph
keeps a BatchNormalization and an unfused activation after every dynamic convolution. The batch size is fixed in the
graph (`--batch-size`): a dynamic convolution folds the batch into the groups of one grouped convolution, and ONNX
`Conv.group` is a static attribute. Prints the max abs difference of the logits between onnxruntime and the torch
model as loaded (eval mode) on random inputs and exits with status 1 when it exceeds `--atol` + `--rtol` x the
largest |logit|.
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

from modeling_parameternet import ParameterNetConfig, ParameterNetForImageClassification


class LogitsOnly(nn.Module):
    """pixel_values -> logits, the graph's single output."""

    def __init__(self, model: ParameterNetForImageClassification):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def load_model(path: str) -> ParameterNetForImageClassification:
    """A saved folder (with weights) or a config JSON (random weights), in eval mode. A folder loads with the
    installed, registered classes: none of its own code files runs."""
    if os.path.isdir(path):
        return AutoModelForImageClassification.from_pretrained(path).eval()
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


def onnx_logits_diff(
    model: nn.Module, onnx_path: str, batch_size: int, image_size: int, trials: int = 2
) -> tuple[float, float]:
    """(largest |logits_torch - logits_onnxruntime|, largest |logits_torch|) over `trials` random inputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    worst, scale = 0.0, 0.0
    generator = torch.Generator().manual_seed(0)
    for _ in range(trials):
        pixel_values = torch.randn(batch_size, model.config.num_channels, image_size, image_size, generator=generator)
        with torch.no_grad():
            expected = model(pixel_values=pixel_values).logits.numpy()
        (actual,) = session.run(["logits"], {"pixel_values": pixel_values.numpy()})
        worst = max(worst, float(np.abs(actual - expected).max()))
        scale = max(scale, float(np.abs(expected).max()))
    return worst, scale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="saved model folder or model config .json")
    parser.add_argument("--output", required=True, help="path of the .onnx file to write")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--image-size", type=int, default=None, help="defaults to config.image_size")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--opset", type=int, default=18)
    parser.add_argument("--atol", type=float, default=1e-4, help="max abs logits difference allowed ...")
    parser.add_argument("--rtol", type=float, default=1e-4, help="... plus this times the largest |logit|")
    parser.add_argument("--no-reparameterize", action="store_true",
                        help="export the model as trained instead of its inference form (reparameterize())")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size {args.batch_size} is invalid; allowed: an integer >= 1")

    model = load_model(args.model)
    image_size = args.image_size or model.config.image_size
    exported = model if args.no_reparameterize else model.reparameterize()
    export_onnx(exported, args.output, args.batch_size, image_size, args.exporter, args.opset)
    diff, scale = onnx_logits_diff(model, args.output, args.batch_size, image_size)
    allowed = args.atol + args.rtol * scale
    status = "OK" if diff <= allowed else "MISMATCH"
    print(f"{args.output}: exporter={args.exporter} batch={args.batch_size} image={image_size} "
          f"reparameterized={not args.no_reparameterize} max_abs_diff={diff:.3e} (max |logit| {scale:.3e}, "
          f"allowed {allowed:.1e}) {status}")
    return 0 if diff <= allowed else 1


if __name__ == "__main__":
    sys.exit(main())
