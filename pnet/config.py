"""One typed, validated configuration system for every training command (pydantic v2).

``scripts/pretrain.py`` (`PretrainConfig`), ``scripts/train_vision.py`` (`VisionTrainConfig`),
``scripts/finetune_sst2.py`` (`FinetuneSst2Config`) and the Table 7 runner (`experiments.table7.ReplicateConfig`) read a
YAML file plus ``key=value`` overrides (dotted keys, YAML values: ``max_steps=50 data.sources.web.weight=0.5``) into
one of these classes. The shared settings are defined once, in `TrainingConfig`, so the same thing has the same key
everywhere (``lr``, ``warmup_steps``, ``micro_batch_size``, ``save_every``, ``keep_last``, ``precision``, ...).

Every class rejects unknown keys (also inside ``model_overrides``, checked against the model config class's
fields), checks every range and cross-setting rule when it is built - before any data is read or any model is
built - and raises `ConfigError` naming the key, the value and what is allowed. Assignments are validated too.
``describe_config(cls)`` renders the keys with their defaults and meaning (``--help``).
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import re
import types
import typing
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticUndefined

from pnet.model_loading import (
    check_config_keys,
    config_class,
    make_config,
    read_config_dict,
    unknown_key_message,
)

PositiveInt = Annotated[int, Field(strict=True, gt=0)]
NonNegativeInt = Annotated[int, Field(strict=True, ge=0)]
PositiveFloat = Annotated[float, Field(gt=0)]
NonNegativeFloat = Annotated[float, Field(ge=0)]
UnitFloat = Annotated[float, Field(ge=0, le=1)]  # [0, 1]
OpenUnitFloat = Annotated[float, Field(ge=0, lt=1)]  # [0, 1)
Seed = Annotated[int, Field(strict=True, ge=0, lt=2**32)]  # numpy's seeds: [0, 2**32)

# Packaged `datasets` builders that read local `data_files`; their files are checked before training.
LOCAL_BUILDERS = ("json", "parquet", "csv", "text", "arrow")
TEXT_MODEL_TYPES = ("llama", "pnet_llama")


class ConfigError(ValueError):
    """A bad setting; the message names the key, the value and what is allowed."""


class ConfigModel(BaseModel):
    """Base of every config section: unknown keys are errors, assignments are validated, no NaN/inf."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False,
                              use_attribute_docstrings=True, protected_namespaces=())

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


# --------------------------------------------------------------------------------------------- shared settings

class TrainingConfig(ConfigModel):
    """Settings every training command shares (same keys, same meaning)."""

    output_dir: str
    """folder for logs, checkpoints and the exported model"""
    seed: Seed = 0
    """seed of weight init, data order and augmentation (0 <= seed < 2**32)"""
    micro_batch_size: PositiveInt
    """examples (sequences / images / sentences) per forward pass per process"""
    lr: PositiveFloat
    """peak learning rate (AdamW)"""
    lr_schedule: Literal["cosine", "linear"] = "cosine"
    """after linear warmup: cosine decay to lr * min_lr_ratio, or linear decay to 0"""
    min_lr_ratio: UnitFloat = 0.0
    """final learning rate / lr (cosine only)"""
    warmup_steps: NonNegativeInt = 0
    """optimizer steps of linear warmup from 0 to lr"""
    weight_decay: NonNegativeFloat = 0.0
    """AdamW decoupled weight decay, on matrices only (not norms, biases)"""
    adam_beta1: OpenUnitFloat = 0.9
    """AdamW first-moment decay"""
    adam_beta2: OpenUnitFloat = 0.999
    """AdamW second-moment decay"""
    adam_eps: PositiveFloat = 1e-8
    """AdamW denominator epsilon"""
    max_grad_norm: PositiveFloat | None = 1.0
    """clip the global gradient norm to this value (null: no clipping)"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """auto: bf16 autocast on CUDA, fp32 on CPU"""
    log_every: PositiveInt = 10
    """optimizer steps per training log record"""
    cpu_threads: PositiveInt | None = None
    """torch threads per process (null: torch's default)"""
    loss_spike_factor: Annotated[float, Field(gt=1)] | None = 10.0
    """stop like on a non-finite loss when a step's loss exceeds this multiple of the median of the last
    loss_spike_window steps' losses: a finite divergence (null: off)"""
    loss_spike_window: Annotated[int, Field(strict=True, ge=5)] = 50
    """steps whose median loss the spike guard compares with (from the second step on)"""

    @model_validator(mode="after")
    def _check_schedule(self) -> TrainingConfig:
        if self.lr_schedule == "linear" and self.min_lr_ratio:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} needs lr_schedule=cosine (linear decays to 0); "
                             "allowed with linear: 0")
        return self


