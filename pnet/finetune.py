"""Fine-tune a pretrained PNet-LLaMA (or LLaMA) folder as an SST-2 sentiment classifier (the paper's Table 7).

    python scripts/finetune_sst2.py MODEL_DIR [--config FILE.yaml] [key=value ...] [--trust-remote-code] [--resume]
    python scripts/finetune_sst2.py MODEL_DIR data.data_dir=bundled epochs=3 lr=5e-4    # offline: eval/data/sst2

The settings are `pnet.config.FinetuneSst2Config` (``--help`` lists them; the keys shared with pretraining mean the
same: ``lr``, ``micro_batch_size``, ``warmup_steps``, ``max_grad_norm``, ``precision``, ...). The model folder is
loaded with the installed pnet classes, without running the folder's own code, unless ``--trust-remote-code``.

The data is read with `datasets.load_dataset` either way: the Hub dataset, or JSON Lines with GLUE's columns
(`sentence`, `label`, `idx`) in `DATA_DIR/sst2/{train,validation}.jsonl[.gz]`. When there is no train split
(the offline copy has only the 872 validation sentences) the validation sentences are split with a fixed seed
into a fine-tuning part and a held-out part, accuracy is measured on the held-out part only, and every output
labels the number "SST-2 (held-out half of validation, offline)".

The loop is the shared one (`pnet.training`): accelerate (one process, DDP, DeepSpeed), checkpoints every epoch
(``save_every``) and ``--resume [--allow-change KEY ...]`` as in pretraining. Outputs (in ``output_dir``, default
MODEL_DIR/sst2_finetune): ``log.jsonl`` (`pnet.run_log` fields), ``training.png``, ``checkpoint-N`` folders,
``sst2_results.json``, and the classifier with its tokenizer in ``final/`` (``save_model=true``). The result JSON
is also copied to MODEL_DIR/sst2_results.json, where `pnet-report` and `pnet-card` look for it.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import datasets
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader
from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

from pnet import run_log as L
from pnet.checkpoint import write_json_atomic
from pnet.config import (
    ConfigError,
    FinetuneSst2Config,
    add_resume_arguments,
    check_resume_arguments,
    config_argument_parser,
    hub_is_offline,
    load_config,
)
from pnet.model_loading import (
    check_checkpoint_weights,
    prepare_tokenizer_for_model,
    read_config_dict,
    trust_remote_code_for,
)
from pnet.training import Plan, Task, classifier_metrics, run, run_command

LABEL_HUB = "SST-2 (validation)"
LABEL_OFFLINE_HELDOUT = "SST-2 (held-out half of validation, offline)"
RESULTS_FILE = L.SST2_RESULTS_FILE
CONFIG_FILE = "finetune_config.yaml"


def bundled_data_dir() -> Path:
    """The evaluation data installed with the ``pnet_eval`` package (its ``data/`` folder), found without
    importing it: pnet sits below pnet_eval and reads only its data files."""
    spec = importlib.util.find_spec("pnet_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("data.data_dir=bundled: the pnet_eval package (its bundled data) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "data"


def load_sst2(dataset: str, dataset_config: str, data_dir: str | None) -> tuple[datasets.DatasetDict, str, list[str]]:
    """SST-2 splits from the Hub or from local JSON Lines; returns (splits, where they came from, the local files
    read: their content hashes `--resume` compares)."""
    if data_dir is None and hub_is_offline():
        data_dir = "bundled"
    if data_dir is None:
        return datasets.load_dataset(dataset, dataset_config), f"hub:{dataset}/{dataset_config}", []
    root = bundled_data_dir() if data_dir == "bundled" else Path(data_dir).expanduser().resolve()
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
    return datasets.load_dataset("json", data_files=files), f"local:{root / 'sst2'}", list(files.values())


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
                generator: torch.Generator | None = None) -> DataLoader:
    """Batches padded to their longest sentence (right padding; the classifier reads the last non-pad token). Without
    a `generator`, the loader gets a private one: iterating would otherwise draw from the global RNG that dropout
    uses, and each evaluation would shift the training after it."""

    def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
        batch = tokenizer(
            [r["sentence"] for r in rows], padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        batch["labels"] = torch.tensor([int(r["label"]) for r in rows])
        return dict(batch)

    generator = torch.Generator() if generator is None else generator
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)


def check_model_reference(config: FinetuneSst2Config) -> None:
    """The model folder exists and fits data.seq_len (before anything is loaded)."""
    model_dir = Path(config.model).expanduser()
    if model_dir.is_dir() and not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"model folder {str(model_dir)!r} has no config.json")
    if not model_dir.is_dir() and "/" not in config.model:
        raise FileNotFoundError(f"model folder {config.model!r} does not exist")
    positions = read_config_dict(config.model).get("max_position_embeddings")
    if positions is not None and config.data.seq_len > positions:
        raise ConfigError(f"data.seq_len={config.data.seq_len} exceeds the model's max_position_embeddings="
                          f"{positions}; allowed: <= {positions}")


def output_dir_of(config: FinetuneSst2Config) -> Path:
    """``output_dir``, by default ``<model folder>/sst2_finetune``."""
    return Path(config.output_dir) if config.output_dir else Path(config.model).expanduser() / "sst2_finetune"


class SequenceClassificationTask(Task):
    """SST-2 fine-tuning of a pretrained (PNet-)LLaMA folder as a two-label sequence classifier."""

    name = "fine-tune SST-2"
    config_file = CONFIG_FILE

    def __init__(self, config: FinetuneSst2Config):
        check_model_reference(config)
        self.config = config
        self.model_dir = Path(config.model).expanduser()
        self.output_dir = output_dir_of(config)
        self.trust = trust_remote_code_for(config.model, config.trust_remote_code)  # decided before any loading

    def data_files(self) -> list[str]:
        return self.local_files

    def plan(self, accelerator: Accelerator) -> Plan:
        config, data = self.config, self.config.data
        self.accelerator = accelerator
        splits, self.source, self.local_files = load_sst2(data.dataset, data.dataset_config, data.data_dir)
        self.train_set, self.eval_set, self.eval_split, self.label = split_for_finetuning(
            splits, data.heldout_fraction, config.seed)
        if data.max_train_samples:
            self.train_set = self.train_set.select(range(min(data.max_train_samples, len(self.train_set))))
        if data.max_eval_samples:
            self.eval_set = self.eval_set.select(range(min(data.max_eval_samples, len(self.eval_set))))
        check_checkpoint_weights(config.model, self.trust, head="sequence-classification")
        model_config = AutoConfig.from_pretrained(config.model, trust_remote_code=self.trust)
        model_config.num_labels = 2
        model_config.id2label, model_config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
        model_config.pad_token_id = None  # the classifier reads the last non-pad token: the tokenizer's pad decides
        self.tokenizer = AutoTokenizer.from_pretrained(config.model, trust_remote_code=self.trust)
        prepare_tokenizer_for_model(self.tokenizer, model_config)
        self.tokenizer.padding_side = "right"
        self.steps_per_epoch = math.ceil(len(self.train_set) / (config.micro_batch_size * accelerator.num_processes))
        max_steps = config.epochs * self.steps_per_epoch
        return Plan(model_config=model_config, max_steps=max_steps,
                    warmup_steps=config.warmup_steps or math.ceil(config.warmup_ratio * max_steps),
                    micro_batch_size=config.micro_batch_size, eval_every=config.eval_every or self.steps_per_epoch,
                    save_every=self.steps_per_epoch if config.save_every is None else config.save_every)

    def build_model(self, model_config) -> torch.nn.Module:
        return AutoModelForSequenceClassification.from_pretrained(self.config.model, config=model_config,
                                                                  trust_remote_code=self.trust)

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        config = self.config
        self.generator = torch.Generator().manual_seed(config.seed)
        self.train_loader, self.eval_loader = accelerator.prepare(
            make_loader(self.train_set, self.tokenizer, config.micro_batch_size, config.data.seq_len, shuffle=True,
                        generator=self.generator),
            make_loader(self.eval_set, self.tokenizer, config.eval_batch_size, config.data.seq_len, shuffle=False))
        self.train_eval_loader = accelerator.prepare(
            make_loader(self.train_set, self.tokenizer, config.eval_batch_size, config.data.seq_len, shuffle=False))

    def step_batches(self, start_step: int) -> Iterator[list[dict]]:
        """Epoch by epoch, each epoch's order seeded by (seed, epoch): a resumed run skips to the same batch."""
        step = start_step
        while True:
            epoch, skip = divmod(step, self.steps_per_epoch)
            self.generator.manual_seed(self.config.seed + epoch)
            loader = self.accelerator.skip_first_batches(self.train_loader, skip) if skip else self.train_loader
            for batch in loader:
                yield [batch]
                step += 1

    def loss(self, model: torch.nn.Module, batch: dict) -> dict[str, torch.Tensor]:
        return {L.LOSS: model(**batch).loss}

    def window_fields(self, step: int, window_start: int) -> dict[str, Any]:
        return {L.EPOCH: step / self.steps_per_epoch}

    def evaluate(self, model: torch.nn.Module, final: bool) -> dict[str, Any]:
        metrics = classifier_metrics(model, self.eval_loader, self.accelerator)
        record = {L.EVAL_LOSS: metrics["loss"], L.EVAL_ACCURACY: metrics["accuracy"],
                  L.EVAL_SAMPLES: metrics["samples"]}
        if final and self.config.report_train_accuracy:
            record[L.TRAIN_ACCURACY] = classifier_metrics(model, self.train_eval_loader, self.accelerator)["accuracy"]
        return record

    def save_final(self, model: torch.nn.Module, state_dict: dict, folder: Path) -> None:
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)


