"""Sparse upcycling of a dense LLaMA into PNet-LLaMA: `upcycle_llama` (in memory) and `upcycle` (a Hub-ready folder;
the `pnet-upcycle` command, `pnet_eval.upcycle_command`, adds its model card).

Every expert of a routed projection starts as a copy of the dense projection and the routers are fresh; with the
default ``straight_through`` output scaling the upcycled model computes the dense model's function at step 0, which
`upcycle` checks on a probe batch before writing anything. ``perturb_fraction=r`` (Drop-Upcycling, Nakamura et al.,
arXiv 2502.19261) then re-initialises a random fraction r of each expert's intermediate dimensions, different for
each expert, from a normal distribution with the dense matrix's mean and standard deviation, so that the experts
differ from the start and the routers have something to tell apart; the model then no longer computes the dense
function exactly (the distance is reported). The folder holds safetensors weights, a config with ``auto_map`` and the
model code (loads anywhere with ``trust_remote_code=True``), the dense model's tokenizer (with a pad token and
``model_max_length``), a record of how it was upcycled (``upcycling.json``) and, when the caller passes a card writer,
a model card. Continue training it with ``scripts/pretrain.py`` and ``init_from: OUT_DIR``. ``upcycle_llama(dense,
...)`` returns the upcycled model in memory (no checks of paths, no folder).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from pnet.checkpoint import check_new_folder, file_sha256, new_partial_dir, publish_dir
from pnet.run_lock import exclusive_output
from pnet.run_log import UPCYCLING_FILE

# Heavy imports (torch, transformers, the model code) happen inside the functions that need them: `pnet-upcycle --help`
# and its argument errors answer at once.

# The largest |logit| difference between the dense and the upcycled model on the probe batch with straight-through
# scaling (float32 rounding of the same sums in another order).
FUNCTION_PRESERVED_ATOL = 1e-3
MOE_PROJECTION_NAMES = ("gate", "up", "down")  # as modeling_pnet_llama's config (checked equal in tests)
EXPERT_OUTPUT_SCALINGS = ("router_prob", "straight_through")


# How `check_arguments` names each setting: pnet-upcycle's flags (a config file passes its own key names).
ARGUMENT_NAMES = {"num_experts": "--num-experts", "projections": "--projections",
                  "expert_output_scaling": "--expert-output-scaling", "perturb_fraction": "--perturb-fraction"}


def check_arguments(num_experts: int, projections: list[str], expert_output_scaling: str,
                    perturb_fraction: float = 0.0, names: dict[str, str] = ARGUMENT_NAMES) -> None:
    if num_experts < 1:
        raise ValueError(f"{names['num_experts']} must be >= 1, got {num_experts}")
    unknown = [p for p in projections if p not in MOE_PROJECTION_NAMES]
    if not projections or unknown or len(set(projections)) != len(projections):
        raise ValueError(f"{names['projections']} must be distinct names from {list(MOE_PROJECTION_NAMES)}, got "
                         f"{projections}")
    if expert_output_scaling not in EXPERT_OUTPUT_SCALINGS:
        raise ValueError(f"{names['expert_output_scaling']} must be one of {list(EXPERT_OUTPUT_SCALINGS)}, "
                         f"got {expert_output_scaling!r}")
    if not 0.0 <= perturb_fraction <= 1.0:
        raise ValueError(f"{names['perturb_fraction']} must lie in [0, 1], got {perturb_fraction}")


def looks_like_local_path(name: str) -> bool:
    """A Hub id is ``name`` or ``owner/name``; anything else (absolute, ./, ~, deeper paths) can only be a folder,
    and so is ``a/b`` when folder ``a`` exists here (``models/smollm2`` rather than a Hub owner ``models``)."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        return True
    return "/" in name and Path(name).parent.is_dir()


def check_paths(llama: str, out_dir: Path, overwrite: bool) -> None:
    """Refuse, before reading any weight: a missing local folder (rather than asking the Hub for it), an existing
    output folder without --overwrite, and an output folder that is, or holds, the dense input."""
    if not Path(llama).expanduser().is_dir() and looks_like_local_path(llama):
        raise FileNotFoundError(f"{llama}: no such folder (expected a dense LLaMA folder or a Hub id owner/name)")
    check_new_folder(out_dir, overwrite)
    source = Path(llama).expanduser()
    if source.is_dir() and out_dir.exists():
        source, target = source.resolve(), out_dir.resolve()
        if target == source or target in source.parents:
            raise FileExistsError(f"{out_dir} is, or holds, the dense input model {llama}: --overwrite would "
                                  "destroy it; write the upcycled model to another folder")