class CheckpointedTrainingConfig(TrainingConfig):
    """Training commands that evaluate periodically and write resumable checkpoints."""

    eval_every: PositiveInt = 100
    """optimizer steps between evaluations (also after the last step)"""
    save_every: NonNegativeInt = 100
    """optimizer steps between checkpoints (0: only at the end)"""
    keep_last: PositiveInt = 2
    """checkpoints kept"""

    # Settings that may differ on --resume without --allow-change: they change what is logged and saved, not the
    # run's math or data. max_steps may grow (it must stay above the checkpoint's step).
    free_on_resume: ClassVar[tuple[str, ...]] = ("output_dir", "max_steps", "log_every", "eval_every",
                                                 "save_every", "keep_last", "cpu_threads", "tensorboard",
                                                 "loss_spike_factor", "loss_spike_window")


# ------------------------------------------------------------------------------------------------ pretraining

class SourceConfig(ConfigModel):
    """One text source of the pretraining mix: a Hub dataset or local files, with its mixing weight."""

    path: str
    """Hub dataset id ("allenai/c4"), or a builder reading local data_files: json (JSON Lines), parquet, csv, text,
    arrow"""
    weight: PositiveFloat
    """share of training tokens (normalised over the sources)"""
    config: str | None = None
    """dataset config name, e.g. "en" for allenai/c4"""
    data_files: dict[str, str | list[str]] | None = None
    """{split: glob or list of globs} for local builders"""
    train_split: str = "train"
    validation_split: str | None = "validation"
    """null: no validation loss for this source"""
    text_field: str = "text"
    train_skip_docs: NonNegativeInt = 0
    """documents skipped at the start of train_split (held out for validation)"""
    validation_take_docs: PositiveInt | None = None
    """documents read from validation_split (null: all)"""
    shuffle_buffer: NonNegativeInt = 0
    """streaming shuffle buffer in documents (0: the stored order)"""

    @model_validator(mode="after")
    def _check_local_files(self) -> SourceConfig:
        if self.path not in LOCAL_BUILDERS:
            return self
        if not self.data_files:
            raise ValueError(f"builder {self.path!r} reads local files: data_files {{split: glob}} is required")
        splits = [self.train_split] + ([self.validation_split] if self.validation_split else [])
        for split in splits:
            if split not in self.data_files:
                raise ValueError(f"data_files has no {split!r} entry; it has {sorted(self.data_files)}")
            patterns = self.data_files[split]
            for pattern in [patterns] if isinstance(patterns, str) else patterns:
                matches = glob.glob(os.path.expanduser(pattern))
                if not matches:
                    raise ValueError(f"data_files[{split!r}]: no file matches {pattern!r} (relative to {os.getcwd()})")
                if folders := [m for m in matches if os.path.isdir(m)]:
                    raise ValueError(f"data_files[{split!r}]: {pattern!r} matches the folder {folders[0]!r}; data "
                                     f"files must be files (e.g. {os.path.join(folders[0], '*.jsonl.gz')!r})")
            files = [os.path.realpath(f) for f in self.files(split)]
            if twice := sorted({f for f in files if files.count(f) > 1}):  # the stream would read it twice
                raise ValueError(f"data_files[{split!r}]: {twice[0]!r} is listed or matched more than once; allowed: "
                                 "each file once (first_exhausted promises that no document repeats)")
        return self

    def files(self, split: str) -> list[str]:
        """The local files of ``split``, in the order the stream reads them."""
        patterns = (self.data_files or {}).get(split, [])
        patterns = [patterns] if isinstance(patterns, str) else patterns
        return [f for p in patterns for f in sorted(glob.glob(os.path.expanduser(p)))]


