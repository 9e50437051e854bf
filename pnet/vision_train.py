"""Train a GhostNet / ParameterNet (or other Auto-registered) image classifier with the paper's recipe (Table 1).

    accelerate launch scripts/train_vision.py --config configs/vision/train-imagenet-paper.yaml
    python scripts/train_vision.py --config configs/vision/train-fmnist-cpu.yaml \\
        model=configs/vision/fmnist-parameternet.json output_dir=runs/fmnist-parameternet
    python scripts/train_vision.py --config ... --resume [--allow-change KEY ...]

The config is `pnet.config.VisionTrainConfig` (``--help`` lists its keys); the keys it shares with pretraining
(``lr``, ``warmup_steps``, ``micro_batch_size``, ``save_every``, ``keep_last``, ``precision``, ...) mean the same.
Data: ``data.path`` is a Hub id (e.g. ILSVRC/imagenet-1k), an ``imagefolder`` directory or a folder of IDX files
(Fashion-MNIST); all go through `pnet.vision_data.load_image_dataset` and the same loop. AdamW (no decay on norms and
biases), linear warmup + cosine, label smoothing, EMA of the weights (decay warmed up as min(decay, (1+t)/(10+t))),
RandAugment and random erasing. Checkpoints and resume are `pnet.checkpoint`'s (bit-exact, published only from
finite weights, changed settings refused unless allowed). Logs: ``log.jsonl`` (`pnet.run_log` fields),
``training.png``, ``results.json``; the final model (EMA weights when ``ema_decay`` > 0) and its image processor are
saved with ``save_pretrained`` to ``<output_dir>/final``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoModelForImageClassification

from modeling_parameternet import ParameterNetImageProcessor
from pnet import run_log as L
from pnet.checkpoint import (
    CheckpointSaver,
    ResumeError,
    change_history_header,
    find_resume_point,
    publish_dir,
    run_settings,
    write_yaml_atomic,
)
from pnet.config import ConfigError, VisionTrainConfig, config_argument_parser, load_config
from pnet.plots import plot_training
from pnet.pretrain import apply_optimizer_settings, build_optimizer, make_accelerator
from pnet.vision_counting import count_vision
from pnet.vision_data import (
    AugmentedDataset,
    EvalTransform,
    TrainTransform,
    collate,
    load_image_dataset,
    stratified_subset,
)

CONFIG_FILE = "train_config.yaml"
RESULTS_FILE = "results.json"


class ModelEMA:
    """Exponential moving average of a model's parameters and buffers (evaluated and exported instead of the raw
    model)."""

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


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataloader: DataLoader, accelerator: Accelerator) -> dict:
    """Mean cross-entropy and top-1 accuracy over the dataloader (gathered across processes)."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in dataloader:
        logits = model(pixel_values=batch["pixel_values"]).logits
        loss = F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), batch["labels"]))
        total_loss += accelerator.reduce(loss, reduction="sum").item()
        correct += (predictions == labels).sum().item()
        count += labels.numel()
    return {"loss": total_loss / max(count, 1), "accuracy": correct / max(count, 1), "samples": count}