def load_dense_config(llama: str):
    """The dense model's config, with a one-line error if it is neither a local folder nor a reachable Hub model."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(llama)  # a LLaMA folder carries no code: nothing is executed
    except OSError as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(f"{llama}: not a local folder, and no Hub model could be read ({first_line})") from None


def check_dense_config_keys(llama: str, dense_config) -> None:
    """The upcycled config inherits every key of the dense one, and pnet's config check (the model card, pnet-count)
    refuses keys the config class does not define: refuse them here, before any weight is read."""
    from pnet.model_loading import check_config_keys, read_config_dict

    values = read_config_dict(llama)
    values.pop("model_type", None)
    config_file = Path(llama).expanduser() / "config.json"
    where = str(config_file) if config_file.is_file() else f"{llama} (config.json)"
    try:
        check_config_keys(values, type(dense_config), where)
    except ValueError as error:
        raise ValueError(f"{error}. The upcycled model would inherit them and pnet's tools refuse them: remove them "
                         "from the file (a folder from pnet-import-gguf before it dropped `unk_token_id`: delete it and "
                         "run scripts/get_real_model.sh again)") from None


def upcycle_llama(dense_model_or_path, num_experts: int = 8, moe_projections=("down",), **config_overrides):
    """Sparse upcycling in memory: a `PNetLlamaForCausalLM` whose experts are all copies of a dense LLaMA's
    projections, with fresh routers (seeded by torch's global generator).

    `dense_model_or_path`: a `LlamaForCausalLM` (or any causal LM with LLaMA's parameter names), or a Hub id / local
    folder loaded with `AutoModelForCausalLM.from_pretrained` (a LLaMA folder carries no code: nothing is executed).
    `config_overrides` are PNet-LLaMA config fields. The default `expert_output_scaling="straight_through"` (value
    exactly 1, router gradient kept) makes the upcycled model compute the dense function at step 0 for any
    `num_experts`; Switch's `"router_prob"` would scale every output by p < 1."""
    from transformers import AutoModelForCausalLM

    from modeling_pnet_llama import PNetLlamaConfig, PNetLlamaForCausalLM

    if isinstance(dense_model_or_path, (str, bytes)) or hasattr(dense_model_or_path, "__fspath__"):
        dense = AutoModelForCausalLM.from_pretrained(dense_model_or_path)
    else:
        dense = dense_model_or_path
    dense_config = dense.config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        dense_config.pop(key, None)
    dense_config.update(num_experts=num_experts, moe_projections=list(moe_projections),
                        expert_output_scaling="straight_through")
    dense_config.update(config_overrides)
    config = PNetLlamaConfig(**dense_config)
    model = PNetLlamaForCausalLM(config).to(dtype=dense.dtype, device=dense.device)

    # "...mlp.down_proj.weight" of a routed projection -> a copy in every expert
    routed_suffixes = tuple(f"mlp.{name}_proj.weight" for name in config.moe_projections)
    upcycled_state = {
        key: value.expand(config.num_experts, *value.shape).clone() if key.endswith(routed_suffixes) else value
        for key, value in dense.state_dict().items()
    }
    result = model.load_state_dict(upcycled_state, strict=False)
    not_routers = [key for key in result.missing_keys if not key.endswith("router.weight")]
    if not_routers or result.unexpected_keys:
        raise ValueError(f"dense model {type(dense).__name__} does not have LLaMA's parameter layout: missing "
                         f"{not_routers[:8]}, unexpected {list(result.unexpected_keys)[:8]}")
    return model


def max_logit_difference(dense, upcycled, vocab_size: int) -> float:
    """Largest |logit| difference between the two models on a fixed batch of 2 x 32 token ids."""
    import torch

    probe = torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).to(dense.device)
    with torch.no_grad():
        return (dense(probe).logits.float() - upcycled(probe).logits.float()).abs().max().item()


def perturb_experts(model, fraction: float, seed: int) -> int:
    """Drop-Upcycling (arXiv 2502.19261) on an upcycled PNet-LLaMA, in place: in every layer, each expert index e
    draws its own random set of round(fraction * intermediate_size) intermediate dimensions, and every routed
    projection re-initialises them in expert e (rows of gate/up, columns of down) from a normal distribution with the
    mean and standard deviation of the dense matrix. Routed projections of one layer share the index sets, so that
    with a shared router expert e of gate, up and down is one FFN expert, as in the paper. Seeded; returns the number
    of re-initialised values."""
    import torch

    config = model.config
    num_dims = round(fraction * config.intermediate_size)
    if num_dims == 0:
        return 0
    generator = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for layer in range(config.num_hidden_layers):
            weights = {p: model.get_parameter(f"model.layers.{layer}.mlp.{p}_proj.weight")
                       for p in config.moe_projections}
            # Statistics of the dense matrix: every expert still holds an exact copy of it.
            stats = {p: (w[0].mean().item(), w[0].std().item()) for p, w in weights.items()}
            for expert in range(config.num_experts):
                dims = torch.randperm(config.intermediate_size, generator=generator)[:num_dims]
                for projection, weight in weights.items():
                    mean, std = stats[projection]
                    axis = 1 if projection == "down" else 0  # the intermediate axis of this expert's matrix
                    shape = list(weight.shape[1:])
                    shape[axis] = num_dims
                    fresh = torch.normal(mean, std, shape, generator=generator).to(weight.dtype)
                    weight[expert].index_copy_(axis, dims.to(weight.device), fresh.to(weight.device))
                    changed += fresh.numel()
    return changed


def local_name(llama: str) -> str:
    """How the card names the dense model: a Hub id as given, a local folder by its name only (no local path)."""
    path = Path(llama).expanduser()
    return path.resolve().name if path.is_dir() else llama


def upcycle(llama: str, out_dir: str | Path, num_experts: int, projections: list[str],
            expert_output_scaling: str = "straight_through", overwrite: bool = False, shared_router: bool = False,
            perturb_fraction: float = 0.0, seed: int = 0, write_card: Callable[..., object] | None = None) -> dict:
    """Upcycle the LLaMA folder or Hub id ``llama`` into ``out_dir``; returns a summary (parameter counts, the
    function check). Arguments and paths are checked before any weight is read; the folder appears complete or not
    at all. ``write_card(folder, name=...)`` writes the model card into the folder before it is published, under the
    name the folder publishes as (the card reads the saved folder; `pnet-upcycle` passes
    `pnet_eval.model_card.write_card`, which this layer may not import)."""
    check_arguments(num_experts, projections, expert_output_scaling, perturb_fraction)
    out_dir = Path(out_dir)
    check_paths(llama, out_dir, overwrite)
    # OUT_DIR is replaced whole (written beside, then renamed), so its lock is a file beside it.
    with exclusive_output(out_dir, lock_path=out_dir.with_name(f".{out_dir.name}.pnet-upcycle.lock")):
        return _upcycle(llama, out_dir, num_experts, projections, expert_output_scaling, shared_router,
                        perturb_fraction, seed, write_card)


def _upcycle(llama: str, out_dir: Path, num_experts: int, projections: list[str], expert_output_scaling: str,
             shared_router: bool, perturb_fraction: float, seed: int,
             write_card: Callable[..., object] | None) -> dict:
    dense_config = load_dense_config(llama)
    if dense_config.model_type != "llama":
        raise ValueError(f"{llama}: model_type {dense_config.model_type!r}; pnet-upcycle takes a dense LLaMA "
                         "('llama'), whose parameter names it maps onto PNet-LLaMA's")
    check_dense_config_keys(llama, dense_config)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pnet.model_loading import prepare_tokenizer_for_model

    import torch

    dense = AutoModelForCausalLM.from_pretrained(llama).eval()
    torch.manual_seed(seed)  # the fresh routers: the same command writes the same folder
    model = upcycle_llama(dense, num_experts=num_experts, moe_projections=projections,
                          expert_output_scaling=expert_output_scaling, shared_router=shared_router).eval()
    difference = max_logit_difference(dense, model, dense_config.vocab_size)
    if expert_output_scaling == "straight_through" and difference > FUNCTION_PRESERVED_ATOL:
        raise RuntimeError(f"the upcycled model does not compute the dense function: max |logit difference| "
                           f"{difference:.3g} > {FUNCTION_PRESERVED_ATOL}")
    dense_weights = Path(llama).expanduser() / "model.safetensors"  # provenance (a Hub id or sharded weights: none)
    record = {
        "dense_model": local_name(llama),
        "dense_weights_sha256": file_sha256(dense_weights) if dense_weights.is_file() else None,
        "method": "sparse upcycling: every expert a copy of the dense projection, fresh routers",
        "num_experts": num_experts,
        "moe_projections": list(model.config.moe_projections),
        "shared_router": shared_router,
        "expert_output_scaling": expert_output_scaling,
        "max_logit_difference_before_perturbation": difference,
        "perturb_fraction": perturb_fraction,
        "seed": seed,
    }
    if perturb_fraction > 0:
        record["perturbed_values"] = perturb_experts(model, perturb_fraction, seed)
        record["max_logit_difference"] = difference = max_logit_difference(dense, model, dense_config.vocab_size)
    tokenizer = prepare_tokenizer_for_model(AutoTokenizer.from_pretrained(llama), model.config)

    tmp = new_partial_dir(out_dir)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / UPCYCLING_FILE).write_text(json.dumps(record, indent=2) + "\n")
    if write_card is not None:
        write_card(tmp, name=out_dir.name)  # not the name of the folder it is written in, `OUT_DIR.tmp`
    publish_dir(tmp, out_dir)
    return {
        "dense_parameters": sum(p.numel() for p in dense.parameters()),
        "upcycled_parameters": sum(p.numel() for p in model.parameters()),
        "max_logit_difference": difference,
        "out_dir": str(out_dir),
    }