class TextDataConfig(ConfigModel):
    """The pretraining data: tokenizer, sequence length and the weighted sources."""

    tokenizer: str
    """local folder or Hub id, loaded with AutoTokenizer"""
    seq_len: Annotated[int, Field(strict=True, ge=2)]
    """tokens per packed training sequence (at least 2: each token is predicted from the ones before it)"""
    sources: Annotated[dict[str, SourceConfig], Field(min_length=1)]
    """{domain name: source}"""
    stopping_strategy: Literal["first_exhausted", "all_exhausted", "all_exhausted_without_replacement"] = (
        "first_exhausted")
    """first_exhausted: the mix stops when a source runs out (shares hold, nothing repeats)"""
    pack_group_docs: PositiveInt = 64
    """documents packed together; the last partial block of each group is dropped"""
    validation_sequences: PositiveInt = 16
    """packed sequences per domain for the validation loss"""
    on_bad_record: Literal["error", "skip"] = "error"
    """a record that is not a JSON object with a string text_field: error (naming file, line and field) or skip
    (counted in the log)"""

    def weights(self) -> dict[str, float]:
        """Normalised mixing weights (token shares)."""
        total = sum(s.weight for s in self.sources.values())
        return {name: s.weight / total for name, s in self.sources.items()}


class PretrainConfig(CheckpointedTrainingConfig):
    """Every hyper-parameter of a pretraining run (``scripts/pretrain.py``)."""

    model: str | None = None
    """model file (configs/models/*.json, model_type llama or pnet_llama): random initialisation"""
    init_from: str | None = None
    """saved model folder or Hub id (dense LLaMA, upcycled PNet, a run's final/): start from its weights with a
    fresh optimizer, schedule and data position; set model to null"""
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    """model config fields set on top of the model file / folder (checked against the config class)"""
    data: TextDataConfig
    max_steps: PositiveInt
    """optimizer steps"""
    global_batch_tokens: PositiveInt
    """tokens per optimizer step = micro_batch_size * seq_len * grad_accum * world_size"""
    tensorboard: bool = True
    # Pretraining defaults (the paper's / LLaMA's AdamW settings)
    min_lr_ratio: UnitFloat = 0.1
    """final learning rate / lr (cosine only)"""
    weight_decay: NonNegativeFloat = 0.1
    """AdamW decoupled weight decay, on matrices only (not norms, biases)"""
    adam_beta2: OpenUnitFloat = 0.95
    """AdamW second-moment decay"""

    @model_validator(mode="after")
    def _check_run(self) -> PretrainConfig:
        if (self.model is None) == (self.init_from is None):
            raise ValueError(f"set exactly one of model (a model file: random init) and init_from (a saved model: "
                             f"start from its weights); got model={self.model!r}, init_from={self.init_from!r}")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be < max_steps={self.max_steps}")
        per_pass = self.micro_batch_size * self.data.seq_len
        if self.global_batch_tokens % per_pass:
            raise ValueError(f"global_batch_tokens={self.global_batch_tokens} is not a multiple of micro_batch_size "
                             f"({self.micro_batch_size}) x data.seq_len ({self.data.seq_len}) = {per_pass}")
        positions = getattr(self.build_model_config(), "max_position_embeddings", None)
        if positions is not None and self.data.seq_len > positions:
            raise ValueError(f"data.seq_len={self.data.seq_len} exceeds the model's max_position_embeddings="
                             f"{positions}; allowed: data.seq_len <= {positions} (or raise max_position_embeddings "
                             "in model_overrides)")
        return self

    def resolved_model_dict(self) -> dict[str, Any]:
        """The model's config.json-style dict: the model file or the init_from folder's config, plus overrides."""
        if self.model is not None:
            where = f"model file {self.model!r}"
            if not os.path.isfile(self.model):
                raise ValueError(f"{where} not found (relative to {os.getcwd()})")
            with open(self.model, encoding="utf-8") as f:
                values = json.load(f)
            if not isinstance(values, dict):
                raise ValueError(f"{where}: expected a JSON object")
            check_config_keys({k: v for k, v in values.items() if k != "model_type"},
                              config_class(values.get("model_type")), where)
        else:
            where = f"init_from {self.init_from!r}"
            if not Path(self.init_from).is_dir() and not re.fullmatch(r"[\w.-]+/[\w.-]+", self.init_from):
                raise ValueError(f"{where} is neither a folder nor a Hub id")
            if Path(self.init_from).is_dir() and not (Path(self.init_from) / "config.json").is_file():
                hint = (" (a checkpoint-N folder is a trainer checkpoint: continue its run with --resume, or start from "
                        "the run's final/)" if re.fullmatch(r"checkpoint-\d+", Path(self.init_from).name) else "")
                raise ValueError(f"{where} has no config.json: not a saved model folder{hint}")
            try:
                values = read_config_dict(self.init_from)
            except OSError as error:
                raise ValueError(f"{where}: no readable config.json ({error})") from None
        if values.get("model_type") not in TEXT_MODEL_TYPES:
            raise ValueError(f"{where}: model_type must be one of {list(TEXT_MODEL_TYPES)}, "
                             f"got {values.get('model_type')!r}")
        check_config_keys(self.model_overrides, config_class(values["model_type"]), "model_overrides")
        return {**values, **self.model_overrides}

    def build_model_config(self):
        """The transformers config of the model (validated by its own class)."""
        return make_config(self.resolved_model_dict(), f"model {self.model or self.init_from!r} with model_overrides")

    def grad_accum_steps(self, world_size: int) -> int:
        """Accumulation steps that reach ``global_batch_tokens``; error if the batch does not divide."""
        tokens_per_pass = self.micro_batch_size * self.data.seq_len * world_size
        if self.global_batch_tokens % tokens_per_pass:
            raise ConfigError(
                f"global_batch_tokens={self.global_batch_tokens} is not a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x data.seq_len ({self.data.seq_len}) x world_size ({world_size}) = "
                f"{tokens_per_pass}; allowed: k * {tokens_per_pass} (or change micro_batch_size)")
        return self.global_batch_tokens // tokens_per_pass

    free_on_resume: ClassVar[tuple[str, ...]] = CheckpointedTrainingConfig.free_on_resume + (
        "data.validation_sequences", "data.on_bad_record", "model", "model_overrides")  # model: compared resolved


