"""GhostNet / ParameterNet image classifiers with dynamic convolutions (Han et al., arXiv 2306.14525).

ParameterNet = GhostNet whose convolutions are replaced by dynamic convolutions: `num_experts` expert kernels
mixed per sample by coefficients computed from the globally pooled input. As in the official code the dynamic
convolutions are the stem, both convolutions of every Ghost module, both shortcut convolutions and the last 1x1
convolution before pooling; the stride-2 depthwise convolution of a bottleneck, squeeze-excite, the 1280-wide head
and the classifier stay static. With `num_experts=1` every convolution is a plain `nn.Conv2d` (GhostNet); with
`num_branches>1` the same convolutions are `RepConv2d`s (parallel conv+BatchNorm branches, the paper's Table 6).

`reparameterize()` returns the inference form: each BatchNorm folded into the (static, dynamic or merged RepConv)
convolution before it, which then carries a bias. Same outputs in eval mode, fewer operations.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.modeling_outputs import (
    BaseModelOutputWithPoolingAndNoAttention,
    ImageClassifierOutputWithNoAttention,
)
from transformers.modeling_utils import PreTrainedModel

from .configuration_parameternet import ParameterNetConfig
from .routed_linear import RoutedWeightsLoading


def make_divisible(value: float, divisor: int, round_limit: float = 0.9) -> int:
    """Round `value` to the nearest multiple of `divisor`, never going below `round_limit * value` (timm rule)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < round_limit * value:
        rounded += divisor
    return rounded


def hard_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """relu6(x + 3) / 6, the squeeze-excite gate of GhostNet."""
    return F.relu6(x + 3.0) / 6.0


ACTIVATIONS = {"relu": nn.ReLU, "hardswish": nn.Hardswish}


class DynamicConv2d(nn.Module):
    """Convolution whose kernel is a per-sample mix of `num_experts` expert kernels.

    alpha = act(Linear(GAP(x))) with act = sigmoid (official code) or softmax (paper text); the per-sample kernel
    sum_e alpha_e W_e is one GEMM `(B, E) @ (E, |W|)` per layer (memory-bound: it reads every expert once). Batch 1
    runs one plain convolution with that kernel; a batch is folded into the groups of one grouped convolution, so
    there is no per-sample loop: the input is viewed as one image with B*C_in channels and B*groups groups.
    `bias` (one per output channel, shared by the experts) exists only in the reparameterized form, where it carries
    the folded BatchNorm shift.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_experts: int = 4,
        routing_activation: str = "sigmoid",
        bias: bool = False,
    ):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts={num_experts!r} is invalid; allowed: an integer >= 1")
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"in_channels={in_channels} and out_channels={out_channels} must be divisible by groups={groups}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = kernel_size // 2
        self.groups = groups
        self.num_experts = num_experts
        self.routing_activation = routing_activation
        self.routing = nn.Linear(in_channels, num_experts)
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None

    def routing_weights(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Per-sample expert coefficients, shape (batch, num_experts)."""
        logits = self.routing(hidden_states.mean(dim=(2, 3)))
        if self.routing_activation == "softmax":
            return logits.softmax(dim=-1)
        return logits.sigmoid()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        batch_size, _, height, width = hidden_states.shape
        alpha = self.routing_weights(hidden_states)
        # (B, E) @ (E, |W|): one kernel per sample, stacked along the output-channel axis.
        kernels = torch.mm(alpha, self.weight.flatten(1))
        if batch_size == 1:
            return F.conv2d(
                hidden_states, kernels.view(self.weight.shape[1:]), self.bias, self.stride, self.padding, 1, self.groups
            )
        bias = None if self.bias is None else self.bias.repeat(batch_size)
        output = F.conv2d(
            hidden_states.reshape(1, batch_size * self.in_channels, height, width),
            kernels.view(batch_size * self.out_channels, *self.weight.shape[2:]),
            bias,
            self.stride,
            self.padding,
            1,
            batch_size * self.groups,
        )
        return output.view(batch_size, self.out_channels, output.shape[-2], output.shape[-1])

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"groups={self.groups}, num_experts={self.num_experts}, routing={self.routing_activation}, "
            f"bias={self.bias is not None}"
        )


