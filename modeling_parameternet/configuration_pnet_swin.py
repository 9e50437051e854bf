"""PNet-Swin configuration: a Swin Transformer whose chosen MLPs route their second linear layer (fc2) over
`num_experts` experts with a Switch top-1 router (ParameterNet, Han et al., arXiv 2306.14525, Table 5).

The paper's "Swin-300M" is Swin-T with token dimension 24 (1.9M parameters, 312M FLOPs); its ParameterNet version adds
MoE (6.8M parameters, 323M FLOPs) without saying where. The defaults reconstruct it from those counts (see
`configs/vision/parameternet-swin-300m.json` and `pnet.vision_counting`): fc2 of every block but the first routed to
10 experts, the router fed with fc2's input (the intermediate activation, as the official ParameterNet LLaMA code
routes its down projection).
"""

from __future__ import annotations

import math

from huggingface_hub.dataclasses import strict
from transformers.models.swin.configuration_swin import SwinConfig

from .transformers_version import TRANSFORMERS_REQUIREMENT  # noqa: F401  (checks the installed release)


@strict
class PNetSwinConfig(SwinConfig):
    r"""
    Configuration of [`PNetSwinForImageClassification`]. All [`SwinConfig`] fields keep their meaning; the extra
    fields are:

    Args:
        num_experts (`int`, defaults to 10):
            Experts of every routed fc2 (>= 1). With 1 expert the model computes exactly a Swin.
        moe_blocks (`list[int]`, *optional*):
            Indices of the Swin blocks (counted across stages from 0, `sum(depths)` in all) whose MLP is routed.
            Defaults to every block but the first.
        router_aux_loss_coef (`float`, defaults to 0.01):
            Weight of the Switch load-balancing loss added to the classification loss (>= 0).
    """

    model_type = "pnet_swin"

    num_experts: int = 10
    moe_blocks: list[int] | tuple[int, ...] | None = None
    router_aux_loss_coef: float | int = 0.01

    def __post_init__(self, **kwargs):
        if self.moe_blocks is None:
            self.moe_blocks = list(range(1, sum(self.depths)))
        # Validate first so that a bad value raises a plain ValueError (strict's own pass wraps it in its error type).
        self.validate_routing()
        self.moe_blocks = sorted(self.moe_blocks)
        super().__post_init__(**kwargs)

    def validate_routing(self) -> None:
        """Reject routing settings the model cannot be built from, naming the field, the value and what is allowed."""
        num_blocks = sum(self.depths)
        if isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1:
            raise ValueError(f"num_experts={self.num_experts!r} is invalid; allowed: an integer >= 1")
        blocks = self.moe_blocks
        if (
            not isinstance(blocks, (list, tuple))
            or len(set(blocks)) != len(blocks)
            or any(isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < num_blocks for b in blocks)
        ):
            raise ValueError(
                f"moe_blocks={blocks!r} is invalid; allowed: distinct block indices in [0, {num_blocks}) "
                f"(depths={list(self.depths)})"
            )
        coef = self.router_aux_loss_coef
        if isinstance(coef, bool) or not math.isfinite(coef) or coef < 0:
            raise ValueError(f"router_aux_loss_coef={coef!r} is invalid; allowed: a finite number >= 0")


PNetSwinConfig.register_for_auto_class()

__all__ = ["PNetSwinConfig"]