# ----------------------------------------------------------------------------------------------------- vision

def check_image_processor(processor, settings: dict[str, Any], model_config) -> None:
    """The image processor (built from the recipe's `image_processor` settings) makes images the model takes: the
    model's channel count, one mean and std per channel (std > 0), a size the network's stride allows; and the
    recipe's on/off settings are booleans. Checked with the config, before any data is read (each used to fail at the
    first training step, or to train on nan)."""
    for key, value in settings.items():
        if key.startswith("do_") and not isinstance(value, bool):
            raise ValueError(f"image_processor.{key}={value!r}; allowed: true or false")
    channels = 1 if processor.do_convert_grayscale else 3
    if channels != model_config.num_channels:
        raise ValueError(f"image_processor: do_convert_grayscale={processor.do_convert_grayscale} gives {channels}-channel "
                         f"images, the model takes num_channels={model_config.num_channels}; allowed: "
                         f"do_convert_grayscale={model_config.num_channels == 1}")
    if processor.do_normalize:
        for key in ("image_mean", "image_std"):
            values = getattr(processor, key)
            values = list(values) if isinstance(values, (list, tuple)) else [values]
            if len(values) not in (1, channels):
                raise ValueError(f"image_processor.{key}={values}: {len(values)} values for {channels}-channel images; "
                                 f"allowed: {channels} (one per channel)")
            if key == "image_std" and not all(v > 0 for v in values):
                raise ValueError(f"image_processor.image_std={values}; allowed: values > 0 (images are divided by it)")
    side = processor.crop_size if processor.do_center_crop else processor.size if processor.do_resize else None
    lowest = max(1, getattr(model_config, "image_size_divisor", 1))
    given = [v for v in (side.height, side.width, side.shortest_edge) if v is not None] if side is not None else []
    if any(v < lowest for v in given):
        raise ValueError(f"image_processor: {'crop_size' if processor.do_center_crop else 'size'} {given} makes images "
                         f"the model cannot take; allowed: sides >= {lowest} (the network's total stride)")


@dataclasses.dataclass
class AugmentConfig:
    """Training augmentation, as in the recipe YAML's `augment:` block (applied by `pnet.vision_data`)."""

    crop_scale: tuple[float, float] = (0.08, 1.0)
    horizontal_flip: float = 0.5
    rand_augment_ops: int = 2
    rand_augment_magnitude: float = 9.0
    rand_augment_magnitude_std: float = 0.5
    random_erasing: float = 0.25


def _check_augment(augment: AugmentConfig) -> AugmentConfig:
    low, high = augment.crop_scale
    problems = []
    if not 0 < low <= high <= 1:
        problems.append(f"crop_scale={list(augment.crop_scale)} must satisfy 0 < low <= high <= 1")
    for name in ("horizontal_flip", "random_erasing"):
        if not 0 <= getattr(augment, name) <= 1:
            problems.append(f"{name}={getattr(augment, name)} is a probability: allowed [0, 1]")
    if augment.rand_augment_ops < 0:
        problems.append(f"rand_augment_ops={augment.rand_augment_ops} must be >= 0")
    if not 0 <= augment.rand_augment_magnitude <= 10:
        problems.append(f"rand_augment_magnitude={augment.rand_augment_magnitude}: allowed [0, 10]")
    if augment.rand_augment_magnitude_std < 0:
        problems.append(f"rand_augment_magnitude_std={augment.rand_augment_magnitude_std} must be >= 0")
    if problems:
        raise ValueError("; ".join(problems))
    return augment


