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
import os
import shutil
import sys
import time
import zlib
from pathlib import Path
from typing import Sequence

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, get_scheduler

from pnet import run_log as L
from pnet.checkpoint import (
    CheckpointSaver,
    change_history_header,
    flatten,
    ResumeError,
    publish_dir,
    read_json,
    find_resume_point,
    run_settings,
    write_yaml_atomic,
)
from pnet.config import ConfigError, PretrainConfig, TrainingConfig, config_argument_parser, load_config
from pnet.data import (
    DataRecordError,
    PackedBatchIterator,
    build_train_stream,
    build_validation_sets,
    check_data,
    load_tokenizer,
)
from pnet.model_loading import prepare_tokenizer_for_model, trust_remote_code_for
from pnet.plots import plot_training

CONFIG_FILE = "pretrain_config.yaml"  # the resolved config beside the run's outputs (and in final/, for model cards)
DATA_STATE_FILE = "data_state_rank{rank}.json"
FSDP_NEEDS_GPUS = (
    "FSDP needs GPUs (or another accelerator): accelerate enables FSDP only for accelerator process groups, never for "
    "CPU processes, so on CPU the processes would train unconnected. On CPU use DDP "
    "(configs/accelerate/cpu-2proc.yaml) or DeepSpeed ZeRO (configs/accelerate/deepspeed-zero{2,3}.yaml).")


# ------------------------------------------------------------------------------------------- building blocks

def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear, embedding, expert, router weights), none on norms and biases."""
    # Under ZeRO-3 init parameters are already partitioned (flat placeholders); ds_shape is the real shape.
    def is_matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and is_matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not is_matrix(p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: TrainingConfig, total_steps: int, warmup_steps: int):
    """AdamW (decay on matrices only) and the warmup + cosine / linear schedule of ``config``, shared by every
    training command (``warmup_steps`` is given: vision and fine-tuning derive it from epochs / a ratio)."""
    optimizer = torch.optim.AdamW(adamw_param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    if config.lr_schedule == "cosine":
        scheduler = get_scheduler("cosine_with_min_lr", optimizer, num_warmup_steps=warmup_steps,
                                  num_training_steps=total_steps,
                                  scheduler_specific_kwargs={"min_lr_rate": config.min_lr_ratio})
    else:
        scheduler = get_scheduler("linear", optimizer, num_warmup_steps=warmup_steps,
                                  num_training_steps=total_steps)
    return optimizer, scheduler


def apply_optimizer_settings(optimizer, scheduler, config: TrainingConfig) -> None:
    """After ``load_state``: give the optimizer and the schedule this run's settings.

    ``load_state`` restores the checkpoint's lr, betas, eps, weight decay and base learning rate; without this a
    resumed run would keep them whatever the config says. The schedule's shape (warmup, max_steps, min ratio) is the
    one built from the config. With unchanged settings every value is recomputed bit for bit as the scheduler did.
    """
    inner = getattr(scheduler, "scheduler", scheduler)  # accelerate wraps the torch scheduler
    groups = optimizer.param_groups
    for group, weight_decay in zip(groups, (config.weight_decay, 0.0)):
        group.update(betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps, weight_decay=weight_decay,
                     initial_lr=config.lr)
    inner.base_lrs = [config.lr] * len(groups)
    lrs = [base * factor(inner.last_epoch) for base, factor in zip(inner.base_lrs, inner.lr_lambdas)]
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    inner._last_lr = lrs  # what get_last_lr() reports for the next step


def make_accelerator(precision: str, project_dir: Path | None = None, tensorboard: bool = False) -> Accelerator:
    """One accelerator setup for every launch: 1 CPU/GPU process, torchrun DDP (gloo on CPU), DeepSpeed, FSDP (GPU)."""
    on_cuda = torch.cuda.is_available()
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not on_cuda:
        raise ConfigError(FSDP_NEEDS_GPUS)
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    bf16 = precision == "bf16" or (precision == "auto" and on_cuda)
    accelerator = Accelerator(
        # cpu=True makes torchrun-launched CPU processes MULTI_CPU (DDP); it would switch DeepSpeed off.
        cpu=not on_cuda and not use_deepspeed,
        mixed_precision="bf16" if bf16 else "no",
        log_with="tensorboard" if tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(project_dir), logging_dir=str(project_dir / "tensorboard"))
        if project_dir is not None else None,
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps; stepped once per step
        # On CPU, multi-process and DeepSpeed runs need an explicit gloo process group (else the processes run
        # unconnected); a single plain process must get no backend at all.
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if not on_cuda and (
            launched_world > 1 or use_deepspeed) else [],
    )
    if accelerator.num_processes != launched_world:
        raise RuntimeError(f"{launched_world} processes were launched but the accelerator sees "
                           f"{accelerator.num_processes} ({accelerator.distributed_type}): they are not connected")
    return accelerator


def build_model(config: PretrainConfig, model_config) -> torch.nn.Module:
    """fp32 causal LM: random init from the model file, or the init_from folder's weights (loaded with the installed,
    registered classes: no code from the folder runs)."""
    if config.init_from is None:
        return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
    trust = trust_remote_code_for(config.init_from)
    return AutoModelForCausalLM.from_pretrained(config.init_from, config=model_config, dtype=torch.float32,
                                                trust_remote_code=trust)


@torch.no_grad()
def evaluate(model: torch.nn.Module, validation: dict[str, torch.Tensor], micro_batch_size: int,
             accelerator: Accelerator) -> dict[str, float]:
    """Mean LM loss per domain; each rank takes an equal slice of the fixed validation sequences."""
    model.eval()
    world, rank = accelerator.num_processes, accelerator.process_index
    losses = {}
    for domain, sequences in validation.items():
        per_rank = len(sequences) // world
        mine = sequences[rank * per_rank:(rank + 1) * per_rank]
        total = torch.zeros(2, device=accelerator.device)  # (sum of batch losses * rows, rows)
        for start in range(0, per_rank, micro_batch_size):
            batch = mine[start:start + micro_batch_size].to(accelerator.device)
            outputs = model(input_ids=batch, labels=batch)
            lm_loss = getattr(outputs, "lm_loss", None)
            lm_loss = outputs.loss if lm_loss is None else lm_loss
            total += torch.stack([lm_loss.float() * len(batch), torch.tensor(float(len(batch)), device=total.device)])
        total = accelerator.reduce(total, reduction="sum")
        losses[domain] = (total[0] / total[1]).item()
    model.train()
    return losses


def expert_token_counts(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(num_routers, num_experts) count of tokens whose top-1 choice is each expert."""
    return torch.stack([torch.bincount(logits.argmax(dim=-1), minlength=logits.shape[-1])
                        for logits in router_logits]).float()


