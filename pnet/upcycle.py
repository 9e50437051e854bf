"""pnet-upcycle: sparse upcycling of a dense LLaMA into a Hub-ready PNet-LLaMA folder.

    pnet-upcycle LLAMA_DIR_OR_HUB_ID OUT_DIR --num-experts 8 --projections up [down gate]

Every expert of a routed projection starts as a copy of the dense projection and the routers are fresh; with the
default ``straight_through`` output scaling the upcycled model computes the dense model's function at step 0, which
the command checks on a probe batch before writing anything. The folder holds safetensors weights, a config with
``auto_map`` and the model code (loads anywhere with ``trust_remote_code=True``), the dense model's tokenizer (with a
pad token and ``model_max_length``) and a model card. Continue training it with ``scripts/pretrain.py`` and
``init_from: OUT_DIR``.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from modeling_pnet_llama import PNetLlamaForCausalLM
from modeling_pnet_llama.configuration_pnet_llama import EXPERT_OUTPUT_SCALINGS, MOE_PROJECTION_NAMES
from pnet.checkpoint import publish_dir
from pnet.model_loading import prepare_tokenizer_for_model

# The largest |logit| difference between the dense and the upcycled model on the probe batch with straight-through
# scaling (float32 rounding of the same sums in another order).
FUNCTION_PRESERVED_ATOL = 1e-3


def check_arguments(num_experts: int, projections: list[str], expert_output_scaling: str) -> None:
    if num_experts < 1:
        raise ValueError(f"--num-experts must be >= 1, got {num_experts}")
    unknown = [p for p in projections if p not in MOE_PROJECTION_NAMES]
    if not projections or unknown or len(set(projections)) != len(projections):
        raise ValueError(f"--projections must be distinct names from {list(MOE_PROJECTION_NAMES)}, got {projections}")
    if expert_output_scaling not in EXPERT_OUTPUT_SCALINGS:
        raise ValueError(f"--expert-output-scaling must be one of {list(EXPERT_OUTPUT_SCALINGS)}, "
                         f"got {expert_output_scaling!r}")


@torch.no_grad()
def max_logit_difference(dense: torch.nn.Module, upcycled: torch.nn.Module, vocab_size: int) -> float:
    """Largest |logit| difference between the two models on a fixed batch of 2 x 32 token ids."""
    probe = torch.randint(0, vocab_size, (2, 32), generator=torch.Generator().manual_seed(0)).to(dense.device)
    return (dense(probe).logits.float() - upcycled(probe).logits.float()).abs().max().item()


def upcycle(llama: str, out_dir: str | Path, num_experts: int, projections: list[str],
            expert_output_scaling: str = "straight_through", overwrite: bool = False) -> dict:
    """Upcycle the LLaMA folder or Hub id ``llama`` into ``out_dir``; returns a summary (parameter counts, the
    function check). Arguments are checked before any weight is read; the folder appears complete or not at all."""
    check_arguments(num_experts, projections, expert_output_scaling)
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    dense_config = AutoConfig.from_pretrained(llama)  # a LLaMA folder carries no code: nothing is executed
    if dense_config.model_type != "llama":
        raise ValueError(f"{llama}: model_type {dense_config.model_type!r}; pnet-upcycle takes a dense LLaMA "
                         "('llama'), whose parameter names it maps onto PNet-LLaMA's")

    dense = AutoModelForCausalLM.from_pretrained(llama).eval()
    model = PNetLlamaForCausalLM.from_llama(dense, num_experts=num_experts, moe_projections=projections,
                                            expert_output_scaling=expert_output_scaling).eval()
    difference = max_logit_difference(dense, model, dense_config.vocab_size)
    if expert_output_scaling == "straight_through" and difference > FUNCTION_PRESERVED_ATOL:
        raise RuntimeError(f"the upcycled model does not compute the dense function: max |logit difference| "
                           f"{difference:.3g} > {FUNCTION_PRESERVED_ATOL}")
    tokenizer = prepare_tokenizer_for_model(AutoTokenizer.from_pretrained(llama), model.config)

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    from pnet_eval.model_card import build_card  # the card reads the saved folder

    build_card(tmp).save(tmp / "README.md")
    publish_dir(tmp, out_dir)
    return {
        "dense_parameters": sum(p.numel() for p in dense.parameters()),
        "upcycled_parameters": sum(p.numel() for p in model.parameters()),
        "max_logit_difference": difference,
        "out_dir": str(out_dir),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pnet-upcycle", description=__doc__.split("\n\n")[0])
    parser.add_argument("llama", help="dense LLaMA: a saved folder or a Hub id")
    parser.add_argument("out_dir", help="the PNet-LLaMA folder to write")
    parser.add_argument("--num-experts", type=int, default=8, help="experts per routed projection (default: 8)")
    parser.add_argument("--projections", nargs="+", default=["down"], metavar="NAME",
                        help=f"projections to route, from {list(MOE_PROJECTION_NAMES)} (default: down)")
    parser.add_argument("--expert-output-scaling", default="straight_through", choices=EXPERT_OUTPUT_SCALINGS,
                        help="straight_through (default) keeps the dense function at step 0; router_prob is Switch's")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    try:
        summary = upcycle(args.llama, args.out_dir, args.num_experts, args.projections, args.expert_output_scaling,
                          args.overwrite)
    except (ValueError, FileExistsError) as error:
        parser.error(str(error))
    print(f"{summary['out_dir']}: {summary['dense_parameters']:,} -> {summary['upcycled_parameters']:,} parameters; "
          f"max |logit difference| to the dense model on a probe batch: {summary['max_logit_difference']:.2e}")


if __name__ == "__main__":
    main()