class TrainSubsetConfig(ConfigModel):
    """A fixed share of the training split (`pnet.vision_data.stratified_subset`), the same for every run seed."""

    fraction: Annotated[float, Field(gt=0, le=1)]
    """share of each class's training examples kept (round(fraction x count), at least 1); 1: all"""
    seed: Seed = 0
    """seed of the draw, independent of the run's seed"""


class ImageDataConfig(ConfigModel):
    """An image classification dataset: Hub id, ``imagefolder`` directory or folder of IDX files."""

    path: str
    name: str | None = None
    """dataset config name (Hub)"""
    train_split: str = "train"
    eval_split: str = "validation"
    image_column: str = "image"
    label_column: str = "label"
    limit: PositiveInt | None = None
    """keep the first N examples of every split (quick runs)"""
    train_subset: TrainSubsetConfig | None = None
    """train on a fixed share of train_split, drawn per class (null: all of it)"""
    on_bad_record: Literal["error", "skip"] = "error"
    """an image file that does not decode: stop naming it before training (error), or leave it out and count it"""


class VisionTrainConfig(CheckpointedTrainingConfig):
    """A GhostNet / ParameterNet image classifier run (``scripts/train_vision.py``)."""

    model: str
    """model file (configs/vision/*.json; model_type parameternet, pnet_swin, swin, ...)"""
    model_overrides: dict[str, Any] = Field(default_factory=dict)
    """model config fields set on top of the model file (checked against its config class)"""
    data: ImageDataConfig
    image_processor: dict[str, Any]
    """ParameterNetImageProcessor settings, saved with the model (evaluation = exactly this transform)"""
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    """training augmentation (AugmentConfig)"""
    max_steps: PositiveInt | None = None
    """optimizer steps (or epochs)"""
    epochs: PositiveInt | None = None
    warmup_epochs: NonNegativeFloat | None = None
    """warmup in epochs instead of warmup_steps"""
    eval_batch_size: PositiveInt = 256
    label_smoothing: OpenUnitFloat = 0.1
    ema_decay: OpenUnitFloat = 0.0
    """EMA of the weights, evaluated and exported instead of the raw weights (0: off)"""
    num_workers: NonNegativeInt = 0
    """DataLoader workers"""
    train_eval_samples: NonNegativeInt = 10000
    """training examples whose accuracy is measured at the end (evaluation transform)"""

    @field_validator("augment")
    @classmethod
    def _check_augment_ranges(cls, augment: AugmentConfig) -> AugmentConfig:
        return _check_augment(augment)

    @model_validator(mode="after")
    def _check_run(self) -> VisionTrainConfig:
        if (self.max_steps is None) == (self.epochs is None):
            raise ValueError(f"set exactly one of max_steps and epochs; got max_steps={self.max_steps!r}, "
                             f"epochs={self.epochs!r}")
        if self.warmup_epochs and self.warmup_steps:
            raise ValueError(f"set warmup_steps ({self.warmup_steps}) or warmup_epochs ({self.warmup_epochs}), "
                             "not both")
        if self.max_steps is not None and self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be < max_steps={self.max_steps}")
        if self.epochs is not None and self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs={self.warmup_epochs} must be < epochs={self.epochs}")
        from modeling_parameternet import ParameterNetImageProcessor  # only vision configs need the vision code

        processor_kwargs = getattr(ParameterNetImageProcessor, "valid_kwargs", None)
        allowed = typing.get_type_hints(processor_kwargs) if processor_kwargs is not None else None
        if allowed is not None:
            unknown = sorted(set(self.image_processor) - set(allowed))
            if unknown:
                raise ValueError(unknown_key_message(unknown, allowed, "image_processor"))
        label_keys = sorted({"id2label", "label2id", "num_labels"} & set(self.model_overrides))
        if label_keys:  # build_model_config replaces them by the dataset's: an override would be recorded, not used
            raise ValueError(f"model_overrides: {label_keys} come from the dataset (the names of data.label_column); "
                             "allowed: leave them out")
        check_image_processor(ParameterNetImageProcessor(**self.image_processor), self.image_processor,
                              self.build_model_config())
        return self

    def build_model_config(self, label_names: list[str] | None = None):
        """The model file's config + overrides (+ the dataset's labels when given), validated by its class."""
        from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING

        where = f"model file {self.model!r}"
        if not os.path.isfile(self.model):
            raise ValueError(f"{where} not found (relative to {os.getcwd()})")
        with open(self.model, encoding="utf-8") as f:
            values = json.load(f)
        values.setdefault("model_type", "parameternet")
        cls = config_class(values["model_type"])
        if cls not in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING:
            raise ValueError(f"{where}: model_type {values['model_type']!r} has no image classification model")
        check_config_keys(self.model_overrides, cls, "model_overrides")
        values.update(self.model_overrides)
        if label_names is not None:
            values.pop("num_labels", None)
            values["id2label"] = dict(enumerate(label_names))
            values["label2id"] = {name: i for i, name in enumerate(label_names)}
        return make_config(values, f"{where} with model_overrides")

    free_on_resume: ClassVar[tuple[str, ...]] = CheckpointedTrainingConfig.free_on_resume + (
        "eval_batch_size", "num_workers", "train_eval_samples", "model", "model_overrides")


