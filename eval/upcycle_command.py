"""pnet-upcycle: sparse upcycling of a dense LLaMA into a Hub-ready PNet-LLaMA folder, with its model card.

    pnet-upcycle LLAMA_DIR_OR_HUB_ID OUT_DIR --num-experts 8 --projections up [down gate] [--shared-router]
                 [--perturb-fraction 0.5 --seed 0]

`pnet.upcycle.upcycle` writes the folder (every expert a copy of the dense projection, fresh routers; with the default
``straight_through`` scaling the dense function is checked on a probe batch before anything is written) and this
command adds the model card (`pnet_eval.model_card`), which says how the folder was made. The command lives here,
above `pnet`, because the card reads evaluation results: `pnet` never imports `pnet_eval`. Continue training the
folder with ``scripts/pretrain.py`` and ``init_from: OUT_DIR``.
"""

from __future__ import annotations

import argparse

from pnet.run_lock import OutputLockedError, OutputNotWritableError
from pnet.upcycle import EXPERT_OUTPUT_SCALINGS, MOE_PROJECTION_NAMES, upcycle

# Heavy imports (torch, transformers, the model code, the card writer) happen after the arguments are parsed:
# `--help` and argument errors answer at once.


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pnet-upcycle", description=__doc__.split("\n\n")[0])
    parser.add_argument("llama", help="dense LLaMA: a saved folder or a Hub id")
    parser.add_argument("out_dir", help="the PNet-LLaMA folder to write (never the dense folder itself)")
    parser.add_argument("--num-experts", type=int, default=8, help="experts per routed projection (default: 8)")
    parser.add_argument("--projections", nargs="+", default=["down"], metavar="NAME",
                        help=f"projections to route, from {list(MOE_PROJECTION_NAMES)} (default: down)")
    parser.add_argument("--shared-router", action="store_true",
                        help="one router per layer on the FFN input, followed by every routed projection "
                             "(default: one router per routed projection)")
    parser.add_argument("--expert-output-scaling", default="straight_through", choices=EXPERT_OUTPUT_SCALINGS,
                        help="straight_through (default) keeps the dense function at step 0; router_prob is Switch's")
    parser.add_argument("--perturb-fraction", type=float, default=0.0, metavar="R",
                        help="Drop-Upcycling: re-initialise this fraction of each expert's intermediate dimensions "
                             "(0 <= R <= 1; default: 0, exact copies)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the routers' initialisation and of --perturb-fraction (default: 0)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    args = parser.parse_args(argv)
    try:
        summary = upcycle(args.llama, args.out_dir, args.num_experts, args.projections, args.expert_output_scaling,
                          args.overwrite, args.shared_router, args.perturb_fraction, args.seed,
                          write_card=_write_card)
    except (ValueError, FileExistsError, FileNotFoundError, OutputLockedError, OutputNotWritableError) as error:
        parser.error(str(error))
    print(f"{summary['out_dir']}: {summary['dense_parameters']:,} -> {summary['upcycled_parameters']:,} parameters; "
          f"max |logit difference| to the dense model on a probe batch: {summary['max_logit_difference']:.2e}")


def _write_card(model_dir, name: str) -> None:
    # Imported only once the folder is written: the card writer imports torch and transformers (the counts), and
    # `upcycle` refuses bad arguments and paths before that.
    from pnet_eval.model_card import write_card

    write_card(model_dir, name=name)


if __name__ == "__main__":
    main()
