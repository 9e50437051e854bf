"""ParameterNet / GhostNet configuration (Han et al., "ParameterNet: Parameters Are All You Need", Tables 2 and 4)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig

from .transformers_version import TRANSFORMERS_REQUIREMENT  # noqa: F401  (checks the installed release)

# GhostNet-v1 stage table. Each row is (kernel, expansion channels, output channels, SE ratio, stride),
# before the width multiplier. Used at width 1.45 for the paper's 300M-FLOPs models.
GHOSTNET_V1_STAGES: list[list[list[float]]] = [
    [[3, 16, 16, 0, 1]],
    [[3, 48, 24, 0, 2]],
    [[3, 72, 24, 0, 1]],
    [[5, 72, 40, 0.25, 2]],
    [[5, 120, 40, 0.25, 1]],
    [[3, 240, 80, 0, 2]],
    [[3, 200, 80, 0, 1], [3, 184, 80, 0, 1], [3, 184, 80, 0, 1], [3, 480, 112, 0.25, 1], [3, 672, 112, 0.25, 1]],
    [[5, 672, 160, 0.25, 2]],
    [[5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1], [5, 960, 160, 0, 1], [5, 960, 160, 0.25, 1]],
]

ROUTING_ACTIVATIONS = ("sigmoid", "softmax")
HIDDEN_ACTIVATIONS = ("relu", "hardswish")


@strict
class ParameterNetConfig(PreTrainedConfig):
    r"""
    Configuration of a GhostNet (`num_experts=1`), a ParameterNet (`num_experts>1`: the convolutions named in
    `modeling_parameternet` become dynamic convolutions with `num_experts` expert kernels) or a RepConv GhostNet
    (`num_branches>1`: the same convolutions get `num_branches - 1` more parallel conv+BatchNorm branches in
    training, merged into one convolution by `reparameterize()`; the paper's Table 6).

    Args:
        num_channels (`int`, defaults to 3): channels of the input image.
        image_size (`int`, defaults to 224): training / evaluation resolution (square). The network accepts any
            resolution of at least `image_size_divisor` pixels per side; FLOPs counts use this size.
        width_multiplier (`float`, defaults to 1.45): channel multiplier; channels are
            `make_divisible(c * width_multiplier, channel_divisor)`.
        stages (`list`, defaults to the GhostNet-v1 table): stages of bottleneck rows
            `[kernel, expansion, out_channels, se_ratio, stride]`, before the width multiplier.
        stem_channels (`int`, defaults to 16): output channels of the 3x3 stride-2 stem, before the multiplier.
        feature_channels (`int`, defaults to 960): channels of the last 1x1 convolution before global pooling,
            before the multiplier.
        head_channels (`int`, defaults to 1280): width of the static 1x1 head convolution after pooling (not scaled).
        channel_divisor (`int`, defaults to 4): channel counts are multiples of this.
        se_divisor (`int`, defaults to 4): squeeze-excite reduced channels are multiples of this.
        num_experts (`int`, defaults to 4): expert kernels per dynamic convolution; 1 = plain GhostNet.
        num_branches (`int`, defaults to 1): parallel conv+BatchNorm branches per convolution (structural
            re-parameterisation, RepVGG-style); 1 = plain. Excludes `num_experts > 1`.
        reparameterized (`bool`, defaults to `False`): inference form written by `reparameterize()`: every BatchNorm
            is folded into the convolution before it (which then has a bias) and RepConv branches are merged.
        routing_activation (`str`, defaults to `"sigmoid"`): `"sigmoid"` (official code) or `"softmax"` (paper text)
            applied to the routing logits `Linear(GAP(x))`.
        hidden_act (`str`, defaults to `"relu"`): `"relu"` (GhostNet) or `"hardswish"` (ParameterNet-600M).
        classifier_dropout (`float`, defaults to 0.2): dropout before the classifier.
        batch_norm_eps (`float`, defaults to 1e-5), batch_norm_momentum (`float`, defaults to 0.1).
    """

    model_type = "parameternet"

    num_channels: int = 3
    image_size: int = 224
    width_multiplier: float | int = 1.45
    stages: list | None = None
    stem_channels: int = 16
    feature_channels: int = 960
    head_channels: int = 1280
    channel_divisor: int = 4
    se_divisor: int = 4
    num_experts: int = 4
    num_branches: int = 1
    reparameterized: bool = False
    routing_activation: str = "sigmoid"
    hidden_act: str = "relu"
    classifier_dropout: float | int = 0.2
    batch_norm_eps: float = 1e-5
    batch_norm_momentum: float = 0.1

    def __post_init__(self, **kwargs):
        if self.stages is None:
            self.stages = [[list(row) for row in stage] for stage in GHOSTNET_V1_STAGES]
        # Validate first so that a bad value raises a plain ValueError (strict's own pass wraps it in its error type).
        self.validate_architecture()
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Reject configurations the network cannot be built from, naming the field, the value and what is allowed."""
        if not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts!r} is invalid; allowed: an integer >= 1 (1 = GhostNet)")
        if not isinstance(self.num_branches, int) or self.num_branches < 1:
            raise ValueError(f"num_branches={self.num_branches!r} is invalid; allowed: an integer >= 1 (1 = plain convolutions)")
        if self.num_branches > 1 and self.num_experts > 1:
            raise ValueError(
                f"num_branches={self.num_branches} with num_experts={self.num_experts} is invalid; allowed: RepConv "
                "branches (num_branches > 1) or dynamic convolutions (num_experts > 1), not both"
            )
        if self.num_branches > 1 and self.reparameterized:
            raise ValueError(
                f"num_branches={self.num_branches} with reparameterized=True is invalid; allowed: num_branches=1 "
                "(reparameterize() merges the branches into one convolution)"
            )
        if self.routing_activation not in ROUTING_ACTIVATIONS:
            raise ValueError(f"routing_activation={self.routing_activation!r} is invalid; allowed: {ROUTING_ACTIVATIONS}")
        if self.hidden_act not in HIDDEN_ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is invalid; allowed: {HIDDEN_ACTIVATIONS}")
        if self.width_multiplier <= 0:
            raise ValueError(f"width_multiplier={self.width_multiplier!r} is invalid; allowed: a number > 0")
        for name in ("num_channels", "image_size", "stem_channels", "feature_channels", "head_channels",
                     "channel_divisor", "se_divisor"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"{name}={value!r} is invalid; allowed: an integer >= 1")
        if not 0 <= self.classifier_dropout < 1:
            raise ValueError(f"classifier_dropout={self.classifier_dropout!r} is invalid; allowed: 0 <= p < 1")
        validate_stage_table(self.stages)

    @property
    def image_size_divisor(self) -> int:
        """Total stride of the network: the smallest input side it accepts."""
        divisor = 2  # stem
        for stage in self.stages:
            for row in stage:
                divisor *= int(row[4])
        return divisor