class RepConv2d(nn.Module):
    """`num_branches` parallel conv -> BatchNorm branches of the same shape, summed (structural re-parameterisation,
    RepVGG / MobileOne style; the paper's Table 6 adds 3 branches to every convolution ParameterNet makes dynamic).

    The branches run as one convolution with `num_branches` times the output channels, ordered (out, branch) so that
    a grouped (e.g. depthwise) convolution keeps every branch of a channel in that channel's group, then one
    BatchNorm over all branch channels and a sum over the branch axis. `merged()` gives the single equivalent
    convolution (kernel and bias) for eval mode.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        num_branches: int = 4,
        batch_norm_eps: float = 1e-5,
        batch_norm_momentum: float = 0.1,
    ):
        super().__init__()
        if num_branches < 1:
            raise ValueError(f"num_branches={num_branches!r} is invalid; allowed: an integer >= 1")
        self.out_channels = out_channels
        self.num_branches = num_branches
        self.conv = nn.Conv2d(
            in_channels, out_channels * num_branches, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
        )
        self.norm = nn.BatchNorm2d(out_channels * num_branches, eps=batch_norm_eps, momentum=batch_norm_momentum)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        branches = self.norm(self.conv(hidden_states))
        batch_size, _, height, width = branches.shape
        return branches.view(batch_size, self.out_channels, self.num_branches, height, width).sum(dim=2)

    @torch.no_grad()
    def merged(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Kernel (out, in/groups, k, k) and bias (out,) of the one convolution equal to this module in eval mode."""
        kernel, bias = fold_batch_norm(self.conv.weight, self.norm)
        kernel = kernel.view(self.out_channels, self.num_branches, *kernel.shape[1:]).sum(dim=1)
        return kernel, bias.view(self.out_channels, self.num_branches).sum(dim=1)


