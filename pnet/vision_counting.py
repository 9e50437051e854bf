"""Parameters and FLOPs of the paper's vision models, counted on the real models (Tables 2, 4, 5 and 6).

GhostNet / ParameterNet / RepConv GhostNet (`model_type` "parameternet"): parameters are the `numel` of the real
`ParameterNetForImageClassification`. FLOPs are counted by one forward pass at `image_size` x `image_size`, batch 1,
on the meta device (no memory, no compute) with forward hooks reading the real layer shapes, in the paper's
convention:
  * multiply-adds of every convolution and linear layer (biases free), and the squeeze-excite channel gating
    (one multiply per gated element);
  * one per BatchNorm output element (in a reparameterized model, where the BatchNorm is folded into the convolution,
    one per output element of that convolution's bias: the same affine op);
  * dynamic-conv overhead: E * |W| for mixing the expert kernels and C_in * E for the routing linear.
Pooling, activations and residual additions are free. This reproduces all four of the paper's FLOPs figures
and, without the BatchNorm term, the published GhostNet 1.0x figure (141.7M multiply-adds). A RepConv model
(`num_branches` > 1) reports its training parameters and the parameters and FLOPs of its inference form
(`reparameterize()`: branches merged, BatchNorms folded), which is a GhostNet: the paper's 15.7M / 8.6M / 289M.

Swin / PNet-Swin (`model_type` "swin", "pnet_swin"): counted on a real CPU model (top-1 routing is data-dependent,
which the meta device cannot run) with hooks: multiply-adds of every linear and convolution layer (routers
included; a routed fc2 costs one expert per token) and of the two attention matmuls (QK^T and AV), + one per
LayerNorm output element + one per GELU output element. Swin's own `flops()` convention (no GELU term) gives 310.7M
for the paper's Swin-300M; with the GELU term it is 312.2M (paper: 312M) and PNet-Swin 323.4M (paper: 323M).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import SwinConfig, SwinForImageClassification
from transformers.activations import GELUActivation
from transformers.models.swin.modeling_swin import SwinAttention

from modeling_parameternet import (
    DynamicConv2d,
    ParameterNetConfig,
    ParameterNetForImageClassification,
    PNetSwinConfig,
    PNetSwinForImageClassification,
)
from modeling_parameternet.modeling_parameternet import ParameterNetSqueezeExcite
from modeling_parameternet.routed_linear import ExpertLinear, TopOneRouter
from pnet.count_report import VISION_MODEL_TYPES, CountReport

FLOPS_CONVENTION = (
    "multiply-adds of conv and linear layers and SE gating + 1 per BatchNorm output element (or folded-BatchNorm bias "
    "element) + dynamic-conv overhead (E*|W| kernel mixing + C_in*E routing), batch 1 at image_size^2"
)
SWIN_FLOPS_CONVENTION = (
    "multiply-adds of linear and conv layers (routers included, one expert per token) and of the attention matmuls "
    "QK^T and AV + 1 per LayerNorm output element + 1 per GELU output element, batch 1 at image_size^2"
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
        if module in folded_convs:  # a BatchNorm folded into this convolution's bias: still one op per element
            parts["batch_norm"] += output.numel()

    routing_layers = {m.routing for m in model.modules() if isinstance(m, DynamicConv2d)}
    squeeze_excite_convs = {c for m in model.modules() if isinstance(m, ParameterNetSqueezeExcite) for c in m.modules()}
    folded_convs = {
        m for m in model.modules()
        if isinstance(m, (nn.Conv2d, DynamicConv2d)) and m.bias is not None and m not in squeeze_excite_convs
    }
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
    """Total parameters and forward FLOPs of a GhostNet / ParameterNet / RepConv config dict (paper convention)."""
    model = build_meta_model(config_dict)
    image_size = image_size or model.config.image_size
    total = sum(p.numel() for p in model.parameters())
    dynamic = [m for m in model.modules() if isinstance(m, DynamicConv2d)]
    parts = count_flops(model, image_size)
    flops = sum(parts.values())
    details = {
        "num_experts": model.config.num_experts,
        "dynamic_convs": len(dynamic),
        "expert_params": sum(m.weight.numel() for m in dynamic),
        "image_size": image_size,
    }
    if model.config.num_branches > 1:
        # Trained with parallel branches, deployed merged: the paper's training / inference parameters and the
        # inference FLOPs (the merged model is a GhostNet).
        inference = build_meta_model({**config_dict, "num_branches": 1, "reparameterized": True})
        inference_parts = count_flops(inference, image_size)
        details.update({
            "num_branches": model.config.num_branches,
            "inference_params": sum(p.numel() for p in inference.parameters()),
            "training_flops": flops,
        })
        parts, flops = inference_parts, sum(inference_parts.values())
    details.update({
        # The published GhostNet convention (no BatchNorm term), for comparison with GhostNet 1.0x = 141.7M.
        "multiply_adds": flops - parts["batch_norm"],
        **{f"flops_{k}": v for k, v in parts.items()},
    })
    return CountReport(
        name=name,
        model_type="parameternet",
        total_params=total,
        # Every expert kernel is used by every sample (mixed before the conv), so all parameters are active.
        active_params=total,
        flops=flops,
        flops_convention=FLOPS_CONVENTION,
        details=details,
    )


def build_swin(config_dict: dict) -> SwinForImageClassification:
    """A Swin (`model_type` "swin") or PNet-Swin ("pnet_swin") image classifier from a config dict, on the CPU."""
    values = {k: v for k, v in config_dict.items() if k != "model_type"}
    if config_dict.get("model_type") == "pnet_swin":
        return PNetSwinForImageClassification(PNetSwinConfig(**values))
    return SwinForImageClassification(SwinConfig(**values))


def count_swin_flops(model: SwinForImageClassification, image_size: int) -> dict[str, int]:
    """Forward FLOPs of a (PNet-)Swin at batch 1 by part, in `SWIN_FLOPS_CONVENTION`."""
    parts = {"linear": 0, "conv": 0, "attention_matmuls": 0, "layer_norm": 0, "gelu": 0, "moe_experts": 0,
             "moe_routing": 0}

    def hook(module: nn.Module, inputs: tuple, output) -> None:
        if isinstance(module, nn.Linear):
            parts["linear"] += output.numel() // output.shape[-1] * module.in_features * module.out_features
        elif isinstance(module, TopOneRouter):  # output: (router_logits (tokens, experts), ...)
            parts["moe_routing"] += output.router_logits.numel() * module.in_features
        elif isinstance(module, ExpertLinear):  # one expert per token
            parts["moe_experts"] += output.numel() * module.in_features
        elif isinstance(module, nn.Conv2d):
            parts["conv"] += _conv_macs(module, output)
        elif isinstance(module, SwinAttention):  # (B * windows, N, C): QK^T and AV, N * N * C each per window
            windows, tokens, channels = inputs[0].shape
            parts["attention_matmuls"] += 2 * windows * tokens * tokens * channels
        elif isinstance(module, nn.LayerNorm):
            parts["layer_norm"] += output.numel()
        elif isinstance(module, GELUActivation):
            parts["gelu"] += output.numel()

    kinds = (nn.Linear, TopOneRouter, ExpertLinear, nn.Conv2d, SwinAttention, nn.LayerNorm, GELUActivation)
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, model.config.num_channels, image_size, image_size))
    finally:
        for handle in handles:
            handle.remove()
    return parts


def count_swin(config_dict: dict, name: str = "swin", image_size: int | None = None) -> CountReport:
    """Total / active parameters and forward FLOPs of a Swin or PNet-Swin config dict (`SWIN_FLOPS_CONVENTION`)."""
    model = build_swin(config_dict)  # random weights: which expert a token takes changes no count
    config = model.config
    image_size = image_size or (config.image_size if isinstance(config.image_size, int) else config.image_size[0])
    total = sum(p.numel() for p in model.parameters())
    experts = [m for m in model.modules() if isinstance(m, ExpertLinear)]
    inactive = sum((m.num_experts - 1) * (m.weight[0].numel() + m.bias[0].numel()) for m in experts)
    parts = count_swin_flops(model, image_size)
    flops = sum(parts.values())
    return CountReport(
        name=name,
        model_type=config.model_type,
        total_params=total,
        active_params=total - inactive,
        flops=flops,
        flops_convention=SWIN_FLOPS_CONVENTION,
        details={
            "num_experts": getattr(config, "num_experts", 1),
            "routed_mlps": len(experts),
            "expert_params": sum(m.weight.numel() + m.bias.numel() for m in experts),
            "image_size": image_size,
            # Swin's own flops() convention (multiply-adds + LayerNorm elements, no GELU term): Swin-T = 4.5G.
            "swin_official_flops": flops - parts["gelu"],
            **{f"flops_{k}": v for k, v in parts.items()},
        },
    )


def count_vision(config_dict: dict, name: str, image_size: int | None = None) -> CountReport:
    """Dispatch on `model_type` ("parameternet", "swin", "pnet_swin")."""
    model_type = config_dict.get("model_type")
    if model_type == "parameternet":
        return count_parameternet(config_dict, name=name, image_size=image_size)
    if model_type in ("swin", "pnet_swin"):
        return count_swin(config_dict, name=name, image_size=image_size)
    raise ValueError(f"model_type {model_type!r} is not a vision model this counts; allowed: {VISION_MODEL_TYPES}")


__all__ = [
    "FLOPS_CONVENTION",
    "SWIN_FLOPS_CONVENTION",
    "build_meta_model",
    "build_swin",
    "count_flops",
    "count_parameternet",
    "count_swin",
    "count_swin_flops",
    "count_vision",
]