def validate_stage_table(stages: object) -> None:
    """Check a stage table: a non-empty list of non-empty stages of `[kernel, expansion, out, se_ratio, stride]` rows."""
    allowed = "a non-empty list of stages, each a non-empty list of rows [kernel (odd int), expansion (>0), out (>0), se_ratio (0 <= r < 1), stride (1 or 2)]"
    if not isinstance(stages, (list, tuple)) or len(stages) == 0:
        raise ValueError(f"stages={stages!r} is invalid; allowed: {allowed}")
    for i, stage in enumerate(stages):
        if not isinstance(stage, (list, tuple)) or len(stage) == 0:
            raise ValueError(f"stages[{i}]={stage!r} is invalid; allowed: {allowed}")
        for j, row in enumerate(stage):
            where = f"stages[{i}][{j}]={row!r}"
            if not isinstance(row, (list, tuple)) or len(row) != 5:
                raise ValueError(f"{where} is invalid; allowed: {allowed}")
            kernel, expansion, out, se_ratio, stride = row
            if int(kernel) != kernel or kernel < 1 or kernel % 2 == 0:
                raise ValueError(f"{where}: kernel {kernel!r} is invalid; allowed: an odd integer >= 1")
            if expansion <= 0 or out <= 0:
                raise ValueError(f"{where}: expansion and out channels must be > 0")
            if not 0 <= se_ratio < 1:
                raise ValueError(f"{where}: se_ratio {se_ratio!r} is invalid; allowed: 0 <= r < 1")
            if stride not in (1, 2):
                raise ValueError(f"{where}: stride {stride!r} is invalid; allowed: 1 or 2")


ParameterNetConfig.register_for_auto_class()

__all__ = ["ParameterNetConfig", "GHOSTNET_V1_STAGES", "validate_stage_table"]