def train(config: FinetuneSst2Config, resume: bool = False, allow_changes: Sequence[str] = ()) -> dict:
    """Fine-tune and evaluate; returns (and writes) the result dict."""
    task = SequenceClassificationTask(config)
    outcome = run(task, config, resume=resume, allow_changes=allow_changes, export=config.save_model,
                  cpu=config.device == "cpu")
    metrics, model_dir = outcome.final_eval, task.model_dir
    result = {
        "model": model_dir.resolve().name if model_dir.is_dir() else config.model,
        "model_dir": str(model_dir.resolve()) if model_dir.is_dir() else config.model,
        "task": "sst2",
        "label": task.label,
        "data_source": task.source,
        "offline_heldout": task.label != LABEL_HUB,
        "eval_split": task.eval_split,
        "finetune_examples": len(task.train_set),
        "eval_examples": len(task.eval_set),
        "accuracy": metrics[L.EVAL_ACCURACY],
        "train_accuracy": metrics.get(L.TRAIN_ACCURACY),
        "config": config.to_dict(),
        "steps": outcome.steps,
        "wall_time_s": outcome.train_time_s,
    }
    if outcome.accelerator.is_main_process:
        write_json_atomic(task.output_dir / RESULTS_FILE, result, indent=2)
        if model_dir.is_dir():
            write_json_atomic(model_dir / RESULTS_FILE, result, indent=2)
        print(f"{task.label}: accuracy {result['accuracy']:.4f} on {len(task.eval_set)} sentences; wrote "
              f"{task.output_dir / RESULTS_FILE}")
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = config_argument_parser("finetune_sst2.py", __doc__.splitlines()[0], FinetuneSst2Config)
    parser.add_argument("model", help="pretrained PNet-LLaMA / LLaMA folder (config.json, weights, tokenizer) or "
                                      "Hub id")
    parser.add_argument("--config", default=None, help="YAML file with settings (optional; key=value overrides win)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="run the model folder's own code (auto_map); llama / pnet_llama folders do not need it")
    add_resume_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_intermixed_args(argv)
    check_resume_arguments(args)
    values = {"model": args.model}
    if args.trust_remote_code:
        values["trust_remote_code"] = True
    config = load_config(FinetuneSst2Config, args.config, args.overrides, values=values)
    return train(config, resume=args.resume, allow_changes=args.allow_change)


def cli(argv: list[str] | None = None) -> None:
    run_command("finetune_sst2", main, argv)


if __name__ == "__main__":
    cli()