# --------------------------------------------------------------------------------------------------- fine-tuning

class Sst2DataConfig(ConfigModel):
    """SST-2 from the Hub or from local JSON Lines with GLUE's columns (sentence, label, idx)."""

    dataset: str = "nyu-mll/glue"
    """Hub dataset id"""
    dataset_config: str = "sst2"
    data_dir: str | None = None
    """folder with sst2/{train,validation}.jsonl[.gz], or "bundled" for eval/data (default: the Hub, or bundled
    when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set)"""
    heldout_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.5
    """offline (no train split): share of validation held out for the accuracy"""
    max_train_samples: PositiveInt | None = None
    max_eval_samples: PositiveInt | None = None
    seq_len: PositiveInt = 128
    """sentences are truncated to this many tokens"""


class FinetuneSst2Config(CheckpointedTrainingConfig):
    """SST-2 fine-tuning of a pretrained (PNet-)LLaMA as a sequence classifier (``scripts/finetune_sst2.py``)."""

    model: str
    """pretrained model folder or Hub id"""
    trust_remote_code: bool = False
    """run the model folder's own code (auto_map); not needed for llama / pnet_llama folders"""
    output_dir: str | None = None
    """default: <model>/sst2_finetune"""
    data: Sst2DataConfig = Field(default_factory=Sst2DataConfig)
    epochs: PositiveInt = 3
    warmup_ratio: OpenUnitFloat = 0.06
    """warmup as a share of all steps (used when warmup_steps is 0)"""
    eval_batch_size: PositiveInt = 64
    eval_every: PositiveInt | None = None
    """optimizer steps between evaluations (null: at the end of every epoch; also after the last step)"""
    save_every: NonNegativeInt | None = None
    """optimizer steps between checkpoints (null: at the end of every epoch; 0: only at the end)"""
    device: Literal["cpu", "cuda"] | None = None
    """default: cuda if available, else cpu"""
    report_train_accuracy: bool = False
    """also measure accuracy on the fine-tuning set"""
    save_model: bool = False
    """save the fine-tuned classifier (and its tokenizer) to output_dir/final"""
    # Fine-tuning defaults
    micro_batch_size: PositiveInt = 32
    """sentences per forward pass"""
    lr: PositiveFloat = 2e-5
    """peak learning rate (AdamW)"""
    lr_schedule: Literal["cosine", "linear"] = "linear"
    """after linear warmup: cosine decay to lr * min_lr_ratio, or linear decay to 0"""
    weight_decay: NonNegativeFloat = 0.01
    """AdamW decoupled weight decay, on matrices only (not norms, biases)"""

    @model_validator(mode="after")
    def _check_warmup(self) -> FinetuneSst2Config:
        if self.warmup_steps and self.warmup_ratio:
            raise ValueError(f"set warmup_steps ({self.warmup_steps}) or warmup_ratio ({self.warmup_ratio}), not both")
        return self

    free_on_resume: ClassVar[tuple[str, ...]] = CheckpointedTrainingConfig.free_on_resume + (
        "epochs", "eval_batch_size", "report_train_accuracy", "save_model", "device")


# ------------------------------------------------------------------------------------------------- loading

