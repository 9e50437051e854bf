"""What `pnet-count` reports for one model config: the result type shared by the LLaMA and vision arithmetic."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Vision model types (counted by `pnet.vision_counting`).
VISION_MODEL_TYPES = ("parameternet", "swin", "pnet_swin")


@dataclass
class CountReport:
    """What `pnet-count` prints for one config. FLOPs follow `flops_convention`, stated in words."""

    name: str
    model_type: str
    total_params: int
    active_params: int
    flops: int
    flops_convention: str
    # Extra named figures (router FLOPs, dynamic-conv overhead, per-part breakdowns), printed in order.
    details: dict[str, int | float | str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def short_number(n: float | None, kind: str = "flops") -> str:
    """917.51G for FLOPs, 2.35B for parameters (kind="params"), "-" for None."""
    if n is None:
        return "-"
    giga = "B" if kind == "params" else "G"
    for unit, scale in (("T", 1e12), (giga, 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
