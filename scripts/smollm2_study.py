"""Measurements on the real upcycled model for results/smollm2.md that no pnet command makes.

    python scripts/smollm2_study.py perturbation DENSE UPCYCLED [UPCYCLED ...]   # before any training
    python scripts/smollm2_study.py lora UPCYCLED [--steps 12]                   # LoRA on the experts (PEFT)

``perturbation``: on a slice of the bundled held-out text (Botchan, chapter I: 2 x 512 tokens), each upcycled model's
distance from the dense model (max and mean |logit difference|, agreement of the next-token argmax), its perplexity
on that slice, and the mean entropy of its routers' probabilities (as a share of log E: 1.0 = uniform) with the
largest share of tokens any one expert receives. ``lora``: LoRA (r=8) on attention q/v and on every routed
projection's 3-D expert weight through PEFT ``target_parameters``; trains on chapters II-III, prints the training loss
and the loss on chapter I before and after, then checks that ``merge_and_unload`` gives the adapted model's logits.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import time
from importlib import resources
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import modeling_pnet_llama  # noqa: F401  (registers PNet-LLaMA with the Auto classes: no folder code runs)

MERGE_ATOL = 1e-4  # merged vs adapted logits: the same sums, rounded in another order


def heldout_chapters() -> list[str]:
    path = resources.files("pnet_eval.data.heldout") / "botchan.jsonl.gz"
    with gzip.open(path, "rt") as file:
        return [json.loads(line)["text"] for line in file]


def token_batch(tokenizer, text: str, rows: int, length: int) -> torch.Tensor:
    ids = tokenizer(text).input_ids[: rows * length]
    if len(ids) < rows * length:
        raise ValueError(f"text has {len(ids)} tokens, fewer than {rows} x {length}")
    return torch.tensor(ids).view(rows, length)


def load(folder: str):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@torch.no_grad()
def perturbation(dense_dir: str, upcycled_dirs: list[str]) -> None:
    tokenizer = AutoTokenizer.from_pretrained(dense_dir)
    batch = token_batch(tokenizer, heldout_chapters()[0], rows=2, length=512)
    dense_logits = load(dense_dir)(batch).logits
    print(f"slice: Botchan chapter I, {batch.numel()} tokens; dense perplexity "
          f"{perplexity(dense_logits, batch):.3f}")
    for folder in upcycled_dirs:
        model = load(folder)
        out = model(batch, output_router_logits=True)
        difference = (out.logits - dense_logits).abs()
        agreement = (out.logits.argmax(-1) == dense_logits.argmax(-1)).float().mean().item()
        entropies, top_shares = [], []
        for logits in out.router_logits:
            probs = logits.float().softmax(-1)
            entropies.append((-(probs * probs.clamp_min(1e-12).log()).sum(-1)).mean().item() / math.log(probs.shape[-1]))
            top_shares.append(torch.bincount(probs.argmax(-1), minlength=probs.shape[-1]).max().item() / len(probs))
        print(f"{folder}: max |logit diff| {difference.max():.3f}, mean {difference.mean():.4f}, argmax agreement "
              f"{agreement:.3f}, perplexity {perplexity(out.logits, batch):.3f}, router entropy / log E "
              f"{sum(entropies) / len(entropies):.4f}, busiest expert's token share (mean over routers) "
              f"{sum(top_shares) / len(top_shares):.3f}")


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    return math.exp(loss.item())


def lora(folder: str, steps: int, lr: float) -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    chapters = heldout_chapters()
    train = token_batch(tokenizer, chapters[1] + chapters[2], rows=steps * 2, length=128).view(steps, 2, 128)
    heldout = token_batch(tokenizer, chapters[0], rows=2, length=256)
    model = load(folder)
    routed = [f"{name}_proj.weight" for name in model.config.moe_projections]
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                             target_parameters=routed))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expert_adapters = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and ".mlp." in n)
    print(f"{folder}: LoRA r=8 on q_proj, v_proj and {routed}: {trainable:,} trainable parameters "
          f"({expert_adapters:,} on the experts)")
    with torch.no_grad():
        before = model(input_ids=heldout, labels=heldout).loss.item()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    start = time.time()
    for step, ids in enumerate(train):
        loss = model(input_ids=ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        print(f"step {step + 1}/{steps}: train loss {loss.item():.4f}")
    print(f"{steps} steps of 2 x 128 tokens in {time.time() - start:.0f} s")
    model.eval()
    with torch.no_grad():
        after = model(input_ids=heldout, labels=heldout)
        merged = model.merge_and_unload()
        merged_logits = merged(heldout).logits
    print(f"held-out loss (chapter I, 2 x 256 tokens, includes the router aux loss): {before:.4f} -> "
          f"{after.loss.item():.4f}")
    difference = (merged_logits - after.logits).abs().max().item()
    print(f"merge_and_unload: max |logit difference| merged vs adapted {difference:.2e} (tolerance {MERGE_ATOL})")
    if difference > MERGE_ATOL:
        raise SystemExit("merged model differs from the adapted one")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("perturbation")
    p.add_argument("dense")
    p.add_argument("upcycled", nargs="+")
    p = sub.add_parser("lora")
    p.add_argument("upcycled")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    folders = [args.dense, *args.upcycled] if args.command == "perturbation" else [args.upcycled]
    for folder in folders:  # a missing folder was taken for a Hub id ("Repo id must be in the form ...")
        if not (Path(folder) / "config.json").is_file():
            parser.error(f"{folder}: not a saved model folder (no config.json)")
    upcycled = args.upcycled if args.command == "perturbation" else [args.upcycled]
    for folder in upcycled:
        if (model_type := json.loads((Path(folder) / "config.json").read_text()).get("model_type")) != "pnet_llama":
            parser.error(f"{folder}: model_type {model_type!r}; allowed: an upcycled PNet-LLaMA ('pnet_llama') folder")
    if args.command == "lora" and (args.steps < 1 or not args.lr > 0):
        parser.error(f"--steps {args.steps} / --lr {args.lr}: allowed: steps >= 1, lr > 0")
    if args.command == "perturbation":
        perturbation(args.dense, args.upcycled)
    else:
        lora(args.upcycled, args.steps, args.lr)


if __name__ == "__main__":
    main()
