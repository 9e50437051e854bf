"""PNet-LLaMA configuration: a LLaMA whose FFN projections may be top-1 routed over `num_experts` experts.

ParameterNet (Han et al., arXiv 2306.14525, Table 7) adds parameters to LLaMA-1B while keeping its FLOPs: one of
the FFN projections (gate, up or down) becomes a set of experts and a Switch-style top-1 router picks one expert per
token, so the active compute equals the dense projection's.
"""

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

# Checked before anything else is imported: outside the supported range, importing raises rather than computing.
from .transformers_version import TRANSFORMERS_REQUIREMENT

from huggingface_hub.dataclasses import strict  # noqa: E402
from huggingface_hub.errors import StrictDataclassError  # noqa: E402
from transformers.models.llama.configuration_llama import LlamaConfig  # noqa: E402


MOE_PROJECTION_NAMES = ("gate", "up", "down")
EXPERT_OUTPUT_SCALINGS = ("router_prob", "straight_through")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_projection_list(value) -> bool:
    """A non-empty list (or tuple) of distinct names from MOE_PROJECTION_NAMES."""
    if not isinstance(value, (list, tuple)) or not value or any(item not in MOE_PROJECTION_NAMES for item in value):
        return False
    return len(set(value)) == len(value)


class FieldRule(NamedTuple):
    accepts: Callable[[Any], bool]
    allowed: str  # what the error says the value "must ..."
    canonical: Callable[[Any], Any] | None = None  # the form stored, when it is not the value as given


# Single-field rules, checked whenever a field is set: at construction and on assignment afterwards (an edited config
# reaches the model and the saved config.json). Rules between fields (e.g. heads dividing hidden_size) are LLaMA's,
# checked at construction by `validate_architecture`, since a multi-step edit passes through states that break them.
_POSITIVE_INT = FieldRule(lambda value: _is_int(value) and value >= 1, "be an integer >= 1")
_NON_NEGATIVE = FieldRule(lambda value: _is_finite(value) and value >= 0, "be a finite number >= 0")
_SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "max_position_embeddings", "num_experts")
FIELD_RULES = {
    **dict.fromkeys(_SIZES, _POSITIVE_INT),
    "num_key_value_heads": FieldRule(
        lambda value: value is None or _POSITIVE_INT.accepts(value), "be None or an integer >= 1"
    ),
    "moe_projections": FieldRule(
        _is_projection_list,
        f"be a non-empty list of distinct names drawn from {list(MOE_PROJECTION_NAMES)}",
        # stored in the canonical order gate, up, down (the order of a layer's router logits)
        lambda value: [item for item in MOE_PROJECTION_NAMES if item in value],
    ),
    "router_aux_loss_coef": _NON_NEGATIVE,
    "router_z_loss_coef": _NON_NEGATIVE,
    "router_jitter_noise": FieldRule(lambda value: _is_finite(value) and 0 <= value < 1, "lie in [0, 1)"),
    "expert_capacity_factor": FieldRule(
        lambda value: value is None or _is_finite(value) and value > 0, "be None (dropless) or a number > 0"
    ),
    "expert_output_scaling": FieldRule(
        lambda value: value in EXPERT_OUTPUT_SCALINGS, f"be one of {list(EXPERT_OUTPUT_SCALINGS)}"
    ),
    "mlp_bias": FieldRule(
        lambda value: not value, "be False for pnet_llama: experts have no bias (the paper's counts)"
    ),
}


@strict
class PNetLlamaConfig(LlamaConfig):
    r"""
    Configuration of [`PNetLlamaModel`]. All [`LlamaConfig`] fields keep their meaning; the extra fields are:

    Args:
        num_experts (`int`, defaults to 8):
            Experts per routed projection (>= 1). With 1 expert the model computes exactly a LLaMA.
        moe_projections (`list[str]`, defaults to `["down"]`):
            Non-empty subset of `["gate", "up", "down"]`: the FFN projections that are routed. Stored in the
            canonical order gate, up, down (the order of `router_logits` within a layer).
        shared_router (`bool`, defaults to `False`):
            False: each routed projection has its own router fed with that projection's input (official code; the
            down-projection router sees the intermediate activation). True: one router per layer on the FFN input
            sends a token to the same expert index in every routed projection.
        router_aux_loss_coef (`float`, defaults to 0.01):
            Weight of the Switch load-balancing loss added to the LM loss (>= 0).
        router_z_loss_coef (`float`, defaults to 0.0):
            Weight of the ST-MoE router z-loss (>= 0; ST-MoE uses 1e-3).
        router_jitter_noise (`float`, defaults to 0.0):
            In training, the router input is multiplied by U(1 - eps, 1 + eps); must lie in [0, 1).
        expert_capacity_factor (`float`, *optional*):
            None = dropless. A float > 0 gives every expert a capacity of ceil(tokens / num_experts * factor)
            tokens per forward; overflow tokens get zero from that projection (Switch).
        expert_output_scaling (`str`, defaults to `"router_prob"`):
            How the chosen expert's output is scaled. `"router_prob"`: by the top-1 router probability p (Switch,
            official ParameterNet). `"straight_through"`: by p / stop_gradient(p), whose value is exactly 1 but whose
            gradient is the router-probability gradient divided by p; used by sparse upcycling so that the upcycled
            model computes the dense model's function at step 0 (see `pnet.upcycle.upcycle_llama`).
        output_router_logits (`bool`, defaults to `False`):
            Whether the model returns the router logits (the aux/z losses are computed whenever labels are given).

    Invalid values raise `ValueError` naming the field, the value and what is allowed.
    """

    model_type = "pnet_llama"
    # Tensor parallelism for attention only: routed projections hold 3-D expert weights that LLaMA's plan would split
    # along the wrong dimension.
    base_model_tp_plan = {
        "layers.*.self_attn.q_proj": "colwise",
        "layers.*.self_attn.k_proj": "colwise",
        "layers.*.self_attn.v_proj": "colwise",
        "layers.*.self_attn.o_proj": "rowwise",
    }

    num_experts: int = 8
    moe_projections: list[str] | tuple[str, ...] = ("down",)
    shared_router: bool = False
    router_aux_loss_coef: float | int = 0.01
    router_z_loss_coef: float | int = 0.0
    router_jitter_noise: float | int = 0.0
    expert_capacity_factor: float | int | None = None
    expert_output_scaling: str = "router_prob"
    output_router_logits: bool = False

    def __setattr__(self, name, value):
        rule = FIELD_RULES.get(name)
        if rule is not None:
            if not rule.accepts(value):
                raise ValueError(f"{name} must {rule.allowed}, got {value!r}")
            if rule.canonical is not None:
                value = rule.canonical(value)
        super().__setattr__(name, value)


def _strict_errors_as_value_errors(init):
    """`@strict` wraps type and validator failures in `StrictDataclassError`, which is not a `ValueError`; re-raise
    them as `ValueError` (with the same message naming the field and value) so bad configs fail in one way."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        try:
            init(self, *args, **kwargs)
        except StrictDataclassError as error:
            raise ValueError(f"invalid {type(self).__name__}: {error}") from error

    return __init__


PNetLlamaConfig.__init__ = _strict_errors_as_value_errors(PNetLlamaConfig.__init__)
PNetLlamaConfig.register_for_auto_class()

__all__ = ["PNetLlamaConfig", "MOE_PROJECTION_NAMES", "EXPERT_OUTPUT_SCALINGS", "TRANSFORMERS_REQUIREMENT"]