def hub_is_offline() -> bool:
    """True when the user has switched the Hub off (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`): local data then
    stands in for the Hub's where a command has a bundled copy."""
    return any(os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def set_dotted(values: dict[str, Any], dotted_key: str, value: Any) -> None:
    """``set_dotted(d, "data.sources.web.weight", 0.5)``; missing sections are created (the config class then
    rejects a key it does not know, so a typo still fails)."""
    *parents, last = dotted_key.split(".")
    node = values
    for i, key in enumerate(parents):
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise ConfigError(f"override {dotted_key!r}: {'.'.join(parents[:i + 1])!r} is a value, not a section")
        node = node[key]
    node[last] = value


def yaml_value(value: Any) -> str:
    """A value as a ``key=value`` override reads it back (YAML flow style, one line)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key written twice in one mapping (YAML keeps the last value silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: explicit keys may override merged ones
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in first_line:
                raise ConfigError(f"{self.name}, line {line}: key {key!r} is set twice (first at line "
                                  f"{first_line[key]}); a YAML file would keep the last value silently: keep one")
            first_line[key] = line
        return super().construct_mapping(node, deep)


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    with open(path, encoding="utf-8") as f:
        try:
            values = yaml.load(f, Loader=_UniqueKeyLoader)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"{path}: expected a YAML mapping at the top level")
    return values


def apply_overrides(values: dict[str, Any], overrides: typing.Iterable[str],
                    literal_sections: tuple[str, ...] = ()) -> dict[str, Any]:
    """Apply ``key=value`` overrides (dotted keys, YAML values). Under a section named in ``literal_sections`` the
    rest of the key is taken whole (that section's keys are themselves dotted keys)."""
    for override in overrides:
        if "=" not in override:
            raise ConfigError(f"override {override!r} must look like key=value (dotted keys allowed)")
        key, raw = override.split("=", 1)
        section, _, rest = key.partition(".")
        value = yaml.safe_load(raw)
        if section in literal_sections and rest:
            if values.get(section) is None:
                values[section] = {}
            values[section][rest] = value
        else:
            set_dotted(values, key, value)
    return values


def _unwrap(annotation: Any) -> Any:
    """The config class or dataclass inside Optional[...] / Annotated[...] / dict[str, ...], else None."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            if (found := _unwrap(arg)) is not None:
                return found
        return None
    if origin is dict:
        return ("dict", _unwrap(typing.get_args(annotation)[1]))
    if isinstance(annotation, type) and (issubclass(annotation, BaseModel) or dataclasses.is_dataclass(annotation)):
        return annotation
    return None


def _keys_of(cls: Any) -> list[str]:
    if isinstance(cls, type) and issubclass(cls, BaseModel):
        return list(cls.model_fields)
    return [f.name for f in dataclasses.fields(cls)]


def _class_at(cls: type, loc: tuple) -> Any:
    """The config class (or dataclass) that holds the key at ``loc`` (a pydantic error location), or None."""
    node: Any = cls
    for part in loc:
        if isinstance(node, tuple):  # ("dict", value class): ``part`` is a mapping key
            node = node[1]
            continue
        if node is None or isinstance(part, int):
            return None
        if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
            node = _unwrap(node.model_fields[part].annotation)
        elif dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = _unwrap({f.name: f.type for f in dataclasses.fields(node)}[part])
        else:
            return None
    return None if isinstance(node, tuple) else node


def _describe_error(cls: type, error: dict[str, Any]) -> str:
    loc = tuple(error["loc"])
    key = ".".join(str(p) for p in loc)
    kind = error["type"]
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        parent = _class_at(cls, loc[:-1])
        allowed = _keys_of(parent) if parent is not None else []
        where = ".".join(str(p) for p in loc[:-1])
        return unknown_key_message([str(loc[-1])], allowed, where)
    if kind in ("missing", "missing_argument"):
        return f"{key}: required key missing"
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error" and not loc:
        return message
    if kind == "value_error":
        return f"{key}: {message}"
    return f"{key}={error['input']!r}: {message}"


def parse_config(cls: type[ConfigModel], values: dict[str, Any], source: str = "config",
                 overridden: typing.Iterable[str] = ()) -> Any:
    """Build ``cls`` from a mapping; every problem becomes one line of a `ConfigError`, attributed to ``source`` or,
    for the dotted keys in ``overridden`` (and below them), to the command line."""
    try:
        return cls.model_validate(values)
    except ValidationError as error:
        overridden = tuple(overridden)

        def origin(e: dict[str, Any]) -> str:
            key = ".".join(str(part) for part in e["loc"])
            if not key and overridden:  # a rule across keys: the file's values, the command line's, or both
                return f"{source} with the command-line overrides of {list(overridden)}"
            # the key or a section of it was overridden, or (a section's own rule) a key inside it was
            from_command_line = key and any(key == o or key.startswith(f"{o}.") or o.startswith(f"{key}.")
                                            for o in overridden)
            return "command-line override" if from_command_line else source

        problems = [(origin(e), _describe_error(cls, e)) for e in error.errors()]
        if len(problems) == 1:
            raise ConfigError(f"{problems[0][0]}: {problems[0][1]}") from None
        raise ConfigError("\n  ".join([f"{source}:"] + [f"{problem} ({where})" if where != source else problem
                                                         for where, problem in problems])) from None


def load_config(cls: type[ConfigModel], path: str | os.PathLike | None = None, overrides: typing.Iterable[str] = (),
                values: dict[str, Any] | None = None, literal_sections: tuple[str, ...] = ()) -> Any:
    """Read the YAML file ``path`` (or start from ``values``), apply ``key=value`` overrides and validate."""
    base = read_yaml(path) if path is not None else {}
    base.update(values or {})
    overrides = list(overrides)
    apply_overrides(base, overrides, literal_sections)
    return parse_config(cls, base, str(path) if path is not None else cls.__name__,
                        overridden=[override.split("=", 1)[0] for override in overrides])


def load_pretrain_config(path: str | os.PathLike, overrides: typing.Iterable[str] = ()) -> PretrainConfig:
    return load_config(PretrainConfig, path, overrides)


def _type_name(annotation: Any) -> str:
    """int, float | None, one of ['cosine', 'linear'], ... for --help."""
    if isinstance(annotation, str):
        return annotation
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Annotated:
        return _type_name(args[0])
    if origin is Literal:
        return "one of " + "/".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args).replace("NoneType", "null")
    if origin is not None:
        return f"{getattr(origin, '__name__', origin)}[{', '.join(_type_name(a) for a in args)}]"
    return getattr(annotation, "__name__", str(annotation))


def describe_config(cls: type, prefix: str = "") -> str:
    """One line per key: dotted name, type, default and meaning (for ``--help``)."""
    lines = []
    fields = cls.model_fields if issubclass(cls, BaseModel) else {
        f.name: f for f in dataclasses.fields(cls)}
    for name, field in fields.items():
        key = f"{prefix}{name}"
        if isinstance(field, dataclasses.Field):
            annotation = field.type
            default = field.default if field.default is not dataclasses.MISSING else (
                field.default_factory() if field.default_factory is not dataclasses.MISSING else PydanticUndefined)
            description = ""
        else:
            annotation, description = field.annotation, field.description or ""
            default = field.get_default(call_default_factory=True)
        nested = _unwrap(annotation)
        if isinstance(nested, tuple) and nested[1] is not None:  # dict of sections
            lines.append(f"  {key}.<name>: {description}".rstrip(": "))
            lines.append(describe_config(nested[1], f"{key}.<name>."))
            continue
        if nested is not None and not isinstance(nested, tuple):
            if description:
                lines.append(f"  {key}: {description}")
            lines.append(describe_config(nested, f"{key}."))
            continue
        shown = "required" if default is PydanticUndefined else f"default {json.dumps(default)}"
        description = " ".join(description.split())
        lines.append(f"  {key} ({_type_name(annotation)}, {shown})" + (f": {description}" if description else ""))
    return "\n".join(line for line in lines if line)


def config_argument_parser(prog: str, description: str, config_class: type) -> "argparse.ArgumentParser":
    """The command line of a config-driven script: its ``--help`` ends with every key of `config_class`, its default
    and meaning. The caller adds ``--config``, ``key=value`` overrides and its own flags."""
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML file, or key=value overrides with dotted keys):\n" + describe_config(config_class))


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """``--resume`` and ``--allow-change KEY`` of every training command (checked by `check_resume_arguments`)."""
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="with --resume: accept a changed setting (dotted key or section, e.g. lr, data, "
                             "model_config.router_aux_loss_coef); repeat for several")


def check_resume_arguments(args: argparse.Namespace) -> None:
    if args.allow_change and not args.resume:
        raise ConfigError("--allow-change only applies with --resume")
