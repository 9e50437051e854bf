"""Pretrain a dense LLaMA or a PNet-LLaMA on a streamed text mix (ParameterNet, Table 7 recipe).

    accelerate launch [--config_file configs/accelerate/<setup>.yaml] scripts/pretrain.py \\
        --config configs/pretrain/<name>.yaml [key=value ...] [--resume [--allow-change KEY ...]]

(``-m pnet.pretrain`` instead of ``scripts/pretrain.py`` works from any directory.) One config file holds every
hyper-parameter (`pnet.config.PretrainConfig`, listed by ``--help``; unknown keys and bad values are errors before
anything is built); ``key=value`` overrides use dotted keys and YAML values. ``model`` (a model file, random init)
or ``init_from`` (a saved folder: a dense LLaMA, an upcycled PNet, a run's ``final/``; its weights with a fresh
optimizer, schedule and data position) decides the architecture (``model_type`` llama or pnet_llama).

Per optimizer step: ``grad_accum`` micro-batches of ``micro_batch_size`` packed sequences per process, so
``global_batch_tokens = micro_batch_size * seq_len * grad_accum * world_size``. AdamW, linear warmup, cosine
to ``lr * min_lr_ratio``, gradient clipping. The PNet model adds its router losses into ``loss``; the loop
logs ``lm_loss``, ``aux_loss`` and ``z_loss`` separately (`pnet.run_log`). Outputs in ``output_dir``:
``log.jsonl``, tensorboard events, ``checkpoint-N`` folders (`pnet.checkpoint`: published only once their weights
gave a finite loss and gradient), ``final/`` (``save_pretrained`` + tokenizer ready for batching) and ``training.png``.
``--resume`` continues from the latest checkpoint bit for bit, refusing settings that changed the run's math or data
unless each is named with ``--allow-change`` (then recorded in the config and the log).
"""

from __future__ import annotations

import argparse
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM

from pnet import run_log as L
from pnet.checkpoint import ResumeError, read_json
from pnet.config import (
    ConfigError,
    PretrainConfig,
    add_resume_arguments,
    check_resume_arguments,
    config_argument_parser,
    load_config,
)
from pnet.data import (
    PackedBatchIterator,
    build_train_stream,
    build_validation_sets,
    check_data,
    load_tokenizer,
)
from pnet.model_loading import check_checkpoint_weights, prepare_tokenizer_for_model, trust_remote_code_for
from pnet.training import Plan, Task, run, run_command

CONFIG_FILE = "pretrain_config.yaml"  # the resolved config beside the run's outputs (and in final/, for model cards)
DATA_STATE_FILE = "data_state_rank{rank}.json"


