"""The one training loop of every command: pretraining, image classification and SST-2 fine-tuning.

`run(task, config, resume, allow_changes)` owns the machinery: the accelerator (1 process, DDP, DeepSpeed ZeRO,
FSDP on GPUs), AdamW with its warmup + decay schedule, gradient accumulation, clipping, the non-finite guard,
checkpoints and resume (`pnet.checkpoint`), log windows (`pnet.run_log`), the evaluation cadence and the final
export. A `Task` supplies what differs: the model, the batches, the loss terms, the evaluation and the export extras.

A run, in order (every check that can fail runs before the model is built):

1. the accelerator and the output folder, locked for this run (`pnet.run_lock`: a second run refuses at once);
2. ``task.plan``: step counts and the model config, checked against this world size;
3. the resume point (`pnet.checkpoint.find_resume_point`): changed settings are refused unless allowed;
4. ``task.check_data``: every record of the local data files;
5. the model (``task.build_model``), the optimizer and schedule, ``task.prepare`` (data pipelines, EMA), the
   checkpoint's state;
6. the loop: per step the micro-batches of ``task.step_batches``, ``task.loss``, backward, the clipped norm, the
   divergence guard (a non-finite loss or gradient norm, or a loss spike), the update; log windows, evaluations (``task.evaluate``) and checkpoints at their cadence;
7. the export of ``final/`` (``task.save_final``), written beside and renamed.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import statistics
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import get_scheduler

from pnet import run_log as L
from pnet.checkpoint import (
    CheckpointSaver,
    ResumeError,
    ResumePoint,
    change_history_header,
    find_resume_point,
    flatten,
    publish_dir,
    run_settings,
    write_yaml_atomic,
)
from pnet.config import CheckpointedTrainingConfig, ConfigError, TrainingConfig
from pnet.data import DataExhaustedError, DataRecordError
from pnet.model_loading import CheckpointKeysError
from pnet.plots import plot_training
from pnet.run_lock import OutputLockedError, OutputNotWritableError, exclusive_output

FINAL_DIR = "final"
SPIKE_MIN_HISTORY = 1  # steps of loss history before the spike guard judges a step (a 10x rise is never healthy)
FSDP_NEEDS_GPUS = (
    "FSDP needs GPUs (or another accelerator): accelerate enables FSDP only for accelerator process groups, never for "
    "CPU processes, so on CPU the processes would train unconnected. On CPU use DDP "
    "(configs/accelerate/cpu-2proc.yaml) or DeepSpeed ZeRO (configs/accelerate/deepspeed-zero{2,3}.yaml).")


# ------------------------------------------------------------------------------------------------ the task contract

@dataclass
class Plan:
    """What a task decides before anything is built (`Task.plan`)."""

    model_config: Any  # the transformers config of the model to build (compared on resume)
    max_steps: int
    warmup_steps: int
    micro_batch_size: int
    grad_accum: int = 1  # micro-batches per optimizer step and process
    tokens_per_step: int | None = None  # all processes; set: the log counts tokens and tokens/s
    eval_every: int | None = None  # None: the config's eval_every
    save_every: int | None = None  # None: the config's save_every


class Task:
    """What a training command supplies to `run`. Subclasses override what their model and data need."""

    name = "train"  # progress bar and tensorboard project
    config_file = "train_config.yaml"  # the resolved config, beside the outputs and in final/
    output_dir: Path

    def plan(self, accelerator: Accelerator) -> Plan:
        raise NotImplementedError

    def check_data(self) -> list:
        """Check the data before the model is built; returns `pnet.data.DataCheck`-like results (``source``,
        ``split``, ``records``, ``bad``, ``examples``), logged as a ``data_check`` event when any is bad."""
        return []

    def check_resume(self, changes: dict[str, list]) -> None:
        """Refuse (`ResumeError`) an allowed change of settings ({key: [checkpoint's, now]}) that this task cannot
        resume with; called before anything is built."""

    def data_files(self) -> list[str]:
        """The local data files the run reads: their content hashes join the run settings, so a file that changed
        between a checkpoint and ``--resume`` is reported."""
        return []

    def build_model(self, model_config) -> torch.nn.Module:
        raise NotImplementedError

    def prepare(self, accelerator: Accelerator, model: torch.nn.Module) -> None:
        """Data pipelines and other state, after the model is prepared and before a checkpoint is loaded."""

    def rank_state(self) -> dict[str, Any]:
        """This process's files in a checkpoint ({file name: JSON value}), e.g. its data position."""
        return {}

    def load_rank_state(self, checkpoint: Path) -> None:
        """Restore what `rank_state` saved."""

    def step_batches(self, start_step: int) -> Iterator[list]:
        """The micro-batches of each optimizer step from ``start_step`` on, one list per step."""
        raise NotImplementedError

    def loss(self, model: torch.nn.Module, batch) -> dict[str, torch.Tensor]:
        """{log field: scalar} of one micro-batch; the first one is back-propagated, all are logged."""
        raise NotImplementedError

    def after_update(self, model: torch.nn.Module) -> None:
        """After each optimizer step (e.g. an EMA of the weights)."""

    def window_fields(self, step: int, window_start: int) -> dict[str, Any]:
        """Extra fields of the training log record of steps ``window_start..step`` (every process calls it)."""
        return {}

    def evaluate(self, model: torch.nn.Module, final: bool) -> dict[str, Any]:
        """Fields of an evaluation log record (every process calls it; every float must be finite)."""
        raise NotImplementedError

    def save_final(self, model: torch.nn.Module, state_dict: dict, folder: Path) -> None:
        """Write the exported model (and its tokenizer / processor) into ``folder`` (main process)."""
        model.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)


@dataclass
class Outcome:
    """What `run` hands back to the task's command."""

    steps: int
    final_eval: dict[str, Any]
    final_dir: Path | None
    train_time_s: float
    accelerator: Accelerator
    model: torch.nn.Module  # unwrapped


# ------------------------------------------------------------------------------------------------ building blocks

def make_accelerator(precision: str, project_dir: Path | None = None, tensorboard: bool = False,
                     cpu: bool = False) -> Accelerator:
    """One accelerator setup for every launch: 1 CPU/GPU process, torchrun DDP (gloo on CPU), DeepSpeed, FSDP (GPU).
    ``cpu``: stay on the CPU even where CUDA is available."""
    on_cuda = torch.cuda.is_available() and not cpu
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


def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear, embedding, expert, router weights), none on norms and biases."""
    # Under ZeRO-3 init parameters are already partitioned (flat placeholders); ds_shape is the real shape.
    def is_matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and is_matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not is_matrix(p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, config: TrainingConfig, total_steps: int, warmup_steps: int):
    """AdamW (decay on matrices only) and the warmup + cosine / linear schedule of ``config``."""
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


def configure_deepspeed(accelerator: Accelerator, plan: Plan, max_grad_norm: float | None) -> None:
    """The run config is the single source of these values; the DeepSpeed JSON says "auto" for them."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return
    ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
    ds_config.update(train_micro_batch_size_per_gpu=plan.micro_batch_size, gradient_accumulation_steps=plan.grad_accum,
                     train_batch_size=plan.micro_batch_size * plan.grad_accum * accelerator.num_processes,
                     gradient_clipping=max_grad_norm or 0.0)


@torch.no_grad()
def classifier_metrics(model: torch.nn.Module, dataloader, accelerator: Accelerator) -> dict[str, float | int]:
    """Mean cross-entropy and top-1 accuracy of a classifier over a dataloader of {inputs..., labels} (gathered
    across processes); the model is left in eval mode."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for batch in dataloader:
        labels = batch["labels"]
        logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum")
        predictions, labels = accelerator.gather_for_metrics((logits.argmax(-1), labels))
        total_loss += accelerator.reduce(loss, reduction="sum").item()
        correct += (predictions == labels).sum().item()
        count += labels.numel()
    return {"loss": total_loss / max(count, 1), "accuracy": correct / max(count, 1), "samples": count}


def _is_finite(record: dict[str, Any]) -> bool:
    return all(math.isfinite(v) for v in flatten(record).values() if isinstance(v, float))


# --------------------------------------------------------------------------------------------------------- the run

class _Run:
    """The state of one `run`: built by its setup steps, then trained and exported."""

    def __init__(self, task: Task, config: CheckpointedTrainingConfig, accelerator: Accelerator, plan: Plan,
                 start: ResumePoint, settings: dict[str, Any]):
        self.task, self.config, self.accelerator, self.plan = task, config, accelerator, plan
        self.start, self.settings = start, settings
        self.output_dir = task.output_dir
        self.eval_every = plan.eval_every or config.eval_every
        self.save_every = config.save_every if plan.save_every is None else plan.save_every
        self.log: L.JsonlLog | None = None
        self.saver = CheckpointSaver(accelerator, self.output_dir, config.keep_last)
        # The spike guard's history, saved in each checkpoint: a resumed run judges its steps as the first run would.
        self.recent_losses = deque(start.recent_losses, maxlen=config.loss_spike_window)

    # ---- setup -----------------------------------------------------------------------------------------------
    def build(self, data_checks: list) -> None:
        task, config, accelerator, plan = self.task, self.config, self.accelerator, self.plan
        set_seed(config.seed)
        model = task.build_model(plan.model_config)
        optimizer, scheduler = build_optimizer(model, config, plan.max_steps, plan.warmup_steps)
        self.model, self.optimizer, self.scheduler = accelerator.prepare(model, optimizer, scheduler)
        task.prepare(accelerator, self.model)
        checkpoint = self.start.checkpoint
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint))  # model, optimizer, scheduler, RNG states, registered objects
            apply_optimizer_settings(self.optimizer, self.scheduler, config)
            task.load_rank_state(checkpoint)
            accelerator.print(f"resumed from {checkpoint} at step {self.start.step}"
                              + (f" with changed settings {self.start.changes}" if self.start.changes else ""))
        self._open_log(data_checks)
        if getattr(config, "tensorboard", False):
            accelerator.init_trackers(task.name, config={k: v for k, v in flatten(config.to_dict()).items()
                                                         if isinstance(v, (int, float, str, bool))})
        n_params = sum(getattr(p, "ds_numel", p.numel())  # ZeRO-3: the real size of partitioned parameters
                       for p in accelerator.unwrap_model(self.model).parameters())
        accelerator.print(
            f"{task.name}: {n_params:,} parameters; {plan.max_steps} steps; world size {accelerator.num_processes} "
            f"({accelerator.distributed_type}); micro batch {plan.micro_batch_size} x accum {plan.grad_accum} x "
            f"{accelerator.num_processes} process(es)"
            + (f" = {plan.tokens_per_step:,} tokens/step" if plan.tokens_per_step else "")
            + f"; mixed precision {accelerator.mixed_precision}")

    def _open_log(self, data_checks: list) -> None:
        start, accelerator = self.start, self.accelerator
        if accelerator.is_main_process:
            for stale in self.output_dir.glob("checkpoint-*.tmp"):  # saves a kill interrupted, or never published
                shutil.rmtree(stale)
            # A fresh run starts a new log; a resumed one drops the records written after its checkpoint.
            self.log = L.JsonlLog(self.output_dir / L.LOG_FILE,
                                  resume_step=start.step if start.checkpoint is not None else None)
            if start.checkpoint is not None:
                self.log.write({L.STEP: start.step, L.EVENT: L.EVENT_RESUME, L.CHECKPOINT: start.checkpoint.name,
                                L.CHANGES: start.changes})
            bad: dict[str, dict[str, int]] = {}  # per source and split: a validation count must not hide a train one
            for check in data_checks:
                if check.bad:
                    bad.setdefault(check.source, {})[check.split] = check.bad
            if bad:
                self.log.write({L.STEP: start.step, L.EVENT: L.EVENT_DATA_CHECK, L.BAD_RECORDS: bad,
                                L.BAD_RECORD_EXAMPLES: [e for c in data_checks for e in c.examples]})
            # The resolved config (overrides applied) beside the run's outputs, with the history of allowed changes.
            write_yaml_atomic(self.output_dir / self.task.config_file, self.config.to_dict(),
                              header=change_history_header(start.history))
        for check in data_checks:
            if check.bad:
                accelerator.print(f"data source {check.source!r} ({check.split}): skipping {check.bad} of "
                                  f"{check.records} records: " + "; ".join(check.examples))

    def write(self, record: dict[str, Any]) -> None:
        if self.log is not None:
            self.log.write(record)

    # ---- one step ------------------------------------------------------------------------------------------------
    def train_step(self, step: int, micro_batches: list) -> tuple[torch.Tensor, Any, float]:
        """Forward and backward over the step's micro-batches, clip, guard, update. Returns the mean loss terms
        (reduced over processes), the gradient norm and the learning rate the update used."""
        accelerator, model = self.accelerator, self.model
        sums = None
        for batch in micro_batches:
            with accelerator.accumulate(model):
                terms = self.task.loss(model, batch)
                accelerator.backward(next(iter(terms.values())))
            values = torch.stack([term.detach().float() for term in terms.values()])
            sums = values if sums is None else sums + values
        self.term_names = list(terms)
        means = accelerator.reduce(sums / len(micro_batches), reduction="mean")
        # The norm is computed (and logged) even without clipping: max_norm inf scales the gradients by exactly 1.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), self.config.max_grad_norm or float("inf"))
        divergence = self.divergence(step, means, grad_norm)
        if divergence:
            self.saver.discard()  # its weights are the ones that just gave this loss / gradient
            last_good = self.saver.last_published()
            advice = (f"Last good checkpoint: {last_good} (--resume continues from it, e.g. with a lower lr: lr=... "
                      "--allow-change lr)" if last_good else
                      "No checkpoint was published: start again, e.g. with a lower lr or warmup, or a save_every that "
                      "keeps one")
            raise FloatingPointError(f"{divergence}; stopped before the update. {advice}")
        self.saver.publish()  # the pending checkpoint's weights gave this finite step: it resumes and trains
        lr = self.scheduler.get_last_lr()[0]  # the rate this step's update uses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.task.after_update(accelerator.unwrap_model(model))
        return means, grad_norm, lr

    def divergence(self, step: int, means: torch.Tensor, grad_norm) -> str | None:
        """Why this step must not update the weights, or None: a non-finite loss or gradient norm, or a loss above
        ``loss_spike_factor`` times the median of the recent steps' losses (a finite blow-up, e.g. 10.4 -> 1077)."""
        finite_norm = grad_norm is None or bool(torch.isfinite(torch.as_tensor(grad_norm)))  # None: DeepSpeed's own
        loss = means[0].item()
        if not torch.isfinite(means).all() or not finite_norm:
            return f"non-finite loss {loss} or gradient norm {float(grad_norm or 0)} at step {step}"
        factor, history = self.config.loss_spike_factor, self.recent_losses
        if factor is not None and len(history) >= SPIKE_MIN_HISTORY and loss > factor * statistics.median(history):
            return (f"loss spike at step {step}: loss {loss:.4g} is above loss_spike_factor={factor} times "
                    f"{statistics.median(history):.4g}, the median loss of the last {len(history)} steps (the run "
                    "diverges; loss_spike_factor=null turns this guard off)")
        history.append(loss)
        return None

    def tokens(self, step: int) -> int | None:
        if not self.plan.tokens_per_step:
            return None
        return self.start.tokens + (step - self.start.step) * self.plan.tokens_per_step

    def window_record(self, step: int, window_start: int, window_sums: torch.Tensor, window_time: float,
                      grad_norm, lr: float) -> dict[str, Any]:
        window_steps = step - window_start + 1
        window = (window_sums / window_steps).tolist()  # losses: mean over the steps since the last record
        record = {L.STEP: step, **dict(zip(self.term_names, window)), L.LR: lr,
                  L.GRAD_NORM: float(grad_norm) if grad_norm is not None else None,
                  L.ELAPSED_S: round(time.perf_counter() - self.start_time, 2)}
        if self.plan.tokens_per_step:
            record[L.TOKENS] = self.tokens(step)
            record[L.TOKENS_PER_S] = window_steps * self.plan.tokens_per_step / (time.perf_counter() - window_time)
        record.update(self.task.window_fields(step, window_start))
        return record

    def evaluate(self, step: int, final: bool) -> dict[str, Any]:
        metrics = self.task.evaluate(self.model, final)
        self.model.train()
        if not _is_finite(metrics):
            raise FloatingPointError(f"non-finite evaluation {metrics} at step {step}. Last good checkpoint: "
                                     f"{self.saver.last_published() or 'none'}")
        self.write({L.STEP: step, **metrics})
        self.accelerator.log({k.replace(".", "/"): v for k, v in flatten(metrics).items() if isinstance(v, float)},
                             step=step)
        self.accelerator.print(f"step {step}: " + ", ".join(
            f"{k} {v:.4f}" for k, v in flatten(metrics).items() if isinstance(v, float)))
        return metrics

    # ---- the loop ----------------------------------------------------------------------------------------------
    def train(self) -> dict[str, Any]:
        """Train from the resume point to max_steps; returns the last evaluation."""
        config, plan, accelerator = self.config, self.plan, self.accelerator
        step = self.start.step
        self.start_time = window_time = time.perf_counter()
        window_start, window_sums, metrics = step + 1, None, {}
        self.model.train()
        progress = tqdm(total=plan.max_steps, initial=step, desc=self.task.name,
                        disable=not accelerator.is_local_main_process)
        batches = self.task.step_batches(step)
        while step < plan.max_steps:
            step += 1
            means, grad_norm, lr = self.train_step(step, next(batches))
            window_sums = means if window_sums is None else window_sums + means
            progress.update(1)
            last = step == plan.max_steps
            if step % config.log_every == 0 or last:
                record = self.window_record(step, window_start, window_sums, window_time, grad_norm, lr)
                self.write(record)
                accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=step)
                progress.set_postfix(loss=f"{record[L.LOSS]:.4f}", lr=f"{lr:.2e}")
                window_start, window_time, window_sums = step + 1, time.perf_counter(), None
            if step % self.eval_every == 0 or last:
                metrics = self.evaluate(step, final=last)
            if (self.save_every and step % self.save_every == 0) or last:
                trainer_state = {"step": step, "max_steps": plan.max_steps, "config_changes": self.start.history,
                                 "recent_losses": list(self.recent_losses)}
                if plan.tokens_per_step:
                    trainer_state["tokens"] = self.tokens(step)
                self.saver.save(step, trainer_state=trainer_state,
                                run_settings=self.settings, rank_files=self.task.rank_state())
        progress.close()
        if not metrics:  # resumed from the last step's checkpoint: its evaluation is logged already
            metrics = self.task.evaluate(self.model, final=True)
            self.model.train()
        self.saver.publish()  # the last step's weights: their evaluation (at max_steps) was finite
        return metrics

    def export(self) -> Path:
        """``final/``: the task's export plus the resolved config, written beside and renamed (a kill never leaves
        a half-written ``final/``)."""
        accelerator = self.accelerator
        final_dir = self.output_dir / FINAL_DIR
        state_dict = accelerator.get_state_dict(self.model)  # gathers ZeRO-3 / FSDP shards; every rank must call it
        if accelerator.is_main_process:
            final_tmp = self.output_dir / f"{FINAL_DIR}.tmp"
            if final_tmp.exists():
                shutil.rmtree(final_tmp)
            self.task.save_final(accelerator.unwrap_model(self.model), state_dict, final_tmp)
            shutil.copyfile(self.output_dir / self.task.config_file, final_tmp / self.task.config_file)
            publish_dir(final_tmp, final_dir)
        accelerator.wait_for_everyone()
        return final_dir