# ---------------------------------------------------------------------------------------------------- training

def train(config: PretrainConfig, resume: bool = False, allow_changes: Sequence[str] = ()) -> Path:
    """Run (or resume) the pretraining described by ``config``; returns the exported ``final/`` folder.

    Every check that can fail - batch arithmetic for this world size, the resume comparison, the tokenizer, every
    record of the local data files - runs before the model is built.
    """
    output_dir = Path(config.output_dir)
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)
    accelerator = make_accelerator(config.precision, output_dir, config.tensorboard)
    world_size, rank = accelerator.num_processes, accelerator.process_index
    grad_accum = config.grad_accum_steps(world_size)
    accelerator.gradient_accumulation_steps = grad_accum
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The run config is the single source of these values; the DeepSpeed JSON says "auto" for them.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config.update(train_micro_batch_size_per_gpu=config.micro_batch_size, gradient_accumulation_steps=grad_accum,
                         train_batch_size=config.micro_batch_size * grad_accum * world_size,
                         gradient_clipping=config.max_grad_norm or 0.0)

    # ---- resume: compare the checkpoint's settings with these, before anything is built -----------------------
    model_config = config.build_model_config()
    settings = run_settings(config.to_dict(), config.free_on_resume, model_config.to_dict(), world_size)
    start = find_resume_point(output_dir, resume, settings, allow_changes, config.max_steps)
    step, checkpoint = start.step, start.checkpoint

    tokenizer = load_tokenizer(config.data.tokenizer)
    if model_config.vocab_size < len(tokenizer):
        raise ConfigError(f"the model's vocab_size={model_config.vocab_size} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens ({config.data.tokenizer}); allowed: >= {len(tokenizer)}")
    data_checks = check_data(config.data)  # every record of the local data files
    set_seed(config.seed)
    model = build_model(config, model_config)
    num_experts = model.config.num_experts if model.config.model_type == "pnet_llama" else 0
    router_names = model.model.router_names() if num_experts else []
    train_batches = PackedBatchIterator(build_train_stream(config.data, tokenizer, config.seed, rank, world_size),
                                        config.micro_batch_size)
    validation = build_validation_sets(config.data, tokenizer)
    optimizer, scheduler = build_optimizer(model, config, config.max_steps, config.warmup_steps)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))  # model, optimizer, scheduler, RNG states
        apply_optimizer_settings(optimizer, scheduler, config)
        train_batches.load_state_dict(read_json(checkpoint / DATA_STATE_FILE.format(rank=rank)))
        accelerator.print(f"resumed from {checkpoint} at step {step}"
                          + (f" with changed settings {start.changes}" if start.changes else ""))
    log = None
    if accelerator.is_main_process:
        for stale in output_dir.glob("checkpoint-*.tmp"):  # saves a kill interrupted, or never published
            shutil.rmtree(stale)
        log = L.JsonlLog(output_dir / L.LOG_FILE, resume_step=step if resume else None)
        if checkpoint is not None:
            log.write({L.STEP: step, L.EVENT: L.EVENT_RESUME, L.CHECKPOINT: checkpoint.name, L.CHANGES: start.changes})
        bad = {c.source: c.bad for c in data_checks if c.bad}
        if bad:
            log.write({L.STEP: step, L.EVENT: L.EVENT_DATA_CHECK, L.BAD_RECORDS: bad,
                       L.BAD_RECORD_EXAMPLES: [e for c in data_checks for e in c.examples]})
        # The resolved config (overrides applied) beside the run's outputs, with the history of allowed changes.
        write_yaml_atomic(output_dir / CONFIG_FILE, config.to_dict(), header=change_history_header(start.history))
    for check in data_checks:
        if check.bad:
            accelerator.print(f"data source {check.source!r} ({check.split}): skipping {check.bad} of "
                              f"{check.records} records: " + "; ".join(check.examples))
    if config.tensorboard:
        accelerator.init_trackers("pretrain", config={k: v for k, v in flatten(config.to_dict()).items()
                                                      if isinstance(v, (int, float, str, bool))})
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in accelerator.unwrap_model(model).parameters())  # ZeRO-3
    accelerator.print(
        f"model {config.model or config.init_from}: {n_params:,} parameters; world size {world_size} "
        f"({accelerator.distributed_type}); micro batch {config.micro_batch_size} x seq {config.data.seq_len} x "
        f"accum {grad_accum} x {world_size} process(es) = {config.global_batch_tokens:,} tokens/step; "
        f"mixed precision {accelerator.mixed_precision}")

    # ---- training loop ------------------------------------------------------------------------------------------
    saver = CheckpointSaver(accelerator, output_dir, config.keep_last)
    domains = list(config.data.sources)
    model.train()
    expert_counts = torch.zeros(len(router_names), max(num_experts, 1), device=accelerator.device)
    window_start, window_time = step + 1, time.perf_counter()
    window_sums = torch.zeros(4, device=accelerator.device)  # loss terms summed over the steps of the log window
    progress = tqdm(total=config.max_steps, initial=step, desc="pretrain",
                    disable=not accelerator.is_local_main_process)
    while step < config.max_steps:
        step += 1
        sums = torch.zeros(4, device=accelerator.device)  # loss, lm_loss, aux_loss, z_loss (sum over micro-batches)
        crc = 0
        for _ in range(grad_accum):
            batch = train_batches.next_batch()
            crc = zlib.crc32(batch.numpy().tobytes(), crc)
            batch = batch.to(accelerator.device)
            with accelerator.accumulate(model):
                if num_experts:  # PNet: loss = lm_loss + aux/z terms; router logits give the expert load
                    outputs = model(input_ids=batch, labels=batch, output_router_logits=True)
                    parts = [outputs.loss, outputs.lm_loss, outputs.aux_loss, outputs.z_loss]
                    expert_counts += expert_token_counts(outputs.router_logits)
                else:  # dense LLaMA: loss is the LM loss
                    outputs = model(input_ids=batch, labels=batch)
                    parts = [outputs.loss, outputs.loss, torch.zeros_like(outputs.loss), torch.zeros_like(outputs.loss)]
                accelerator.backward(outputs.loss)
            sums += torch.stack([part.detach().float() for part in parts])
        means = accelerator.reduce(sums / grad_accum, reduction="mean")
        # The norm is computed (and logged) even without clipping: max_norm inf scales the gradients by exactly 1.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm or float("inf"))
        finite_norm = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))  # None: DeepSpeed's own
        if not torch.isfinite(means).all() or not finite_norm:
            saver.discard()  # its weights are the ones that just gave this loss / gradient
            raise FloatingPointError(
                f"non-finite loss {means[0].item()} or gradient norm {float(grad_norm or 0)} at step {step}; stopped "
                f"before the update. Last good checkpoint: {saver.last_published() or 'none'} (--resume continues "
                "from it, e.g. with a lower lr: lr=... --allow-change lr)")
        saver.publish()  # the pending checkpoint's weights gave this finite step: it resumes and trains
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_sums += means
        progress.update(1)
        tokens = start.tokens + (step - start.step) * config.global_batch_tokens

        if step % config.log_every == 0 or step == config.max_steps:
            window_steps = step - window_start + 1
            window = (window_sums / window_steps).tolist()  # losses: mean over the steps since the last record
            record = {L.STEP: step, L.TOKENS: tokens, L.LOSS: window[0], L.LM_LOSS: window[1],
                      L.AUX_LOSS: window[2], L.Z_LOSS: window[3], L.LR: lr,
                      L.GRAD_NORM: float(grad_norm) if grad_norm is not None else None,
                      L.TOKENS_PER_S: window_steps * config.global_batch_tokens / (time.perf_counter() - window_time),
                      L.BATCH_CRC32: crc}
            if num_experts:
                counts = accelerator.reduce(expert_counts, reduction="sum")
                record.update({L.EXPERT_LOAD: (counts / counts.sum(-1, keepdim=True)).tolist(),
                               L.ROUTER_NAMES: router_names, L.LOAD_WINDOW: [window_start, step]})
                expert_counts.zero_()
            if config.data.on_bad_record == "skip":
                skipped = torch.tensor([train_batches.skipped_records.get(d, 0) for d in domains],
                                       device=accelerator.device)
                record[L.BAD_RECORDS_SKIPPED] = dict(zip(domains, accelerator.reduce(skipped, "sum").tolist()))
            if log is not None:
                log.write(record)
            accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=step)
            progress.set_postfix(loss=f"{record[L.LOSS]:.3f}", lr=f"{record[L.LR]:.2e}")
            window_start, window_time = step + 1, time.perf_counter()
            window_sums.zero_()

        if step % config.eval_every == 0 or step == config.max_steps:
            val = evaluate(model, validation, config.micro_batch_size, accelerator)
            if not all(torch.isfinite(torch.tensor(list(val.values())))):
                raise FloatingPointError(f"non-finite validation loss {val} at step {step}. Last good checkpoint: "
                                         f"{saver.last_published() or 'none'}")
            if log is not None:
                log.write({L.STEP: step, L.VAL_LOSS: val})
            accelerator.log({f"val_loss/{k}": v for k, v in val.items()}, step=step)
            accelerator.print(f"step {step}: val " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))

        if (config.save_every and step % config.save_every == 0) or step == config.max_steps:
            saver.save(step, trainer_state={"step": step, "tokens": tokens, "config_changes": start.history},
                       run_settings=settings,
                       rank_files={DATA_STATE_FILE.format(rank=rank): train_batches.state_dict()})
    progress.close()
    saver.publish()  # the last step's weights: their validation loss (evaluated at max_steps) was finite

    # ---- export -----------------------------------------------------------------------------------------------
    final_dir = output_dir / "final"
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 / FSDP shards; every rank must call it
    if accelerator.is_main_process:
        # Written beside, then renamed: a kill during the export never leaves a half-written `final/`.
        final_tmp = output_dir / "final.tmp"
        if final_tmp.exists():
            shutil.rmtree(final_tmp)
        unwrapped = accelerator.unwrap_model(model)
        prepare_tokenizer_for_model(tokenizer, unwrapped.config)  # pad token, model_max_length (sets pad_token_id)
        unwrapped.save_pretrained(final_tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(final_tmp)
        shutil.copyfile(output_dir / CONFIG_FILE, final_tmp / CONFIG_FILE)  # for model cards
        publish_dir(final_tmp, final_dir)
        plot_training(output_dir / L.LOG_FILE, output_dir / "training.png", router_loss_coefficients={
            L.AUX_LOSS: getattr(unwrapped.config, "router_aux_loss_coef", 0),
            L.Z_LOSS: getattr(unwrapped.config, "router_z_loss_coef", 0)})
        accelerator.print(f"exported {final_dir}; plot {output_dir / 'training.png'}")
    accelerator.end_training()
    return final_dir


# ---------------------------------------------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    parser = config_argument_parser("pretrain.py", __doc__.split("\n\n")[0], PretrainConfig)
    parser.add_argument("--config", required=True, help="configs/pretrain/<name>.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                        help="with --resume: accept a changed setting (dotted key or section, e.g. lr, data, "
                             "model_config.router_aux_loss_coef); repeat for several")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    return parser


def main(argv: list[str] | None = None) -> Path:
    args = build_parser().parse_intermixed_args(argv)
    if args.allow_change and not args.resume:
        raise ConfigError("--allow-change only applies with --resume")
    config = load_config(PretrainConfig, args.config, args.overrides)
    return train(config, resume=args.resume, allow_changes=args.allow_change)


def cli(argv: list[str] | None = None) -> None:
    """``main`` for the command line: a bad setting or record ends with its message, not a traceback."""
    try:
        main(argv)
    except (ConfigError, ResumeError, DataRecordError, FileExistsError, FileNotFoundError) as error:
        sys.exit(f"pretrain: error: {error}")


if __name__ == "__main__":
    cli()