def expert_token_counts(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(num_routers, num_experts) count of tokens whose top-1 choice is each expert."""
    return torch.stack([torch.bincount(logits.argmax(dim=-1), minlength=logits.shape[-1])
                        for logits in router_logits]).float()


class CausalLMTask(Task):
    """Causal-LM pretraining on packed sequences of a streamed text mix (`pnet.data`)."""

    name = "pretrain"
    config_file = CONFIG_FILE

    def __init__(self, config: PretrainConfig):
        self.config = config
        self.output_dir = Path(config.output_dir)

    def plan(self, accelerator: Accelerator) -> Plan:
        config = self.config
        self.accelerator = accelerator
        self.model_config = config.build_model_config()
        self.tokenizer = load_tokenizer(config.data.tokenizer)
        if self.model_config.vocab_size < len(self.tokenizer):
            raise ConfigError(f"the model's vocab_size={self.model_config.vocab_size} is smaller than the tokenizer's "
                              f"{len(self.tokenizer)} tokens ({config.data.tokenizer}); allowed: >= "
                              f"{len(self.tokenizer)}")
        return Plan(model_config=self.model_config, max_steps=config.max_steps, warmup_steps=config.warmup_steps,
                    micro_batch_size=config.micro_batch_size,
                    grad_accum=config.grad_accum_steps(accelerator.num_processes),
                    tokens_per_step=config.global_batch_tokens)

    def check_data(self) -> list:
        if self.config.init_from is not None:  # its weights, before they load: none missing, none unexpected
            check_checkpoint_weights(self.config.init_from, trust_remote_code_for(self.config.init_from))
        return check_data(self.config.data)  # every record of the local data files

    def data_files(self) -> list[str]:
        return [path for source in self.config.data.sources.values()
                for split in dict.fromkeys([source.train_split, source.validation_split]) if split is not None
                for path in source.files(split)]

    def build_model(self, model_config) -> torch.nn.Module:
        """fp32 causal LM: random init from the model file, or the init_from folder's weights (loaded with the
        installed, registered classes: no code from the folder runs)."""
        config = self.config
        if config.init_from is None:
            return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        trust = trust_remote_code_for(config.init_from)
        return AutoModelForCausalLM.from_pretrained(config.init_from, config=model_config, dtype=torch.float32,
                                                    trust_remote_code=trust)

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        config, rank, world = self.config, accelerator.process_index, accelerator.num_processes
        unwrapped = accelerator.unwrap_model(model)
        self.num_experts = unwrapped.config.num_experts if unwrapped.config.model_type == "pnet_llama" else 0
        self.router_names = unwrapped.model.router_names() if self.num_experts else []
        self.train_batches = PackedBatchIterator(build_train_stream(config.data, self.tokenizer, config.seed, rank,
                                                                    world), config.micro_batch_size)
        self.validation = build_validation_sets(config.data, self.tokenizer, world)
        self.expert_counts = torch.zeros(len(self.router_names), max(self.num_experts, 1), device=accelerator.device)
        self.crc = 0

    def rank_state(self) -> dict[str, Any]:
        return {DATA_STATE_FILE.format(rank=self.accelerator.process_index): self.train_batches.state_dict()}

    def check_resume(self, changes: dict[str, list]) -> None:
        """A source added or removed (every source has a weight) cannot resume: the saved data position is the
        stream of the checkpoint's sources (restoring it into another mix failed inside datasets, after the build)."""
        for key, (old, new) in changes.items():
            if key.startswith("data.sources.") and key.endswith(".weight") and None in (old, new):
                name = key.split(".")[2]
                raise ResumeError(
                    f"--allow-change: data source {name!r} {'added' if old is None else 'removed'} on resume; the "
                    "checkpoint's data position is a stream of its own sources and cannot be restored into another "
                    "mix. Allowed: the same sources (their weights and files may change with --allow-change); for "
                    "a new mix, start a new run from this one's weights (init_from=<its final/ folder>)")

    def load_rank_state(self, checkpoint: Path) -> None:
        self.train_batches.load_state_dict(
            read_json(checkpoint / DATA_STATE_FILE.format(rank=self.accelerator.process_index)))

    def step_batches(self, start_step: int) -> Iterator[list[torch.Tensor]]:
        """The data position is the iterator's (restored by `load_rank_state`), not ``start_step``."""
        grad_accum = self.accelerator.gradient_accumulation_steps
        while True:
            batches, self.crc = [], 0
            for _ in range(grad_accum):
                batch = self.train_batches.next_batch()
                self.crc = zlib.crc32(batch.numpy().tobytes(), self.crc)
                batches.append(batch.to(self.accelerator.device))
            yield batches

    def loss(self, model: torch.nn.Module, batch: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.num_experts:  # dense LLaMA: loss is the LM loss
            loss = model(input_ids=batch, labels=batch).loss
            return {L.LOSS: loss, L.LM_LOSS: loss, L.AUX_LOSS: torch.zeros_like(loss), L.Z_LOSS: torch.zeros_like(loss)}
        # PNet: loss = lm_loss + aux/z terms; router logits give the expert load
        outputs = model(input_ids=batch, labels=batch, output_router_logits=True)
        self.expert_counts += expert_token_counts(outputs.router_logits)
        return {L.LOSS: outputs.loss, L.LM_LOSS: outputs.lm_loss, L.AUX_LOSS: outputs.aux_loss,
                L.Z_LOSS: outputs.z_loss}

    def window_fields(self, step: int, window_start: int) -> dict[str, Any]:
        accelerator, fields = self.accelerator, {L.BATCH_CRC32: self.crc}
        if self.num_experts:
            counts = accelerator.reduce(self.expert_counts, reduction="sum")
            fields.update({L.EXPERT_LOAD: (counts / counts.sum(-1, keepdim=True)).tolist(),
                           L.ROUTER_NAMES: self.router_names, L.LOAD_WINDOW: [window_start, step]})
            self.expert_counts.zero_()
        if self.config.data.on_bad_record == "skip":
            domains = list(self.config.data.sources)
            skipped = torch.tensor([self.train_batches.skipped_records.get(d, 0) for d in domains],
                                   device=accelerator.device)
            fields[L.BAD_RECORDS_SKIPPED] = dict(zip(domains, accelerator.reduce(skipped, "sum").tolist()))
        return fields

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, final: bool) -> dict[str, Any]:
        """Mean LM loss per domain; each rank takes an equal slice of the fixed validation sequences."""
        accelerator, micro_batch_size = self.accelerator, self.config.micro_batch_size
        model.eval()
        world, rank = accelerator.num_processes, accelerator.process_index
        losses = {}
        for domain, sequences in self.validation.items():
            per_rank = len(sequences) // world
            mine = sequences[rank * per_rank:(rank + 1) * per_rank]
            total = torch.zeros(2, device=accelerator.device)  # (sum of batch losses * rows, rows)
            for start in range(0, per_rank, micro_batch_size):
                batch = mine[start:start + micro_batch_size].to(accelerator.device)
                outputs = model(input_ids=batch, labels=batch)
                lm_loss = getattr(outputs, "lm_loss", None)
                lm_loss = outputs.loss if lm_loss is None else lm_loss
                total += torch.stack([lm_loss.float() * len(batch),
                                      torch.tensor(float(len(batch)), device=total.device)])
            total = accelerator.reduce(total, reduction="sum")
            losses[domain] = (total[0] / total[1]).item()
        return {L.VAL_LOSS: losses}

    def save_final(self, model: torch.nn.Module, state_dict: dict, folder: Path) -> None:
        prepare_tokenizer_for_model(self.tokenizer, model.config)  # pad token, model_max_length (sets pad_token_id)
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
        self.tokenizer.save_pretrained(folder)


def train(config: PretrainConfig, resume: bool = False, allow_changes: Sequence[str] = ()) -> Path:
    """Run (or resume) the pretraining described by ``config``; returns the exported ``final/`` folder.

    Every check that can fail - batch arithmetic for this world size, the resume comparison, the tokenizer, every
    record of the local data files - runs before the model is built.
    """
    outcome = run(CausalLMTask(config), config, resume=resume, allow_changes=allow_changes)
    outcome.accelerator.print(f"exported {outcome.final_dir}; plot {Path(config.output_dir) / 'training.png'}")
    return outcome.final_dir


# ---------------------------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = config_argument_parser("pretrain.py", __doc__.split("\n\n")[0], PretrainConfig)
    parser.add_argument("--config", required=True, help="configs/pretrain/<name>.yaml")
    add_resume_arguments(parser)
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    return parser

def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_intermixed_args(argv)
    check_resume_arguments(args)
    config = load_config(PretrainConfig, args.config, args.overrides)
    return train(config, resume=args.resume, allow_changes=args.allow_change)


def cli(argv: list[str] | None = None) -> None:
    run_command("pretrain", main, argv)


if __name__ == "__main__":
    cli()