@torch.no_grad()
def fold_batch_norm(weight: torch.Tensor, norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel and bias of `norm(conv(x, weight))` in eval mode as one convolution: the BatchNorm scale
    gamma / sqrt(var + eps) multiplies each output channel of `weight` (axis -4, so a dynamic convolution's experts
    (E, out, ...) are scaled alike) and its shift beta - mean * scale becomes the bias."""
    scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
    shift = norm.bias - norm.running_mean * scale
    return weight * scale.view(-1, 1, 1, 1), shift


def make_conv(
    config: ParameterNetConfig, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> nn.Module:
    """A convolution that is dynamic in ParameterNet: `DynamicConv2d` when num_experts > 1, `RepConv2d` (with its
    own BatchNorms) when num_branches > 1, else `nn.Conv2d`. Reparameterized models carry a bias instead of a norm."""
    bias = config.reparameterized
    if config.num_experts > 1:
        return DynamicConv2d(
            in_channels, out_channels, kernel_size, stride, groups, config.num_experts, config.routing_activation, bias
        )
    if config.num_branches > 1:
        return RepConv2d(
            in_channels, out_channels, kernel_size, stride, groups, config.num_branches,
            config.batch_norm_eps, config.batch_norm_momentum,
        )
    return nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=bias)


def make_norm(config: ParameterNetConfig, channels: int, conv: nn.Module) -> nn.Module:
    """The BatchNorm after a convolution, or nothing where the convolution already normalises (RepConv branches) or
    carries the folded norm as its bias (reparameterized)."""
    if config.reparameterized or isinstance(conv, RepConv2d):
        return nn.Identity()
    return nn.BatchNorm2d(channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)


class ParameterNetConvNormAct(nn.Module):
    """(dynamic) conv -> BatchNorm -> optional activation; a RepConv's branches carry their own BatchNorms and a
    reparameterized conv its folded one (bias), so `norm` is then the identity."""

    def __init__(
        self,
        config: ParameterNetConfig,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ):
        super().__init__()
        self.conv = make_conv(config, in_channels, out_channels, kernel_size, stride, groups)
        self.norm = make_norm(config, out_channels, self.conv)
        self.activation = ACTIVATIONS[config.hidden_act]() if activation else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.activation(self.norm(self.conv(hidden_states)))

    @torch.no_grad()
    def reparameterized_state(self) -> dict[str, torch.Tensor]:
        """This module's parameters in the reparameterized form (keys relative to the module), eval-mode exact."""
        if isinstance(self.conv, RepConv2d):
            weight, bias = self.conv.merged()
            return {"conv.weight": weight, "conv.bias": bias}
        weight, bias = fold_batch_norm(self.conv.weight, self.norm)
        state = {"conv.weight": weight, "conv.bias": bias}
        if isinstance(self.conv, DynamicConv2d):
            state.update({f"conv.routing.{k}": v.clone() for k, v in self.conv.routing.state_dict().items()})
        return state


class ParameterNetGhostModule(nn.Module):
    """Ghost module: a 1x1 primary conv makes ceil(out/2) channels, a cheap 3x3 depthwise conv makes the rest."""

    def __init__(self, config: ParameterNetConfig, in_channels: int, out_channels: int, activation: bool):
        super().__init__()
        self.out_channels = out_channels
        primary_channels = math.ceil(out_channels / 2)
        self.primary = ParameterNetConvNormAct(config, in_channels, primary_channels, 1, activation=activation)
        self.cheap = ParameterNetConvNormAct(
            config, primary_channels, primary_channels, 3, groups=primary_channels, activation=activation
        )

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        primary = self.primary(hidden_states)
        return torch.cat([primary, self.cheap(primary)], dim=1)[:, : self.out_channels]


class ParameterNetSqueezeExcite(nn.Module):
    """Static squeeze-excite with a hard-sigmoid gate; reduced width make_divisible(channels * ratio, divisor)."""

    def __init__(self, channels: int, se_ratio: float, divisor: int):
        super().__init__()
        reduced_channels = make_divisible(channels * se_ratio, divisor)
        self.reduce = nn.Conv2d(channels, reduced_channels, 1, bias=True)
        self.activation = nn.ReLU()
        self.expand = nn.Conv2d(reduced_channels, channels, 1, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = self.expand(self.activation(self.reduce(hidden_states.mean(dim=(2, 3), keepdim=True))))
        return hidden_states * hard_sigmoid(gate)


class ParameterNetBottleneck(nn.Module):
    """Ghost bottleneck: ghost module -> [static stride-2 depthwise] -> [SE] -> ghost module, plus a shortcut."""

    def __init__(
        self,
        config: ParameterNetConfig,
        in_channels: int,
        mid_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int,
        se_ratio: float,
    ):
        super().__init__()
        self.ghost_expand = ParameterNetGhostModule(config, in_channels, mid_channels, activation=True)
        if stride > 1:
            self.depthwise = nn.Conv2d(
                mid_channels, mid_channels, kernel_size, stride, kernel_size // 2, groups=mid_channels,
                bias=config.reparameterized,
            )
            self.depthwise_norm = (
                nn.Identity()
                if config.reparameterized
                else nn.BatchNorm2d(mid_channels, eps=config.batch_norm_eps, momentum=config.batch_norm_momentum)
            )
        else:
            self.depthwise = None
            self.depthwise_norm = None
        self.squeeze_excite = (
            ParameterNetSqueezeExcite(mid_channels, se_ratio, config.se_divisor) if se_ratio > 0 else None
        )
        self.ghost_project = ParameterNetGhostModule(config, mid_channels, out_channels, activation=False)
        if in_channels == out_channels and stride == 1:
            self.shortcut = nn.Identity()
        else:
            self.shortcut = nn.Sequential(
                ParameterNetConvNormAct(
                    config, in_channels, in_channels, kernel_size, stride, groups=in_channels, activation=False
                ),
                ParameterNetConvNormAct(config, in_channels, out_channels, 1, activation=False),
            )

    @torch.no_grad()
    def reparameterized_depthwise_state(self) -> dict[str, torch.Tensor]:
        """The static stride-2 depthwise conv with its BatchNorm folded in (keys relative to the module)."""
        if self.depthwise is None or isinstance(self.depthwise_norm, nn.Identity):
            return {}
        weight, bias = fold_batch_norm(self.depthwise.weight, self.depthwise_norm)
        return {"depthwise.weight": weight, "depthwise.bias": bias}

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = self.shortcut(hidden_states)
        hidden_states = self.ghost_expand(hidden_states)
        if self.depthwise is not None:
            hidden_states = self.depthwise_norm(self.depthwise(hidden_states))
        if self.squeeze_excite is not None:
            hidden_states = self.squeeze_excite(hidden_states)
        return self.ghost_project(hidden_states) + residual


class ParameterNetPreTrainedModel(RoutedWeightsLoading, PreTrainedModel):
    """Initialisation, and loading that refuses to random-initialise expert kernels or routing layers
    (`RoutedWeightsLoading`)."""

    config: ParameterNetConfig
    config_class = ParameterNetConfig
    routed_module_types = (DynamicConv2d,)
    base_model_prefix = "parameternet"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _no_split_modules = ["ParameterNetBottleneck"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Kaiming-normal (fan-out) convolutions, each expert kernel like a plain conv; small-normal linears."""
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, DynamicConv2d):
            # The mixed kernel sum_e alpha_e W_e starts with the variance of the nn.Conv2d it replaces (kaiming
            # fan_out as torch computes it for a conv weight: out_channels * k * k, groups not divided out). The
            # coefficients start near 0.5 (sigmoid of ~0) or 1/E (softmax), so each expert gets that std over
            # alpha * sqrt(E): for the official E=4 sigmoid exactly a plain conv's init. Otherwise an untrained model
            # in eval mode (BatchNorm statistics still 0 / 1) scales its activations by a constant per layer, which
            # compounds to logits of 1e10 (or 1e-10).
            start_alpha = 0.5 if module.routing_activation == "sigmoid" else 1.0 / module.num_experts
            plain_std = math.sqrt(2.0 / (module.out_channels * module.kernel_size**2))
            init.normal_(module.weight, mean=0.0, std=plain_std / (start_alpha * math.sqrt(module.num_experts)))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=0.01)
            if module.bias is not None:
                init.zeros_(module.bias)
        else:
            super()._init_weights(module)


class ParameterNetModel(ParameterNetPreTrainedModel):
    """Stem, Ghost-bottleneck stages and the last 1x1 conv; `pooler_output` is its global average."""

    def __init__(self, config: ParameterNetConfig):
        super().__init__(config)
        width, divisor = config.width_multiplier, config.channel_divisor
        stem_channels = make_divisible(config.stem_channels * width, divisor)
        self.stem = ParameterNetConvNormAct(config, config.num_channels, stem_channels, 3, stride=2)
        self.stages = nn.ModuleList()
        in_channels = stem_channels
        for stage in config.stages:
            blocks = []
            for kernel_size, expansion, out, se_ratio, stride in stage:
                out_channels = make_divisible(out * width, divisor)
                mid_channels = make_divisible(expansion * width, divisor)
                blocks.append(
                    ParameterNetBottleneck(
                        config, in_channels, mid_channels, out_channels, int(kernel_size), int(stride), se_ratio
                    )
                )
                in_channels = out_channels
            self.stages.append(nn.Sequential(*blocks))
        self.num_features = make_divisible(config.feature_channels * width, divisor)
        self.final_conv = ParameterNetConvNormAct(config, in_channels, self.num_features, 1)
        self.post_init()

    def check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        """Clear errors for inputs the network cannot take."""
        if pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; expected 4 dims (batch, {self.config.num_channels}, height, width)"
            )
        if pixel_values.shape[1] != self.config.num_channels:
            raise ValueError(
                f"pixel_values has {pixel_values.shape[1]} channels; this model takes num_channels={self.config.num_channels}"
            )
        min_side = self.config.image_size_divisor
        if min(pixel_values.shape[-2:]) < min_side:
            raise ValueError(
                f"image size {tuple(pixel_values.shape[-2:])} is too small; allowed: height and width >= {min_side} "
                f"(the network's total stride; trained at {self.config.image_size}x{self.config.image_size})"
            )

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPoolingAndNoAttention | tuple:
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self.check_pixel_values(pixel_values)
        hidden_states = self.stem(pixel_values)
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for stage in self.stages:
            hidden_states = stage(hidden_states)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.final_conv(hidden_states)
        pooled = hidden_states.mean(dim=(2, 3))
        if not return_dict:
            return tuple(v for v in (hidden_states, pooled, all_hidden_states) if v is not None)
        return BaseModelOutputWithPoolingAndNoAttention(
            last_hidden_state=hidden_states, pooler_output=pooled, hidden_states=all_hidden_states
        )


class ParameterNetForImageClassification(ParameterNetPreTrainedModel):
    """ParameterNetModel + static head (1x1 conv to `head_channels` on the pooled features, as a Linear) + classifier."""

    def __init__(self, config: ParameterNetConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.parameternet = ParameterNetModel(config)
        self.head = nn.Linear(self.parameternet.num_features, config.head_channels)
        self.head_activation = ACTIVATIONS[config.hidden_act]()
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.head_channels, config.num_labels)
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutputWithNoAttention | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.parameternet(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        features = self.head_activation(self.head(outputs.pooler_output))
        logits = self.classifier(self.dropout(features))
        loss = self.loss_function(labels, logits, self.config) if labels is not None else None
        if not return_dict:
            output = (logits,) + ((outputs.hidden_states,) if outputs.hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return ImageClassifierOutputWithNoAttention(loss=loss, logits=logits, hidden_states=outputs.hidden_states)

    @torch.no_grad()
    def reparameterize(self) -> "ParameterNetForImageClassification":
        """The inference form of this model, a new model with equal eval-mode outputs: every BatchNorm folded into the
        convolution before it (static, dynamic: into each expert, or RepConv: branches merged into one kernel), which
        then has a bias; `config.reparameterized=True`, `num_branches=1`. A RepConv GhostNet becomes a GhostNet with
        the same parameter count and FLOPs (one bias add per output element where a BatchNorm was). Save and load it
        like any model; it is for inference (no BatchNorm statistics left to train)."""
        if self.config.reparameterized:
            return self
        config = copy.deepcopy(self.config)
        config.reparameterized = True
        config.num_branches = 1
        inference_model = type(self)(config).to(device=self.device, dtype=self.dtype)
        state = {}
        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, ParameterNetConvNormAct):
                state.update({prefix + k: v for k, v in module.reparameterized_state().items()})
            elif isinstance(module, ParameterNetBottleneck):
                state.update({prefix + k: v for k, v in module.reparameterized_depthwise_state().items()})
        own_state = self.state_dict()
        for key in inference_model.state_dict():
            if key not in state:
                state[key] = own_state[key]
        inference_model.load_state_dict(state)
        return inference_model.train(self.training)


ParameterNetModel.register_for_auto_class("AutoModel")
ParameterNetForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "DynamicConv2d",
    "RepConv2d",
    "fold_batch_norm",
    "ParameterNetModel",
    "ParameterNetForImageClassification",
    "ParameterNetPreTrainedModel",
    "make_divisible",
]
