"""Train a GhostNet / ParameterNet image classifier with the paper's recipe (Table 1), one config, one loop.

    accelerate launch scripts/train_vision.py --config configs/vision/train-imagenet-paper.yaml
    python scripts/train_vision.py --config configs/vision/train-fmnist-cpu.yaml \
        --set model_config=configs/vision/fmnist-parameternet.json output_dir=runs/fmnist-parameternet
    python scripts/train_vision.py --config ... --resume          # continue from the last checkpoint

Data: `data.path` is a Hub id (e.g. ILSVRC/imagenet-1k), an `imagefolder` directory or a folder of IDX files
(Fashion-MNIST); all go through `pnet.vision_data.load_image_dataset` and the same loop. AdamW (no decay on norms and
biases), linear warmup + cosine, label smoothing, EMA of the weights (decay warmed up as min(decay, (1+t)/(10+t))),
RandAugment and random erasing. Checkpoints (`accelerator.save_state`, `<output_dir>/checkpoint-N`) are written to
`checkpoint-N.tmp` and renamed,
so a killed run resumes from its last complete checkpoint. Logs: `log.jsonl` (one JSON object per log/eval step),
`training.png`, `results.json`; the final model (EMA weights when `ema_decay` > 0) and its image processor are saved
with `save_pretrained` to `<output_dir>/final`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import time

import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from modeling_pnet_llama import ParameterNetConfig, ParameterNetForImageClassification, ParameterNetImageProcessor
from pnet.train_utils import (
    JsonlLog,
    checkpoint_tmp_dir,
    finish_checkpoint,
    list_checkpoints,
    publish_dir,
    read_jsonl,
    set_dotted,
)
from pnet.vision_counting import count_parameternet
from pnet.vision_data import (
    AugmentConfig,
    AugmentedDataset,
    EvalTransform,
    TrainTransform,
    collate,
    load_image_dataset,
)

class ModelEMA:
    """Exponential moving average of a model's parameters and buffers (evaluated and exported instead of the raw model)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.num_updates = 0
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        # Warm-up: early in training the average would be dominated by the random initialisation.
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        ema_state = self.module.state_dict()
        for name, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                ema_state[name].lerp_(value.detach(), 1.0 - decay)
            else:
                ema_state[name].copy_(value)

    def state_dict(self) -> dict:
        return {"num_updates": self.num_updates, "module": self.module.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.num_updates = state["num_updates"]
        self.module.load_state_dict(state["module"])


def parse_args(argv: list[str] | None = None) -> tuple[dict, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="training recipe YAML (configs/vision/train-*.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="override recipe keys (dotted for nested, value parsed as YAML), e.g. max_steps=10 data.limit=256")
    parser.add_argument("--resume", nargs="?", const="latest", default=None,
                        help="resume from the latest checkpoint in output_dir, or from the given checkpoint folder")
    args = parser.parse_args(argv)
    with open(args.config) as f:
        recipe = yaml.safe_load(f)
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        set_dotted(recipe, key, yaml.safe_load(value))
    return recipe, args


def build_model(recipe: dict, label_names: list[str]) -> ParameterNetForImageClassification:
    with open(recipe["model_config"]) as f:
        config_dict = json.load(f)
    config_dict.pop("model_type", None)
    config_dict["id2label"] = {i: name for i, name in enumerate(label_names)}
    config_dict["label2id"] = {name: i for i, name in enumerate(label_names)}
    config_dict.pop("num_labels", None)
    return ParameterNetForImageClassification(ParameterNetConfig(**config_dict))


def parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on conv / linear weights only (not on norms, biases or other 1-D parameters)."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataloader: DataLoader, accelerator: Accelerator, max_batches: int | None = None) -> dict:
    """Mean cross-entropy and top-1 accuracy over the dataloader (gathered across processes)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for i, batch in enumerate(dataloader):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(pixel_values=batch["pixel_values"]).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        total_loss += accelerator.reduce(loss, reduction="sum").item()
        correct += (predictions == labels).sum().item()
        count += labels.numel()
    return {"loss": total_loss / max(count, 1), "accuracy": correct / max(count, 1), "samples": count}


def save_checkpoint(accelerator: Accelerator, output_dir: str, step: int, keep: int) -> None:
    """save_state into `checkpoint-N.tmp`, then one rename: a killed run never leaves a half-written checkpoint."""
    tmp = checkpoint_tmp_dir(output_dir, step)
    if accelerator.is_main_process and tmp.is_dir():
        shutil.rmtree(tmp)  # left by a run killed while saving
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        finish_checkpoint(output_dir, step, keep)
    accelerator.wait_for_everyone()


def plot_log(log_path: str, png_path: str) -> None:
    """Training loss and evaluation accuracy against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(log_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_accuracy" in r]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (label-smoothed)")
    ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    ax_loss.set_xlabel("step"), ax_loss.set_ylabel("cross-entropy"), ax_loss.legend()
    ax_acc.plot([r["step"] for r in evals], [r["eval_accuracy"] for r in evals], "o-", label="eval accuracy")
    if any("eval_accuracy_ema" in r for r in evals):
        ax_acc.plot([r["step"] for r in evals], [r.get("eval_accuracy_ema") for r in evals], "s--", label="eval accuracy (EMA)")
    ax_acc.set_xlabel("step"), ax_acc.set_ylabel("top-1 accuracy"), ax_acc.legend()
    fig.suptitle(os.path.basename(os.path.dirname(os.path.abspath(log_path))))
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    recipe, args = parse_args(argv)
    if recipe.get("cpu_threads"):
        torch.set_num_threads(recipe["cpu_threads"])  # a shared CPU is faster with fewer, uncontended threads
    accelerator = Accelerator(mixed_precision=recipe.get("mixed_precision", "no"))
    set_seed(recipe["seed"])
    output_dir = recipe["output_dir"]
    os.makedirs(output_dir, exist_ok=True)

    # --- data -------------------------------------------------------------------------------------------------------
    data_cfg = recipe["data"]
    with accelerator.main_process_first():
        data = load_image_dataset(data_cfg["path"], data_cfg.get("name"), limit=data_cfg.get("limit"))
    train_data, eval_data = data[data_cfg["train_split"]], data[data_cfg["eval_split"]]
    if data_cfg.get("image_column", "image") != "image":
        train_data = train_data.rename_column(data_cfg["image_column"], "image")
        eval_data = eval_data.rename_column(data_cfg["image_column"], "image")
    if data_cfg.get("label_column", "label") != "label":
        train_data = train_data.rename_column(data_cfg["label_column"], "label")
        eval_data = eval_data.rename_column(data_cfg["label_column"], "label")
    label_names = train_data.features["label"].names

    model = build_model(recipe, label_names)
    image_processor = ParameterNetImageProcessor(**recipe["image_processor"])
    augment = AugmentConfig(**recipe.get("augment", {}))
    train_transform = TrainTransform(image_processor, augment, model.config.num_channels)
    eval_transform = EvalTransform(image_processor)
    loader_kwargs = {"collate_fn": collate, "num_workers": recipe.get("num_workers", 0)}
    generator = torch.Generator().manual_seed(recipe["seed"])
    train_set = AugmentedDataset(train_data, train_transform, seed=recipe["seed"])
    train_loader = DataLoader(train_set, batch_size=recipe["batch_size"],
                              shuffle=True, drop_last=True, generator=generator, **loader_kwargs)
    eval_loader = DataLoader(eval_data.with_transform(eval_transform), batch_size=recipe["eval_batch_size"], **loader_kwargs)
    # Training-set accuracy is measured on a fixed subset with the evaluation transform (no augmentation).
    train_eval_size = min(recipe.get("train_eval_samples", 10000), len(train_data))
    train_eval_loader = DataLoader(train_data.select(range(train_eval_size)).with_transform(eval_transform),
                                   batch_size=recipe["eval_batch_size"], **loader_kwargs)

    # --- optimisation -----------------------------------------------------------------------------------------------
    steps_per_epoch = len(train_loader) // accelerator.num_processes
    max_steps = recipe.get("max_steps") or recipe["epochs"] * steps_per_epoch
    warmup_steps = recipe.get("warmup_steps") or int(recipe.get("warmup_epochs", 0) * steps_per_epoch)
    optimizer = torch.optim.AdamW(parameter_groups(model, recipe["weight_decay"]), lr=recipe["learning_rate"],
                                  betas=tuple(recipe.get("adam_betas", (0.9, 0.999))), eps=recipe.get("adam_eps", 1e-8))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, warmup_steps, max_steps, min_lr_rate=recipe.get("min_lr_ratio", 0.0)
    )
    model, optimizer, train_loader, eval_loader, train_eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, train_eval_loader, scheduler
    )
    ema = ModelEMA(accelerator.unwrap_model(model), recipe["ema_decay"]) if recipe.get("ema_decay", 0) > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    # --- resume -----------------------------------------------------------------------------------------------------
    step = 0
    resumed = False
    if args.resume:
        found = list_checkpoints(output_dir)
        if args.resume != "latest":
            path = args.resume.rstrip("/")
            step = int(os.path.basename(path).removeprefix("checkpoint-"))
        elif found:
            step, path = found[-1]
        else:
            path = None
            accelerator.print(f"--resume: no checkpoint in {output_dir}, starting from step 0")
        if path is not None:
            accelerator.load_state(str(path))
            resumed = True
            accelerator.print(f"resumed from {path} at step {step}")

    counts = count_parameternet(accelerator.unwrap_model(model).config.to_dict(), name=os.path.basename(recipe["model_config"]))
    accelerator.print(f"{counts.name}: {counts.total_params:,} params, {counts.flops:,} FLOPs at "
                      f"{model.config.image_size}x{model.config.image_size}; {max_steps} steps, {steps_per_epoch} steps/epoch")
    log_path = os.path.join(output_dir, "log.jsonl")
    # A fresh run starts a new log; a resumed one drops the records written after its checkpoint.
    log_file = JsonlLog(log_path, resume_step=step if resumed else None) if accelerator.is_main_process else None

    def log(record: dict) -> None:
        if log_file is not None:
            log_file.write(record)

    def run_eval() -> dict:
        metrics = {f"eval_{k}": v for k, v in evaluate(model, eval_loader, accelerator).items()}
        if ema is not None:
            ema_metrics = evaluate(ema.module, eval_loader, accelerator)
            metrics.update({"eval_loss_ema": ema_metrics["loss"], "eval_accuracy_ema": ema_metrics["accuracy"]})
        model.train()
        return metrics

    # --- loop -------------------------------------------------------------------------------------------------------
    model.train()
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    running_loss, running_count, start = 0.0, 0, time.time()
    while step < max_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        generator.manual_seed(recipe["seed"] + epoch)  # the epoch's shuffle order, reproducible on resume
        train_set.epoch = epoch  # the epoch's augmentation seeds
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).logits
            loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=recipe["label_smoothing"])
            accelerator.backward(loss)
            if recipe.get("max_grad_norm"):
                accelerator.clip_grad_norm_(model.parameters(), recipe["max_grad_norm"])
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))
            step += 1
            running_loss += loss.item()
            running_count += 1
            progress.update(1)
            if step % recipe["log_every"] == 0 or step == max_steps:
                record = {"step": step, "epoch": step / steps_per_epoch, "loss": running_loss / running_count,
                          "lr": scheduler.get_last_lr()[0], "elapsed_s": round(time.time() - start, 2)}
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                log(record)
                running_loss, running_count = 0.0, 0
            if step % recipe["eval_every"] == 0 and step < max_steps:
                metrics = run_eval()
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "eval_samples"))
                log({"step": step, **metrics})
            if step % recipe["checkpoint_every"] == 0 or step == max_steps:
                save_checkpoint(accelerator, output_dir, step, recipe.get("keep_checkpoints", 2))
            if step >= max_steps:
                break
    progress.close()

    # --- final evaluation and export --------------------------------------------------------------------------------
    final_model = ema.module if ema is not None else accelerator.unwrap_model(model)
    metrics = run_eval()
    train_metrics = evaluate(final_model, train_eval_loader, accelerator)
    final_test = metrics["eval_accuracy_ema"] if ema is not None else metrics["eval_accuracy"]
    results = {
        "model_config": recipe["model_config"], "steps": step, "total_params": counts.total_params,
        "flops": counts.flops, "image_size": model.config.image_size, "num_experts": model.config.num_experts,
        **metrics, "test_accuracy": final_test, "train_accuracy": train_metrics["accuracy"],
        "train_accuracy_samples": train_metrics["samples"], "exported_weights": "ema" if ema is not None else "raw",
        "train_time_s": round(time.time() - start, 1),
    }
    log({"step": step, **metrics, "train_accuracy": train_metrics["accuracy"]})
    if accelerator.is_main_process:
        # Written beside, then renamed: a kill during the export never leaves a half-written `final/`.
        final_tmp = os.path.join(output_dir, "final.tmp")
        if os.path.isdir(final_tmp):
            shutil.rmtree(final_tmp)
        final_model.save_pretrained(final_tmp, safe_serialization=True)
        image_processor.save_pretrained(final_tmp)
        publish_dir(final_tmp, os.path.join(output_dir, "final"))
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        plot_log(log_path, os.path.join(output_dir, "training.png"))
        print(json.dumps(results, indent=2))
    accelerator.end_training()
    return results


if __name__ == "__main__":
    main()