def run(task: Task, config: CheckpointedTrainingConfig, resume: bool = False, allow_changes: Sequence[str] = (),
        export: bool = True, cpu: bool = False) -> Outcome:
    """Train (or resume) ``task`` with the shared settings of ``config``; see the module docstring for the order."""
    if config.cpu_threads:
        torch.set_num_threads(config.cpu_threads)  # a shared CPU is faster with fewer, uncontended threads
    accelerator = make_accelerator(config.precision, task.output_dir, getattr(config, "tensorboard", False), cpu=cpu)
    # The main process holds the output folder for the whole run (the other processes write there under it).
    lock = exclusive_output(task.output_dir) if accelerator.is_main_process else contextlib.nullcontext()
    with lock:
        return _locked_run(task, config, accelerator, resume, allow_changes, export)


def _locked_run(task: Task, config: CheckpointedTrainingConfig, accelerator: Accelerator, resume: bool,
                allow_changes: Sequence[str], export: bool) -> Outcome:
    output_dir = task.output_dir
    plan = task.plan(accelerator)
    accelerator.gradient_accumulation_steps = plan.grad_accum
    configure_deepspeed(accelerator, plan, config.max_grad_norm)

    settings = run_settings(config.to_dict(), config.free_on_resume, plan.model_config.to_dict(),
                            accelerator.num_processes, task.data_files())
    start = find_resume_point(output_dir, resume, settings, allow_changes, plan.max_steps)
    task.check_resume(start.changes)
    data_checks = task.check_data()

    state = _Run(task, config, accelerator, plan, start, settings)
    state.build(data_checks)
    final_eval = state.train()
    final_dir = state.export() if export else None
    if accelerator.is_main_process:
        model_config = accelerator.unwrap_model(state.model).config
        plot_training(output_dir / L.LOG_FILE, output_dir / "training.png", title=output_dir.name,
                      router_loss_coefficients={L.AUX_LOSS: getattr(model_config, "router_aux_loss_coef", 0),
                                                L.Z_LOSS: getattr(model_config, "router_z_loss_coef", 0)})
    accelerator.end_training()
    return Outcome(steps=plan.max_steps, final_eval=final_eval, final_dir=final_dir,
                   train_time_s=round(time.perf_counter() - state.start_time, 1), accelerator=accelerator,
                   model=accelerator.unwrap_model(state.model))


# ------------------------------------------------------------------------------------------------ command lines

# What a user fixes by changing a setting, a file, a flag or the learning rate: a command ends with the message alone.
USER_ERRORS = (ConfigError, ResumeError, DataRecordError, DataExhaustedError, CheckpointKeysError, FileExistsError,
               FileNotFoundError, OutputLockedError, OutputNotWritableError, FloatingPointError)


def run_command(prog: str, main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> None:
    """``main(argv)`` for a command line: a user error prints ``prog: error: <message>`` once (under ``accelerate
    launch`` from the first process only: every process stops alike) and exits with status 1, without a traceback.
    (``accelerate launch`` then adds its own report of the failed command unless given ``-q``; torchrun, with several
    processes, adds its summary of the failed ranks.)"""
    try:
        main(argv)
    except USER_ERRORS as error:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(1)