def train(config: VisionTrainConfig, resume: bool = False, allow_changes: Sequence[str] = ()) -> dict:
    """Train (or resume) the classifier described by ``config``; returns the results written to results.json."""
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)  # a shared CPU is faster with fewer, uncontended threads
    accelerator = make_accelerator(config.precision)
    set_seed(config.seed)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)

    # --- data -------------------------------------------------------------------------------------------------------
    data_cfg = config.data
    with accelerator.main_process_first():
        data = load_image_dataset(data_cfg.path, data_cfg.name, limit=data_cfg.limit)
    for split in (data_cfg.train_split, data_cfg.eval_split):
        if split not in data:
            raise ConfigError(f"data.train_split / data.eval_split {split!r} is not a split of {data_cfg.path!r}; "
                              f"allowed: {sorted(data)}")
    train_data, eval_data = data[data_cfg.train_split], data[data_cfg.eval_split]
    for column, standard in ((data_cfg.image_column, "image"), (data_cfg.label_column, "label")):
        if column not in train_data.column_names:
            raise ConfigError(f"data column {column!r} not in {data_cfg.path!r}; allowed: {train_data.column_names}")
        if column != standard:
            train_data, eval_data = (d.rename_column(column, standard) for d in (train_data, eval_data))
    label_names = train_data.features["label"].names
    if data_cfg.train_subset is not None:
        train_data = stratified_subset(train_data, data_cfg.train_subset.fraction, data_cfg.train_subset.seed)

    # --- run length and resume (all checks before the model is built) -----------------------------------------------
    steps_per_epoch = len(train_data) // config.micro_batch_size // accelerator.num_processes
    if steps_per_epoch == 0:
        raise ConfigError(f"micro_batch_size={config.micro_batch_size} x {accelerator.num_processes} process(es) "
                          f"exceeds the {len(train_data)} training images")
    max_steps = config.max_steps or config.epochs * steps_per_epoch
    warmup_steps = config.warmup_steps or int((config.warmup_epochs or 0) * steps_per_epoch)
    model_config = config.build_model_config(label_names)
    settings = run_settings(config.to_dict(), config.free_on_resume, model_config.to_dict(), accelerator.num_processes)
    start = find_resume_point(output_dir, resume, settings, allow_changes, max_steps)

    image_processor = ParameterNetImageProcessor(**config.image_processor)
    model = AutoModelForImageClassification.from_config(model_config)
    train_transform = TrainTransform(image_processor, config.augment, model.config.num_channels)
    eval_transform = EvalTransform(image_processor)
    loader_kwargs = {"collate_fn": collate, "num_workers": config.num_workers}
    generator = torch.Generator().manual_seed(config.seed)
    train_set = AugmentedDataset(train_data, train_transform, seed=config.seed)
    train_loader = DataLoader(train_set, batch_size=config.micro_batch_size, shuffle=True, drop_last=True,
                              generator=generator, **loader_kwargs)
    eval_loader = DataLoader(eval_data.with_transform(eval_transform), batch_size=config.eval_batch_size,
                             **loader_kwargs)
    # Training-set accuracy is measured on a fixed subset with the evaluation transform (no augmentation).
    train_eval_size = min(config.train_eval_samples, len(train_data))
    train_eval_loader = DataLoader(train_data.select(range(train_eval_size)).with_transform(eval_transform),
                                   batch_size=config.eval_batch_size, **loader_kwargs)

    # --- optimisation -----------------------------------------------------------------------------------------------
    optimizer, scheduler = build_optimizer(model, config, max_steps, warmup_steps)
    model, optimizer, train_loader, eval_loader, train_eval_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, eval_loader, train_eval_loader, scheduler
    )
    ema = ModelEMA(accelerator.unwrap_model(model), config.ema_decay) if config.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    step = start.step
    if start.checkpoint is not None:
        accelerator.load_state(str(start.checkpoint))
        apply_optimizer_settings(optimizer, scheduler, config)
        accelerator.print(f"resumed from {start.checkpoint} at step {step}"
                          + (f" with changed settings {start.changes}" if start.changes else ""))

    counts = count_vision(accelerator.unwrap_model(model).config.to_dict(), name=os.path.basename(config.model))
    accelerator.print(f"{counts.name}: {counts.total_params:,} params, {counts.flops:,} FLOPs at "
                      f"{model.config.image_size}x{model.config.image_size}; {max_steps} steps, {steps_per_epoch} "
                      f"steps/epoch; world size {accelerator.num_processes}")
    log_file = None
    if accelerator.is_main_process:
        # A fresh run starts a new log; a resumed one drops the records written after its checkpoint.
        log_file = L.JsonlLog(output_dir / L.LOG_FILE, resume_step=step if resume else None)
        if start.checkpoint is not None:
            log_file.write({L.STEP: step, L.EVENT: L.EVENT_RESUME, L.CHECKPOINT: start.checkpoint.name,
                            L.CHANGES: start.changes})
        write_yaml_atomic(output_dir / CONFIG_FILE, config.to_dict(), header=change_history_header(start.history))

    def log(record: dict) -> None:
        if log_file is not None:
            log_file.write(record)

    def run_eval() -> dict:
        metrics = evaluate(model, eval_loader, accelerator)
        result = {L.EVAL_LOSS: metrics["loss"], L.EVAL_ACCURACY: metrics["accuracy"],
                  L.EVAL_SAMPLES: metrics["samples"]}
        if ema is not None:
            ema_metrics = evaluate(ema.module, eval_loader, accelerator)
            result.update({L.EVAL_LOSS_EMA: ema_metrics["loss"], L.EVAL_ACCURACY_EMA: ema_metrics["accuracy"]})
        model.train()
        return result

    # --- loop -------------------------------------------------------------------------------------------------------
    saver = CheckpointSaver(accelerator, output_dir, config.keep_last)
    model.train()
    progress = tqdm(total=max_steps, initial=step, disable=not accelerator.is_local_main_process, desc="train")
    running_loss, running_count, start_time = 0.0, 0, time.time()
    while step < max_steps:
        epoch, skip = divmod(step, steps_per_epoch)
        generator.manual_seed(config.seed + epoch)  # the epoch's shuffle order, reproducible on resume
        train_set.epoch = epoch  # the epoch's augmentation seeds
        loader = accelerator.skip_first_batches(train_loader, skip) if skip else train_loader
        for batch in loader:
            logits = model(pixel_values=batch["pixel_values"]).logits
            loss = F.cross_entropy(logits.float(), batch["labels"], label_smoothing=config.label_smoothing)
            loss_value = accelerator.reduce(loss.detach(), reduction="mean").item()
            accelerator.backward(loss)
            # The norm is computed even without clipping: max_norm inf scales the gradients by exactly 1.
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
            if not (torch.isfinite(torch.tensor(loss_value)) and (
                    grad_norm is None or torch.isfinite(torch.as_tensor(grad_norm)))):
                saver.discard()
                raise FloatingPointError(f"non-finite loss {loss_value} or gradient norm at step {step + 1}; stopped "
                                         f"before the update. Last good checkpoint: {saver.last_published() or 'none'}")
            saver.publish()  # the pending checkpoint's weights gave this finite step
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(accelerator.unwrap_model(model))
            step += 1
            running_loss += loss_value
            running_count += 1
            progress.update(1)
            if step % config.log_every == 0 or step == max_steps:
                record = {L.STEP: step, L.EPOCH: step / steps_per_epoch, L.LOSS: running_loss / running_count,
                          L.LR: scheduler.get_last_lr()[0],
                          L.GRAD_NORM: float(grad_norm) if grad_norm is not None else None,
                          L.ELAPSED_S: round(time.time() - start_time, 2)}
                progress.set_postfix(loss=f"{record[L.LOSS]:.4f}", lr=f"{record[L.LR]:.2e}")
                log(record)
                running_loss, running_count = 0.0, 0
            if step % config.eval_every == 0 and step < max_steps:
                metrics = run_eval()
                progress.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()
                                                             if k != L.EVAL_SAMPLES))
                log({L.STEP: step, **metrics})
            if (config.save_every and step % config.save_every == 0) or step == max_steps:
                saver.save(step, trainer_state={"step": step, "config_changes": start.history},
                           run_settings=settings, rank_files={})
            if step >= max_steps:
                break
    progress.close()

    # --- final evaluation and export --------------------------------------------------------------------------------
    final_model = ema.module if ema is not None else accelerator.unwrap_model(model)
    metrics = run_eval()
    final_accuracy = metrics.get(L.EVAL_ACCURACY_EMA, metrics[L.EVAL_ACCURACY])
    if not torch.isfinite(torch.tensor(metrics[L.EVAL_LOSS])):
        raise FloatingPointError(f"non-finite evaluation loss after step {step}; last good checkpoint: "
                                 f"{saver.last_published() or 'none'}")
    saver.publish()  # the last step's weights: their evaluation loss is finite
    train_metrics = evaluate(final_model, train_eval_loader, accelerator)
    results = {
        "model_config": config.model, "steps": step, "train_samples": len(train_data),
        "total_params": counts.total_params,
        "flops": counts.flops, "image_size": model.config.image_size,
        "num_experts": getattr(model.config, "num_experts", None),
        **metrics, "test_accuracy": final_accuracy, L.TRAIN_ACCURACY: train_metrics["accuracy"],
        "train_accuracy_samples": train_metrics["samples"], "exported_weights": "ema" if ema is not None else "raw",
        "train_time_s": round(time.time() - start_time, 1),
    }
    log({L.STEP: step, **metrics, L.TRAIN_ACCURACY: train_metrics["accuracy"]})
    if accelerator.is_main_process:
        # Written beside, then renamed: a kill during the export never leaves a half-written `final/`.
        final_tmp = output_dir / "final.tmp"
        if final_tmp.is_dir():
            shutil.rmtree(final_tmp)
        final_model.save_pretrained(final_tmp, safe_serialization=True)
        image_processor.save_pretrained(final_tmp)
        publish_dir(final_tmp, output_dir / "final")
        (output_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2))
        plot_training(output_dir / L.LOG_FILE, output_dir / "training.png", title=output_dir.name)
        print(json.dumps(results, indent=2))
    accelerator.end_training()
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = config_argument_parser("train_vision.py", __doc__.splitlines()[0], VisionTrainConfig)
    parser.add_argument("--config", required=True, help="training recipe YAML (configs/vision/train-*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="with --resume: accept a changed setting (dotted key or section); repeat for several")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_intermixed_args(argv)
    if args.allow_change and not args.resume:
        raise ConfigError("--allow-change only applies with --resume")
    config = load_config(VisionTrainConfig, args.config, args.overrides)
    return train(config, resume=args.resume, allow_changes=args.allow_change)


def cli(argv: list[str] | None = None) -> None:
    try:
        main(argv)
    except (ConfigError, ResumeError, FileExistsError, FileNotFoundError) as error:
        sys.exit(f"train_vision: error: {error}")


if __name__ == "__main__":
    cli()
