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


class InvalidConfigError(ValueError):
    """A config that cannot describe a model (a size below 1, a value its config class refuses): never counted."""


# Top-level config keys that are sizes or counts (hidden_size, head_dim, num_experts, embed_dim, depths, ...): each
# number, or each number of a list, must be >= 1, else the arithmetic gives negative or meaningless counts.
SIZE_KEY_SUFFIXES = ("_size", "_dim", "_channels", "_layers", "_heads", "_embeddings", "_experts")
SIZE_KEYS = ("depths", "num_heads", "mlp_ratio")


def load_config_dict(path: str) -> dict:
    """Read a config JSON file, or the `config.json` of a saved model folder."""
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config file at {path!r}: pass a config .json or a saved model folder")
    with open(path, encoding="utf-8") as f:
        try:
            values = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:  # a binary file (a GGUF, weights) too
            raise InvalidConfigError(
                f"{path!r} is not JSON ({error}); pass a model config .json (configs/models/*.json, "
                "configs/vision/*.json) or a saved model folder, not a training YAML"
            ) from None
    if not isinstance(values, dict):
        raise InvalidConfigError(f"{path!r} holds a JSON {type(values).__name__}; a model config is a JSON object")
    return values


def check_config(config: dict, path: str) -> None:
    """Refuse a config whose counts would be meaningless, naming the key and what is allowed: its config class's
    own validation (unknown keys, ranges), then every size or count key (`SIZE_KEY_SUFFIXES`, `SIZE_KEYS`) >= 1."""
    from pnet.model_loading import make_config

    try:
        make_config(config, where=path)
    except ValueError as error:
        raise InvalidConfigError(str(error)) from None
    for key, value in config.items():
        if not (key.endswith(SIZE_KEY_SUFFIXES) or key.startswith("num_") or key in SIZE_KEYS):
            continue
        numbers = value if isinstance(value, list) else [value]
        if any(isinstance(v, (int, float)) and not isinstance(v, bool) and v < 1 for v in numbers):
            raise InvalidConfigError(f"{path}: {key}={value!r} is invalid; allowed: a number >= 1 (each, for a list)")


def count_config(path: str, **kwargs) -> CountReport:
    """Dispatch on `model_type` to the family's counting code, after `check_config`."""
    config = load_config_dict(path)
    model_type = config.get("model_type")
    name = os.path.splitext(os.path.basename(os.path.normpath(path)))[0]
    if model_type in ("pnet_llama", "llama"):
        from pnet.llama_counting import count_llama as count
    elif model_type in VISION_MODEL_TYPES:
        from pnet.vision_counting import count_vision as count
    else:
        raise ValueError(
            f"model_type {model_type!r} in {path!r} is not countable; allowed: 'pnet_llama', 'llama', "
            + ", ".join(repr(t) for t in VISION_MODEL_TYPES)
        )
    check_config(config, path)
    report = count(config, name=name, **kwargs)
    if not 0 <= report.active_params <= report.total_params or report.flops < 0:  # a rule check_config lacks
        raise InvalidConfigError(
            f"{path}: the config gives {report.total_params:,} parameters, {report.active_params:,} active and "
            f"{report.flops:,} FLOPs; allowed: 0 <= active <= total, FLOPs >= 0"
        )
    return report


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
    try:
        for path in args.configs:
            model_type = load_config_dict(path).get("model_type")
            if model_type in VISION_MODEL_TYPES:
                options = {} if args.image_size is None else {"image_size": args.image_size}
            else:
                options = {} if args.seq_len is None else {"seq_len": args.seq_len}
            report = count_config(path, **options)
            print(json.dumps(report.to_dict()) if args.json else format_report(report))
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"pnet-count: error: {error}\n")

if __name__ == "__main__":
    main()
