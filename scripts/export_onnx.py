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
largest |logit|. Bad arguments (a missing model path, an `--output` that is a folder, an opset the chosen exporter
cannot write, an image size below the network's minimum) end with a one-line usage error, exit status 2, before the
model's weights are loaded. A file whose opset is not the requested `--opset` is removed and reported (exit status 1).
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
from transformers import AutoConfig, AutoModelForImageClassification

from modeling_parameternet import ParameterNetConfig, ParameterNetForImageClassification


# The default-domain opsets each exporter writes, (lowest, highest), as probed with torch 2.13 / onnxscript 0.7 on the
# tiny test model and every ParameterNet / GhostNet config in configs/vision:
# - dynamo: 18 is the opset it builds the graph in; asked for less, it tries to down-convert, fails on this graph
#   ("Failed to convert the model to the target version ... The model was not modified") and writes opset 18 anyway.
#   23 is torch.onnx's highest supported opset (24-26 go through onnxscript's up-converter, outside torch's support).
# - torchscript: 7 is torch.onnx's lowest (opsets 5 and 6 fail on the dynamic convolution), 20 its highest for this
#   exporter (above it torch warns "Exporting to ONNX opset version ... is not supported").
OPSETS = {"dynamo": (18, 23), "torchscript": (7, 20)}


class ExportError(RuntimeError):
    """The exporter wrote something other than what was asked (the file is removed)."""


def check_opset(exporter: str, opset: int) -> None:
    """ValueError unless `exporter` writes `opset` (see OPSETS)."""
    if exporter not in OPSETS:
        raise ValueError(f"exporter={exporter!r} invalid; allowed: 'dynamo', 'torchscript'")
    lowest, highest = OPSETS[exporter]
    if not lowest <= opset <= highest:
        raise ValueError(f"opset {opset} is not supported by the {exporter} exporter; allowed: {lowest} to {highest}")


def min_image_size(config) -> int:
    """The smallest height / width the network takes: its total stride (1 for configs that do not say)."""
    return int(getattr(config, "image_size_divisor", 1))


def check_image_size(config, image_size: int) -> None:
    """ValueError unless `image_size` is at least the network's minimum (and >= 1)."""
    lowest = max(1, min_image_size(config))
    if image_size < lowest:
        raise ValueError(
            f"image size {image_size} is too small; allowed: an integer >= {lowest}"
            + (f" (the network's total stride; trained at {config.image_size})" if lowest > 1 else "")
        )


def onnx_opset(path: str) -> int | None:
    """The default-domain (ai.onnx) opset version of the ONNX file at `path`."""
    import onnx

    for entry in onnx.load(path, load_external_data=False).opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return None


class LogitsOnly(nn.Module):
    """pixel_values -> logits, the graph's single output."""

    def __init__(self, model: ParameterNetForImageClassification):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def load_config(path: str):
    """The config of a saved folder or of a config JSON, without loading any weights."""
    if os.path.isdir(path):
        return AutoConfig.from_pretrained(path)
    with open(path) as f:
        config_dict = json.load(f)
    config_dict.pop("model_type", None)
    return ParameterNetConfig(**config_dict)


def load_model(path: str, config=None) -> ParameterNetForImageClassification:
    """A saved folder (with weights) or a config JSON (random weights), in eval mode. A folder loads with the
    installed, registered classes: none of its own code files runs. `config`: the already loaded `load_config(path)`."""
    config = config if config is not None else load_config(path)
    if os.path.isdir(path):
        return AutoModelForImageClassification.from_pretrained(path, config=config).eval()
    return ParameterNetForImageClassification(config).eval()


def export_onnx(
    model: ParameterNetForImageClassification,
    output: str,
    batch_size: int = 1,
    image_size: int | None = None,
    exporter: str = "dynamo",
    opset: int = 18,
) -> str:
    """Write `model` as ONNX (input `pixel_values`, output `logits`) and return the path. ValueError, before any work,
    for an opset `exporter` cannot write or an image size the network cannot take; ExportError (and no file) when the
    written file's opset is not `opset`."""
    check_opset(exporter, opset)
    if batch_size < 1:
        raise ValueError(f"batch size {batch_size} is invalid; allowed: an integer >= 1")
    if image_size is None:
        image_size = model.config.image_size
    check_image_size(model.config, image_size)
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
    written = onnx_opset(output)
    if written != opset:
        os.remove(output)
        raise ExportError(
            f"the {exporter} exporter wrote opset {written} instead of the requested opset {opset}; {output} removed"
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
    # Everything checkable is checked here, before the weights load; each error names the value and what is allowed.
    if args.batch_size < 1:
        parser.error(f"argument --batch-size: {args.batch_size} is invalid; allowed: an integer >= 1")
    if args.image_size is not None and args.image_size < 1:
        parser.error(f"argument --image-size: {args.image_size} is invalid; allowed: an integer >= 1")
    try:
        check_opset(args.exporter, args.opset)
    except ValueError as error:
        parser.error(f"argument --opset: {error}")
    if not os.path.exists(args.model):
        parser.error(f"argument model: {args.model!r} does not exist; allowed: a saved model folder or a config .json")
    if os.path.isdir(args.model) and not os.path.isfile(os.path.join(args.model, "config.json")):
        parser.error(f"argument model: {args.model!r} is a folder without config.json; allowed: a saved model folder "
                     "or a config .json")
    if os.path.isdir(args.output):
        parser.error(f"argument --output: {args.output!r} is a folder; allowed: the path of an .onnx file to write")
    parent = os.path.dirname(os.path.abspath(args.output))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        parser.error(f"argument --output: {args.output!r} is under {parent!r}, which is a file; allowed: the path of "
                     "an .onnx file to write")

    config = load_config(args.model)
    image_size = args.image_size if args.image_size is not None else config.image_size
    try:
        check_image_size(config, image_size)
    except ValueError as error:
        parser.error(f"argument --image-size: {error}")
    model = load_model(args.model, config)
    exported = model if args.no_reparameterize else model.reparameterize()
    try:
        export_onnx(exported, args.output, args.batch_size, image_size, args.exporter, args.opset)
    except ExportError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    diff, scale = onnx_logits_diff(model, args.output, args.batch_size, image_size)
    allowed = args.atol + args.rtol * scale
    status = "OK" if diff <= allowed else "MISMATCH"
    print(f"{args.output}: exporter={args.exporter} batch={args.batch_size} image={image_size} "
          f"reparameterized={not args.no_reparameterize} max_abs_diff={diff:.3e} (max |logit| {scale:.3e}, "
          f"allowed {allowed:.1e}) {status}")
    return 0 if diff <= allowed else 1


if __name__ == "__main__":
    sys.exit(main())
