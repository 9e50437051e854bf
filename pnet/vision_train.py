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
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoModelForImageClassification

from modeling_parameternet import ParameterNetImageProcessor
from pnet import run_log as L
from pnet.checkpoint import ResumeError, write_json_atomic
from pnet.config import (
    ConfigError,
    VisionTrainConfig,
    add_resume_arguments,
    check_resume_arguments,
    config_argument_parser,
    load_config,
)
from pnet.training import Plan, Task, classifier_metrics, run, run_command
from pnet.vision_counting import count_vision
from pnet.vision_data import (
    AugmentedDataset,
    EvalTransform,
    TrainTransform,
    check_images,
    collate,
    is_idx_folder,
    load_image_dataset,
    local_data_files,
    stratified_subset,
)

CONFIG_FILE = "train_config.yaml"
RESULTS_FILE = L.VISION_RESULTS_FILE


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


class ImageClassificationTask(Task):
    """An image classifier trained on a Hub / imagefolder / IDX dataset with the paper's augmentation (Table 1)."""

    name = "train"
    config_file = CONFIG_FILE

    def __init__(self, config: VisionTrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)
        self.ema: ModelEMA | None = None

    def data_files(self) -> list[str]:
        return local_data_files(self.config.data.path)

    def check_resume(self, changes: dict[str, list]) -> None:
        if "ema_decay" in changes and 0 in changes["ema_decay"]:
            old, new = changes["ema_decay"]
            raise ResumeError(f"--allow-change ema_decay: {old!r} in the checkpoint, {new!r} now; a checkpoint with an "
                              "EMA of the weights cannot resume without one, nor one without an EMA with one. Allowed: "
                              "another ema_decay > 0 when the checkpoint has one")

    def plan(self, accelerator: Accelerator) -> Plan:
        """Load the dataset, check its splits and columns, and derive the run length (before the model is built)."""
        config, data_cfg = self.config, self.config.data
        self.accelerator = accelerator
        with accelerator.main_process_first():
            data = load_image_dataset(data_cfg.path, data_cfg.name, limit=data_cfg.limit)
        for split in (data_cfg.train_split, data_cfg.eval_split):
            if split not in data:
                raise ConfigError(f"data.train_split / data.eval_split {split!r} is not a split of {data_cfg.path!r}; "
                                  f"allowed: {sorted(data)}")
        train_data, eval_data = data[data_cfg.train_split], data[data_cfg.eval_split]
        for column, standard in ((data_cfg.image_column, "image"), (data_cfg.label_column, "label")):
            if column not in train_data.column_names:
                raise ConfigError(f"data column {column!r} not in {data_cfg.path!r}; allowed: "
                                  f"{train_data.column_names}")
            if column != standard:
                train_data, eval_data = (d.rename_column(column, standard) for d in (train_data, eval_data))
        self.image_checks = []
        if not is_idx_folder(data_cfg.path):  # IDX images are arrays: nothing to decode
            checked = [check_images(d, data_cfg.path, split, data_cfg.on_bad_record)
                       for d, split in ((train_data, data_cfg.train_split), (eval_data, data_cfg.eval_split))]
            (train_data, train_check), (eval_data, eval_check) = checked
            self.image_checks = [train_check, eval_check]
        if data_cfg.train_subset is not None:
            train_data = stratified_subset(train_data, data_cfg.train_subset.fraction, data_cfg.train_subset.seed)
        self.train_data, self.eval_data = train_data, eval_data
        self.steps_per_epoch = len(train_data) // config.micro_batch_size // accelerator.num_processes
        if self.steps_per_epoch == 0:
            raise ConfigError(f"micro_batch_size={config.micro_batch_size} x {accelerator.num_processes} process(es) "
                              f"exceeds the {len(train_data)} training images")
        return Plan(model_config=config.build_model_config(train_data.features["label"].names),
                    max_steps=config.max_steps or config.epochs * self.steps_per_epoch,
                    warmup_steps=config.warmup_steps or int((config.warmup_epochs or 0) * self.steps_per_epoch),
                    micro_batch_size=config.micro_batch_size)

    def check_data(self) -> list:
        return self.image_checks  # made in `plan`, which needs the checked dataset's size

    def build_model(self, model_config) -> torch.nn.Module:
        self.image_processor = ParameterNetImageProcessor(**self.config.image_processor)
        return AutoModelForImageClassification.from_config(model_config)

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        config = self.config
        unwrapped = accelerator.unwrap_model(model)
        eval_transform = EvalTransform(self.image_processor)
        # Evaluation loaders get generators of their own: an iterator without one draws its base seed from the global
        # RNG, which dropout and augmentation use, so each evaluation would shift the training that follows it (and
        # eval_every, which may change on resume, would change the losses).
        loader_kwargs = {"collate_fn": collate, "num_workers": config.num_workers}
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_set = AugmentedDataset(
            self.train_data, TrainTransform(self.image_processor, config.augment, unwrapped.config.num_channels),
            seed=config.seed)
        train_loader = DataLoader(self.train_set, batch_size=config.micro_batch_size, shuffle=True, drop_last=True,
                                  generator=self.generator, **loader_kwargs)
        eval_loader = DataLoader(self.eval_data.with_transform(eval_transform), batch_size=config.eval_batch_size,
                                 generator=torch.Generator(), **loader_kwargs)
        # Training-set accuracy is measured on a fixed subset with the evaluation transform (no augmentation).
        train_eval_size = min(config.train_eval_samples, len(self.train_data))
        train_eval_loader = DataLoader(self.train_data.select(range(train_eval_size)).with_transform(eval_transform),
                                       batch_size=config.eval_batch_size, generator=torch.Generator(),
                                       **loader_kwargs)
        self.train_loader, self.eval_loader, self.train_eval_loader = accelerator.prepare(
            train_loader, eval_loader, train_eval_loader)
        if config.ema_decay > 0:
            self.ema = ModelEMA(unwrapped, config.ema_decay)
            accelerator.register_for_checkpointing(self.ema)
        self.counts = count_vision(unwrapped.config.to_dict(), name=os.path.basename(config.model))
        accelerator.print(f"{self.counts.name}: {self.counts.total_params:,} params, {self.counts.flops:,} FLOPs at "
                          f"{unwrapped.config.image_size}x{unwrapped.config.image_size}; {self.steps_per_epoch} "
                          "steps/epoch")

    def step_batches(self, start_step: int) -> Iterator[list[dict]]:
        """Epoch by epoch; each epoch's shuffle and augmentation are seeded by (seed, epoch), so a resumed run
        skips to exactly the batch an uninterrupted one would see."""
        step = start_step
        while True:
            epoch, skip = divmod(step, self.steps_per_epoch)
            self.generator.manual_seed(self.config.seed + epoch)  # the epoch's shuffle order
            self.train_set.epoch = epoch  # the epoch's augmentation seeds
            loader = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
            for batch in loader:
                yield [batch]
                step += 1

    def loss(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        logits = model(pixel_values=batch["pixel_values"]).logits
        return {L.LOSS: F.cross_entropy(logits.float(), batch["labels"], label_smoothing=self.config.label_smoothing)}

    def after_update(self, model: torch.nn.Module) -> None:
        if self.ema is not None:
            self.ema.update(model)

    def window_fields(self, step: int, window_start: int) -> dict[str, Any]:
        return {L.EPOCH: step / self.steps_per_epoch}

    def evaluate(self, model: torch.nn.Module, final: bool) -> dict[str, Any]:
        """Evaluation loss and accuracy (and the EMA's); at the end also the training-set accuracy of the exported
        weights."""
        metrics = classifier_metrics(model, self.eval_loader, self.accelerator)
        record = {L.EVAL_LOSS: metrics["loss"], L.EVAL_ACCURACY: metrics["accuracy"],
                  L.EVAL_SAMPLES: metrics["samples"]}
        if self.ema is not None:
            ema_metrics = classifier_metrics(self.ema.module, self.eval_loader, self.accelerator)
            record.update({L.EVAL_LOSS_EMA: ema_metrics["loss"], L.EVAL_ACCURACY_EMA: ema_metrics["accuracy"]})
        if final:
            exported = self.ema.module if self.ema is not None else model
            train_metrics = classifier_metrics(exported, self.train_eval_loader, self.accelerator)
            record.update({L.TRAIN_ACCURACY: train_metrics["accuracy"],
                           L.TRAIN_ACCURACY_SAMPLES: train_metrics["samples"]})
        return record

    def save_final(self, model: torch.nn.Module, state_dict: dict, folder: Path) -> None:
        """The EMA weights when ``ema_decay`` > 0, else the trained ones; with the image processor."""
        if self.ema is not None:
            self.ema.module.save_pretrained(folder, safe_serialization=True)
        else:
            model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        self.image_processor.save_pretrained(folder)


def train(config: VisionTrainConfig, resume: bool = False, allow_changes: Sequence[str] = ()) -> dict:
    """Train (or resume) the classifier described by ``config``; returns the results written to results.json."""
    task = ImageClassificationTask(config)
    outcome = run(task, config, resume=resume, allow_changes=allow_changes)
    metrics = outcome.final_eval
    results = {
        "model_config": config.model, "steps": outcome.steps, "train_samples": len(task.train_data),
        "total_params": task.counts.total_params, "flops": task.counts.flops,
        "image_size": outcome.model.config.image_size,
        "num_experts": getattr(outcome.model.config, "num_experts", None),
        **metrics, "test_accuracy": metrics.get(L.EVAL_ACCURACY_EMA, metrics[L.EVAL_ACCURACY]),
        "exported_weights": "ema" if task.ema is not None else "raw", "train_time_s": outcome.train_time_s,
    }
    if outcome.accelerator.is_main_process:
        write_json_atomic(task.output_dir / RESULTS_FILE, results, indent=2)
        print(json.dumps(results, indent=2))
    return results


def build_parser() -> argparse.ArgumentParser:
    parser = config_argument_parser("train_vision.py", __doc__.splitlines()[0], VisionTrainConfig)
    parser.add_argument("--config", required=True, help="training recipe YAML (configs/vision/train-*.yaml)")
    add_resume_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_intermixed_args(argv)
    check_resume_arguments(args)
    config = load_config(VisionTrainConfig, args.config, args.overrides)
    return train(config, resume=args.resume, allow_changes=args.allow_change)


def cli(argv: list[str] | None = None) -> None:
    run_command("train_vision", main, argv)


if __name__ == "__main__":
    cli()
