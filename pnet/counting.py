"""pnet-count: total / active parameters and forward FLOPs of a model config, the paper's arithmetic.

One entry point for both families; the family-specific arithmetic lives in `pnet.llama_counting`
(PNet-LLaMA, Table 7) and `pnet.vision_counting` (GhostNet / ParameterNet / RepConv / Swin, Tables 2, 4, 5, 6),
imported when needed (the vision arithmetic imports torch and the models); both return a
`pnet.count_report.CountReport`.
"""

from __future__ import annotations

import argparse
import json
import os

from pnet.count_report import VISION_MODEL_TYPES, CountReport, short_number


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
