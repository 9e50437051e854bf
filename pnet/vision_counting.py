"""Parameters and FLOPs of GhostNet / ParameterNet configs, counted on the real model (Tables 2 and 4 of the paper).

Parameters are the `numel` of the real `ParameterNetForImageClassification`. FLOPs are counted by one forward pass
at `image_size` x `image_size`, batch 1, on the meta device (no memory, no compute) with forward hooks reading the
real layer shapes, in the paper's convention:
  * multiply-adds of every convolution and linear layer (biases free), and the squeeze-excite channel gating
    (one multiply per gated element);
  * one per BatchNorm output element;
  * dynamic-conv overhead: E * |W| for mixing the expert kernels and C_in * E for the routing linear.
Pooling, activations and residual additions are free. This reproduces all four of the paper's FLOPs figures
and, without the BatchNorm term, the published GhostNet 1.0x figure (141.7M multiply-adds).
"""

from __future__ import annotations

import torch
from torch import nn

from modeling_pnet_llama.configuration_parameternet import ParameterNetConfig
from modeling_pnet_llama.modeling_parameternet import (
    DynamicConv2d,
    ParameterNetForImageClassification,
    ParameterNetSqueezeExcite,
)
from pnet.counting import CountReport

FLOPS_CONVENTION = (
    "multiply-adds of conv and linear layers and SE gating + 1 per BatchNorm output element + dynamic-conv overhead "
    "(E*|W| kernel mixing + C_in*E routing), batch 1 at image_size^2"
)


def _conv_macs(conv: nn.Module, output: torch.Tensor) -> int:
    """Multiply-adds of a (static) convolution producing `output`: one kernel window per output element."""
    kernel_volume = conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1]
    return output.numel() * kernel_volume


def count_flops(model: ParameterNetForImageClassification, image_size: int) -> dict[str, int]:
    """Forward FLOPs of `model` at batch 1 by part: convolutions, linears, batch norms, dynamic-conv overhead."""
    parts = {"conv": 0, "linear": 0, "se_gating": 0, "batch_norm": 0, "dynamic_mixing": 0, "dynamic_routing": 0}

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            parts["conv"] += _conv_macs(module, output)
        elif isinstance(module, DynamicConv2d):
            parts["conv"] += output.numel() * module.weight[0].numel() // module.out_channels
            parts["dynamic_mixing"] += module.weight.numel()
        elif isinstance(module, nn.Linear):
            # The routing linear of a dynamic conv is the C_in * E routing overhead.
            key = "dynamic_routing" if module in routing_layers else "linear"
            parts[key] += output.numel() // output.shape[-1] * module.in_features * module.out_features
        elif isinstance(module, nn.BatchNorm2d):
            parts["batch_norm"] += output.numel()
        elif isinstance(module, ParameterNetSqueezeExcite):
            parts["se_gating"] += output.numel()

    routing_layers = {m.routing for m in model.modules() if isinstance(m, DynamicConv2d)}
    handles = [
        m.register_forward_hook(hook)
        for m in model.modules()
        if isinstance(m, (nn.Conv2d, DynamicConv2d, nn.Linear, nn.BatchNorm2d, ParameterNetSqueezeExcite))
    ]
    try:
        with torch.no_grad():
            pixel_values = torch.zeros(1, model.config.num_channels, image_size, image_size, device="meta")
            model.eval()(pixel_values)
    finally:
        for handle in handles:
            handle.remove()
    return parts


def build_meta_model(config_dict: dict) -> ParameterNetForImageClassification:
    """The real model on the meta device: exact shapes, no memory."""
    config = ParameterNetConfig(**{k: v for k, v in config_dict.items() if k != "model_type"})
    with torch.device("meta"):
        return ParameterNetForImageClassification(config)


def count_parameternet(config_dict: dict, name: str = "parameternet", image_size: int | None = None) -> CountReport:
    """Total parameters and forward FLOPs of a GhostNet / ParameterNet config dict (paper convention)."""
    model = build_meta_model(config_dict)
    image_size = image_size or model.config.image_size
    total = sum(p.numel() for p in model.parameters())
    dynamic = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    parts = count_flops(model, image_size)
    return CountReport(
        name=name,
        model_type="parameternet",
        total_params=total,
        # Every expert kernel is used by every sample (mixed before the conv), so all parameters are active.
        active_params=total,
        flops=sum(parts.values()),
        flops_convention=FLOPS_CONVENTION,
        details={
            "num_experts": model.config.num_experts,
            "dynamic_convs": len(dynamic),
            "expert_params": sum(m.weight.numel() for m in dynamic),
            "image_size": image_size,
            # The published GhostNet convention (no BatchNorm term), for comparison with GhostNet 1.0x = 141.7M.
            "multiply_adds": sum(parts.values()) - parts["batch_norm"],
            **{f"flops_{k}": v for k, v in parts.items()},
        },
    )


__all__ = ["count_parameternet", "count_flops", "build_meta_model", "FLOPS_CONVENTION"]
