"""Fine-tune a pretrained PNet-LLaMA (or LLaMA) folder as an SST-2 sentiment classifier (the paper's Table 7).

    python scripts/finetune_sst2.py MODEL_DIR                       # Hub: nyu-mll/glue sst2, train -> validation
    python scripts/finetune_sst2.py MODEL_DIR --data-dir bundled    # offline: eval/data/sst2 (validation only)

The data is read with `datasets.load_dataset` either way: the Hub dataset, or JSON Lines with GLUE's columns
(`sentence`, `label`, `idx`) in `DATA_DIR/sst2/{train,validation}.jsonl[.gz]`. When there is no train split
(the offline copy has only the 872 validation sentences) the validation sentences are split with a fixed seed
into a fine-tuning part and a held-out part, accuracy is measured on the held-out part only, and every output
labels the number "SST-2 (held-out half of validation, offline)".

Outputs (in --output-dir, default MODEL_DIR/sst2_finetune): `train_log.jsonl` (one row per logged step and
one per epoch evaluation), `training.png` (loss curve), `sst2_results.json`, and the classifier
(`--save-model`). The result JSON is also copied to MODEL_DIR/sst2_results.json, where `pnet-report` and
`pnet-card` look for it.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

from pnet.train_utils import plot_training
from pnet_eval.zero_shot import BUNDLED_DATA_DIR, hub_is_offline

LABEL_HUB = "SST-2 (validation)"
LABEL_OFFLINE_HELDOUT = "SST-2 (held-out half of validation, offline)"


def load_sst2(dataset: str, dataset_config: str, data_dir: str | None) -> tuple[datasets.DatasetDict, str]:
    """SST-2 splits from the Hub or from local JSON Lines; returns (splits, where they came from)."""
    if data_dir is None and hub_is_offline():
        data_dir = "bundled"
    if data_dir is None:
        return datasets.load_dataset(dataset, dataset_config), f"hub:{dataset}/{dataset_config}"
    root = BUNDLED_DATA_DIR if data_dir == "bundled" else Path(data_dir).expanduser().resolve()
    files = {}
    for split in ("train", "validation"):
        found = [p for p in (root / "sst2" / f"{split}.jsonl", root / "sst2" / f"{split}.jsonl.gz") if p.is_file()]
        if found:
            files[split] = str(found[0])
    if "validation" not in files:
        present = sorted(str(p.relative_to(root)) for p in root.rglob("*.jsonl*")) if root.is_dir() else []
        raise FileNotFoundError(
            f"no sst2/validation.jsonl[.gz] under {str(root)!r} (train is optional); it holds: {present or 'nothing'}"
        )
    return datasets.load_dataset("json", data_files=files), f"local:{root / 'sst2'}"


def split_for_finetuning(
    splits: datasets.DatasetDict, heldout_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset, str, str]:
    """(fine-tuning set, evaluation set, evaluation split name, label for every report)."""
    if "train" in splits:
        return splits["train"], splits["validation"], "validation", LABEL_HUB
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"--heldout-fraction must lie in (0, 1), got {heldout_fraction}")
    parts = splits["validation"].train_test_split(test_size=heldout_fraction, seed=seed)
    label = (
        LABEL_OFFLINE_HELDOUT
        if heldout_fraction == 0.5
        else LABEL_OFFLINE_HELDOUT.replace("half", f"{heldout_fraction:g}")
    )
    return parts["train"], parts["test"], f"validation (held-out {heldout_fraction:g}, seed {seed})", label


def make_loader(
    ds: datasets.Dataset, tokenizer, batch_size: int, max_length: int, shuffle: bool, seed: int
) -> DataLoader:
    """Batches padded to their longest sentence (right padding; the classifier reads the last non-pad token)."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = tokenizer(
            [r["sentence"] for r in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batch["labels"] = torch.tensor([int(r["label"]) for r in rows])
        return dict(batch)

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


@torch.no_grad()
def accuracy(model, loader: DataLoader, device: torch.device, autocast_dtype: torch.dtype | None) -> float:
    model.eval()
    correct = total = 0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        correct += (logits.argmax(-1) == batch["labels"]).sum().item()
        total += batch["labels"].numel()
    model.train()
    return correct / max(total, 1)


def finetune(args: argparse.Namespace) -> dict:
    model_dir = Path(args.model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} does not exist or has no config.json")
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bf16 autocast on GPUs; fp32 on CPU, where bf16 matmuls are far slower.
    autocast_dtype = torch.bfloat16 if device.type == "cuda" and args.bf16 else None

    splits, source = load_sst2(args.dataset, args.dataset_config, args.data_dir)
    train_set, eval_set, eval_split, label = split_for_finetuning(splits, args.heldout_fraction, args.seed)
    if args.max_train_samples:
        train_set = train_set.select(range(min(args.max_train_samples, len(train_set))))
    if args.max_eval_samples:
        eval_set = eval_set.select(range(min(args.max_eval_samples, len(eval_set))))

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=True)
    if tokenizer.pad_token is None:  # the LLaMA tokenizer has none; <unk> never occurs in byte-fallback text
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=True)
    config.num_labels = 2
    config.id2label, config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    config.pad_token_id = tokenizer.pad_token_id  # the classifier reads the last non-pad token
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, config=config, trust_remote_code=True).to(
        device
    )

    train_loader = make_loader(train_set, tokenizer, args.batch_size, args.max_length, shuffle=True, seed=args.seed)
    eval_loader = make_loader(eval_set, tokenizer, args.eval_batch_size, args.max_length, shuffle=False, seed=args.seed)
    total_steps = args.epochs * len(train_loader)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup_ratio * total_steps), total_steps)

    out_dir = Path(args.output_dir) if args.output_dir else model_dir / "sst2_finetune"
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / "train_log.jsonl"
    start = time.perf_counter()
    step = 0
    model.train()
    with open(log_path, "w") as log, tqdm(total=total_steps, desc=f"fine-tune {label}") as progress:
        for epoch in range(args.epochs):
            for batch in train_loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}")
                if step % args.log_every == 0 or step == total_steps:
                    log.write(
                        json.dumps(
                            {"step": step, "epoch": epoch, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}
                        )
                        + "\n"
                    )
                    log.flush()
            eval_acc = accuracy(model, eval_loader, device, autocast_dtype)
            log.write(json.dumps({"step": step, "epoch": epoch, "eval_accuracy": eval_acc}) + "\n")
            log.flush()
            print(f"epoch {epoch}: {label} accuracy {eval_acc:.4f}")

    result = {
        "model": model_dir.resolve().name,
        "model_dir": str(model_dir.resolve()),
        "task": "sst2",
        "label": label,
        "data_source": source,
        "offline_heldout": label != LABEL_HUB,
        "eval_split": eval_split,
        "finetune_examples": len(train_set),
        "eval_examples": len(eval_set),
        "accuracy": eval_acc,
        "train_accuracy": accuracy(
            model,
            make_loader(train_set, tokenizer, args.eval_batch_size, args.max_length, False, args.seed),
            device,
            autocast_dtype,
        )
        if args.report_train_accuracy
        else None,
        "hyperparameters": {
            k: getattr(args, k)
            for k in (
                "epochs",
                "lr",
                "batch_size",
                "max_length",
                "weight_decay",
                "warmup_ratio",
                "max_grad_norm",
                "seed",
                "heldout_fraction",
            )
        },
        "steps": step,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    plot_training(log_path, out_dir / "training.png")
    text = json.dumps(result, indent=2)
    (out_dir / "sst2_results.json").write_text(text)
    (model_dir / "sst2_results.json").write_text(text)
    if args.save_model:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    print(f"{label}: accuracy {eval_acc:.4f} on {len(eval_set)} sentences; wrote {out_dir / 'sst2_results.json'}")
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="pretrained PNet-LLaMA / LLaMA folder (config.json, weights, tokenizer)")
    parser.add_argument("--dataset", default="nyu-mll/glue", help="Hub dataset (default: %(default)s)")
    parser.add_argument("--dataset-config", default="sst2")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with sst2/{train,validation}.jsonl[.gz], or 'bundled' for eval/data "
        "(default: the Hub, or 'bundled' when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)",
    )
    parser.add_argument(
        "--heldout-fraction", type=float, default=0.5, help="offline only: share of validation held out"
    )
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup-ratio", type=float, default=0.06)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-samples", type=int, default=None)
    parser.add_argument("--max-eval-samples", type=int, default=None)
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 on GPU instead of bf16 autocast")
    parser.add_argument(
        "--report-train-accuracy", action="store_true", help="also measure accuracy on the fine-tuning set"
    )
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--save-model", action="store_true", help="save the fine-tuned classifier to --output-dir")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    return finetune(parse_args(argv))


if __name__ == "__main__":
    main()
