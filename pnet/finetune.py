"""Fine-tune a pretrained PNet-LLaMA (or LLaMA) folder as an SST-2 sentiment classifier (the paper's Table 7).

    python scripts/finetune_sst2.py MODEL_DIR [--config FILE.yaml] [key=value ...] [--trust-remote-code]
    python scripts/finetune_sst2.py MODEL_DIR data.data_dir=bundled epochs=3 lr=5e-4    # offline: eval/data/sst2

The settings are `pnet.config.FinetuneSst2Config` (``--help`` lists them; the keys shared with pretraining mean the
same: ``lr``, ``micro_batch_size``, ``warmup_steps``, ``max_grad_norm``, ``precision``, ...). The model folder is
loaded with the installed pnet classes, without running the folder's own code, unless ``--trust-remote-code``.

The data is read with `datasets.load_dataset` either way: the Hub dataset, or JSON Lines with GLUE's columns
(`sentence`, `label`, `idx`) in `DATA_DIR/sst2/{train,validation}.jsonl[.gz]`. When there is no train split
(the offline copy has only the 872 validation sentences) the validation sentences are split with a fixed seed
into a fine-tuning part and a held-out part, accuracy is measured on the held-out part only, and every output
labels the number "SST-2 (held-out half of validation, offline)".

Outputs (in ``output_dir``, default MODEL_DIR/sst2_finetune): ``log.jsonl`` (`pnet.run_log` fields),
``training.png``, ``sst2_results.json``, and the classifier with its tokenizer (``save_model=true``). The result JSON
is also copied to MODEL_DIR/sst2_results.json, where `pnet-report` and `pnet-card` look for it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import datasets
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from pnet import run_log as L
from pnet.config import ConfigError, FinetuneSst2Config, config_argument_parser, load_config
from pnet.model_loading import prepare_tokenizer_for_model, read_config_dict, trust_remote_code_for
from pnet.plots import plot_training
from pnet.pretrain import build_optimizer

LABEL_HUB = "SST-2 (validation)"
LABEL_OFFLINE_HELDOUT = "SST-2 (held-out half of validation, offline)"
RESULTS_FILE = "sst2_results.json"


def load_sst2(dataset: str, dataset_config: str, data_dir: str | None) -> tuple[datasets.DatasetDict, str]:
    """SST-2 splits from the Hub or from local JSON Lines; returns (splits, where they came from)."""
    from pnet_eval.zero_shot import BUNDLED_DATA_DIR, hub_is_offline

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
            f"data.data_dir: no sst2/validation.jsonl[.gz] under {str(root)!r} (train is optional); it holds: "
            f"{present or 'nothing'}")
    return datasets.load_dataset("json", data_files=files), f"local:{root / 'sst2'}"


def split_for_finetuning(
    splits: datasets.DatasetDict, heldout_fraction: float, seed: int
) -> tuple[datasets.Dataset, datasets.Dataset, str, str]:
    """(fine-tuning set, evaluation set, evaluation split name, label for every report)."""
    if "train" in splits:
        return splits["train"], splits["validation"], "validation", LABEL_HUB
    parts = splits["validation"].train_test_split(test_size=heldout_fraction, seed=seed)
    label = (
        LABEL_OFFLINE_HELDOUT
        if heldout_fraction == 0.5
        else LABEL_OFFLINE_HELDOUT.replace("half", f"{heldout_fraction:g}")
    )
    return parts["train"], parts["test"], f"validation (held-out {heldout_fraction:g}, seed {seed})", label


def make_loader(ds: datasets.Dataset, tokenizer, batch_size: int, max_length: int, shuffle: bool,
                seed: int) -> DataLoader:
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


def finetune(config: FinetuneSst2Config) -> dict:
    """Fine-tune and evaluate; returns (and writes) the result dict."""
    model_ref = config.model
    model_dir = Path(model_ref).expanduser()
    if model_dir.is_dir() and not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} has no config.json")
    if not model_dir.is_dir() and "/" not in model_ref:
        raise FileNotFoundError(f"model folder {model_ref!r} does not exist")
    positions = read_config_dict(model_ref).get("max_position_embeddings")
    if positions is not None and config.data.seq_len > positions:
        raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds the model's max_position_embeddings="
                          f"{positions}; allowed: <= {positions}")
    trust = trust_remote_code_for(model_ref, config.trust_remote_code)  # decides before anything is loaded
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    torch.manual_seed(config.seed)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # bf16 autocast on GPUs by default; fp32 on CPU, where bf16 matmuls are far slower.
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    autocast_dtype = torch.bfloat16 if bf16 else None

    splits, source = load_sst2(config.data.dataset, config.data.dataset_config, config.data.data_dir)
    train_set, eval_set, eval_split, label = split_for_finetuning(splits, config.data.heldout_fraction, config.seed)
    if config.data.max_train_samples:
        train_set = train_set.select(range(min(config.data.max_train_samples, len(train_set))))
    if config.data.max_eval_samples:
        eval_set = eval_set.select(range(min(config.data.max_eval_samples, len(eval_set))))

    model_config = AutoConfig.from_pretrained(model_ref, trust_remote_code=trust)
    model_config.num_labels = 2
    model_config.id2label, model_config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    tokenizer = AutoTokenizer.from_pretrained(model_ref, trust_remote_code=trust)
    model_config.pad_token_id = None  # the classifier reads the last non-pad token: the tokenizer's pad decides
    prepare_tokenizer_for_model(tokenizer, model_config)
    tokenizer.padding_side = "right"
    model = AutoModelForSequenceClassification.from_pretrained(model_ref, config=model_config,
                                                               trust_remote_code=trust).to(device)

    train_loader = make_loader(train_set, tokenizer, config.micro_batch_size, config.data.seq_len, shuffle=True,
                               seed=config.seed)
    eval_loader = make_loader(eval_set, tokenizer, config.eval_batch_size, config.data.seq_len, shuffle=False,
                              seed=config.seed)
    total_steps = config.epochs * len(train_loader)
    warmup_steps = config.warmup_steps or math.ceil(config.warmup_ratio * total_steps)
    optimizer, scheduler = build_optimizer(model, config, total_steps, warmup_steps)

    out_dir = Path(config.output_dir) if config.output_dir else model_dir / "sst2_finetune"
    out_dir.mkdir(parents=True, exist_ok=True)
    log = L.JsonlLog(out_dir / L.LOG_FILE)
    start = time.perf_counter()
    step = 0
    model.train()
    with tqdm(total=total_steps, desc=f"fine-tune {label}") as progress:
        for epoch in range(config.epochs):
            for batch in train_loader:
                batch = {k: v.to(device) for k, v in batch.items()}
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = model(**batch).loss
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite loss {loss.item()} at step {step + 1}; lower lr")
                loss.backward()
                if config.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}")
                if step % config.log_every == 0 or step == total_steps:
                    log.write({L.STEP: step, L.EPOCH: epoch, L.LOSS: loss.item(), L.LR: lr})
            eval_acc = accuracy(model, eval_loader, device, autocast_dtype)
            log.write({L.STEP: step, L.EPOCH: epoch, L.EVAL_ACCURACY: eval_acc})
            print(f"epoch {epoch}: {label} accuracy {eval_acc:.4f}")

    result = {
        "model": model_dir.resolve().name if model_dir.is_dir() else model_ref,
        "model_dir": str(model_dir.resolve()) if model_dir.is_dir() else model_ref,
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
            make_loader(train_set, tokenizer, config.eval_batch_size, config.data.seq_len, False, config.seed),
            device,
            autocast_dtype,
        )
        if config.report_train_accuracy
        else None,
        "config": config.to_dict(),
        "steps": step,
        "wall_time_s": round(time.perf_counter() - start, 2),
    }
    plot_training(out_dir / L.LOG_FILE, out_dir / "training.png", title=f"SST-2 fine-tuning: {result['model']}")
    text = json.dumps(result, indent=2)
    (out_dir / RESULTS_FILE).write_text(text)
    if model_dir.is_dir():
        (model_dir / RESULTS_FILE).write_text(text)
    if config.save_model:
        model.save_pretrained(out_dir)
        tokenizer.save_pretrained(out_dir)
    print(f"{label}: accuracy {eval_acc:.4f} on {len(eval_set)} sentences; wrote {out_dir / RESULTS_FILE}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = config_argument_parser("finetune_sst2.py", __doc__.splitlines()[0], FinetuneSst2Config)
    parser.add_argument("model", help="pretrained PNet-LLaMA / LLaMA folder (config.json, weights, tokenizer) or "
                                      "Hub id")
    parser.add_argument("--config", default=None, help="YAML file with settings (optional; key=value overrides win)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model folder's own code (auto_map); llama / pnet_llama folders do not need it")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_intermixed_args(argv)
    values = {"model": args.model}
    if args.trust_remote_code:
        values["trust_remote_code"] = True
    return finetune(load_config(FinetuneSst2Config, args.config, args.overrides, values=values))


def cli(argv: list[str] | None = None) -> None:
    try:
        main(argv)
    except (ConfigError, FileNotFoundError, ValueError) as error:
        sys.exit(f"finetune_sst2: error: {error}")


if __name__ == "__main__":
    cli()
