"""`pnet-count`: total / active parameters and forward FLOPs of a model config, the paper's arithmetic.

One entry point for both families; the family-specific arithmetic lives in `pnet.llama_counting`
(PNet-LLaMA, Table 7) and `pnet.vision_counting` (GhostNet / ParameterNet / RepConv / Swin, Tables 2, 4, 5, 6).
"""

from __future__ import annotations

import argparse
import json
import os
from dataclasses import asdict, dataclass, field

# Vision model types (counted by `pnet.vision_counting`, imported lazily: it imports torch and the models).
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


def load_config_dict(path: str) -> dict:
    """Read a config JSON file, or the `config.json` of a saved model folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path!r}: pass a config .json or a saved model folder")
    with open(path) as f:
        return json.load(f)


def count_config(path: str, **kwargs) -> CountReport:
    """Dispatch on `model_type` to the family's counting code."""
    config = load_config_dict(path)
    model_type = config.get("model_type")
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if model_type in ("pnet_llama", "llama"):
        from pnet.llama_counting import count_llama

        return count_llama(config, name=name, **kwargs)
    if model_type in VISION_MODEL_TYPES:
        from pnet.vision_counting import count_vision

        return count_vision(config, name=name, **kwargs)
    raise ValueError(
        f"model_type {model_type!r} in {path!r} is not countable; allowed: 'pnet_llama', 'llama', "
        + ", ".join(repr(t) for t in VISION_MODEL_TYPES)
    )


def short_number(n: float | None, kind: str = "flops") -> str:
    """917.51G for FLOPs, 2.35B for parameters (kind="params"), "-" for None."""
    if n is None:
        return "-"
    giga = "B" if kind == "params" else "G"
    for unit, scale in (("T", 1e12), (giga, 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_report(report: CountReport) -> str:
    lines = [
        f"{report.name} ({report.model_type})",
        f"  {'total params':<22} {report.total_params:>18,d}  ({short_number(report.total_params, 'params')})",
        f"  {'active params':<22} {report.active_params:>18,d}  ({short_number(report.active_params, 'params')})",
        f"  {'forward FLOPs':<22} {report.flops:>18,d}  ({short_number(report.flops)})",
    ]
    for key, value in report.details.items():
        if isinstance(value, int) and value >= 10_000:
            lines.append(f"  {key:<22} {value:>18,d}  ({short_number(value, 'params' if 'param' in key else 'flops')})")
        else:
            lines.append(f"  {key:<22} {value}")
    lines.append(f"  convention: {report.flops_convention}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pnet-count", description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="config .json files or saved model folders")
    parser.add_argument("--json", action="store_true", help="print one JSON object per config instead of text")
    parser.add_argument("--seq-len", type=int, default=None, help="language models: tokens per forward (default 512)")
    parser.add_argument("--image-size", type=int, default=None, help="vision models: input side (default: config's)")
    args = parser.parse_args(argv)
    for path in args.configs:
        model_type = load_config_dict(path).get("model_type")
        if model_type in VISION_MODEL_TYPES:
            options = {} if args.image_size is None else {"image_size": args.image_size}
        else:
            options = {} if args.seq_len is None else {"seq_len": args.seq_len}
        report = count_config(path, **options)
        print(json.dumps(report.to_dict()) if args.json else format_report(report))


if __name__ == "__main__":
    main()
