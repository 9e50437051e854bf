"""Pretrain a dense LLaMA or a PNet-LLaMA on a streamed text mix (ParameterNet, Table 7 recipe).

    accelerate launch [--config_file configs/accelerate/<setup>.yaml] scripts/pretrain.py \
        --config configs/pretrain/<name>.yaml [key=value ...] [--resume]

One config file holds every hyper-parameter (``pnet.train_utils.PretrainConfig``; unknown keys are errors);
``key=value`` overrides use dotted keys and YAML values (``max_steps=50 data.sources.web.weight=0.5``).
The model file named by ``model`` decides the architecture (``model_type`` "llama" or "pnet_llama").

Per optimizer step: ``grad_accum`` micro-batches of ``micro_batch_size`` packed sequences per process, so
``global_batch_tokens = micro_batch_size * seq_len * grad_accum * world_size``. AdamW, linear warmup, cosine
to ``lr * min_lr_ratio``, gradient clipping. The PNet model adds its router losses into ``loss``; the loop
logs ``lm_loss``, ``aux_loss`` and ``z_loss`` separately. Outputs in ``output_dir``: ``log.jsonl``,
tensorboard events, ``checkpoint-N`` folders (``accelerator.save_state`` + per-rank data position, written
to ``checkpoint-N.tmp`` and renamed), ``final/`` (``save_pretrained`` + tokenizer) and ``training.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
import zlib
from pathlib import Path

import torch
from accelerate import Accelerator, InitProcessGroupKwargs
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, get_cosine_with_min_lr_schedule_with_warmup

import modeling_pnet_llama  # noqa: F401  (registers pnet_llama with the Auto classes)
from pnet.data import PackedBatchIterator, build_train_stream, build_validation_sets, load_tokenizer
from pnet.train_utils import (
    JsonlLog,
    PretrainConfig,
    checkpoint_tmp_dir,
    expert_token_counts,
    finish_checkpoint,
    list_checkpoints,
    load_config,
    plot_training,
    publish_dir,
    write_json_atomic,
    write_yaml_atomic,
)


def build_model(config: PretrainConfig) -> torch.nn.Module:
    """Randomly initialised causal LM from the model file (+ ``model_overrides``), fp32 weights."""
    with open(config.model, encoding="utf-8") as f:
        model_dict = json.load(f)
    if model_dict.get("model_type") not in ("llama", "pnet_llama"):
        raise ValueError(f"{config.model}: model_type must be 'llama' or 'pnet_llama', got "
                         f"{model_dict.get('model_type')!r}")
    model_dict.update(config.model_overrides)
    model_config = AutoConfig.for_model(**model_dict)
    return AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)


def adamw_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear, embedding, expert, router weights), none on norms and biases."""
    # Under ZeRO-3 init parameters are already partitioned (flat placeholders); ds_shape is the real shape.
    def is_matrix(p: torch.nn.Parameter) -> bool:
        return len(getattr(p, "ds_shape", p.shape)) >= 2

    decay = [p for p in model.parameters() if p.requires_grad and is_matrix(p)]
    no_decay = [p for p in model.parameters() if p.requires_grad and not is_matrix(p)]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/pretrain/<name>.yaml")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in output_dir")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    args = parser.parse_args(argv)

    # ---- config and accelerator (all checks happen before any training) ------------------------------------
    config = load_config(args.config, args.overrides)
    output_dir = Path(config.output_dir)
    on_cuda = torch.cuda.is_available()
    use_deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    launched_distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1 or use_deepspeed
    bf16 = config.precision == "bf16" or (config.precision == "auto" and on_cuda)
    accelerator = Accelerator(
        # cpu=True makes torchrun-launched CPU processes MULTI_CPU (DDP); it would switch DeepSpeed off.
        cpu=not on_cuda and not use_deepspeed,
        mixed_precision="bf16" if bf16 else "no",
        log_with="tensorboard" if config.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "tensorboard")),
        step_scheduler_with_optimizer=False,  # the schedule counts optimizer steps; stepped once per step below
        # On CPU, multi-process and DeepSpeed runs need an explicit gloo process group (else the processes run
        # unconnected); a single plain process must get no backend at all.
        kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")] if not on_cuda and launched_distributed else [],
    )
    world_size, rank = accelerator.num_processes, accelerator.process_index
    grad_accum = config.grad_accum_steps(world_size)
    accelerator.gradient_accumulation_steps = grad_accum
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # The run config is the single source of these values; the DeepSpeed JSON says "auto" for them.
        ds_config = accelerator.state.deepspeed_plugin.deepspeed_config
        ds_config.update(train_micro_batch_size_per_gpu=config.micro_batch_size, gradient_accumulation_steps=grad_accum,
                         train_batch_size=config.micro_batch_size * grad_accum * world_size,
                         gradient_clipping=config.max_grad_norm)
    checkpoints = list_checkpoints(output_dir)
    if checkpoints and not args.resume:
        raise FileExistsError(f"{output_dir} already has {checkpoints[-1][1].name}; pass --resume to continue it "
                              "or choose another output_dir")
    if args.resume and not checkpoints:
        raise FileNotFoundError(f"--resume: no checkpoint-N folder in {output_dir}")

    tokenizer = load_tokenizer(config.data.tokenizer)
    set_seed(config.seed)
    model = build_model(config)
    if model.config.vocab_size < len(tokenizer):
        raise ValueError(f"model vocab_size {model.config.vocab_size} < tokenizer size {len(tokenizer)}")
    num_experts = model.config.num_experts if model.config.model_type == "pnet_llama" else 0
    router_names = model.model.router_names() if num_experts else []
    train_batches = PackedBatchIterator(build_train_stream(config.data, tokenizer, config.seed, rank, world_size),
                                        config.micro_batch_size)
    validation = build_validation_sets(config.data, tokenizer)

    optimizer = torch.optim.AdamW(adamw_param_groups(model, config.weight_decay), lr=config.lr,
                                  betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps)
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=config.warmup_steps,
                                                            num_training_steps=config.max_steps,
                                                            min_lr_rate=config.min_lr_ratio)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)

    # ---- resume -----------------------------------------------------------------------------------------------
    step = 0
    if args.resume:
        step, checkpoint = checkpoints[-1]
        accelerator.load_state(str(checkpoint))  # model, optimizer, scheduler, RNG states
        data_state = checkpoint / f"data_state_rank{rank}.json"
        if not data_state.is_file():
            raise FileNotFoundError(f"{data_state} missing: resume with the world size the checkpoint was saved with")
        with open(data_state, encoding="utf-8") as f:
            train_batches.load_state_dict(json.load(f))
        accelerator.print(f"resumed from {checkpoint} at step {step}")
    log = JsonlLog(output_dir / "log.jsonl", resume_step=step if args.resume else None) if accelerator.is_main_process else None
    if accelerator.is_main_process:  # the resolved config (overrides applied) beside the run's outputs
        write_yaml_atomic(output_dir / "pretrain_config.yaml", config.to_dict())
    if config.tensorboard:
        accelerator.init_trackers("pretrain", config={k: v for k, v in config.to_dict().items()
                                                      if isinstance(v, (int, float, str, bool))})
    n_params = sum(getattr(p, "ds_numel", p.numel()) for p in accelerator.unwrap_model(model).parameters())  # ZeRO-3: full size
    accelerator.print(f"model {config.model}: {n_params:,} parameters; {world_size} process(es), micro batch "
                      f"{config.micro_batch_size} x seq {config.data.seq_len} x accum {grad_accum} = "
                      f"{config.global_batch_tokens:,} tokens/step; bf16={bf16}; {accelerator.distributed_type}")

    # ---- training loop ------------------------------------------------------------------------------------------
    model.train()
    expert_counts = torch.zeros(len(router_names), max(num_experts, 1), device=accelerator.device)
    window_start, window_time = step + 1, time.perf_counter()
    window_sums = torch.zeros(4, device=accelerator.device)  # loss terms summed over the steps of the log window
    progress = tqdm(total=config.max_steps, initial=step, desc="pretrain", disable=not accelerator.is_local_main_process)
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
        if not torch.isfinite(means).all():
            last = list_checkpoints(output_dir)
            raise FloatingPointError(
                f"non-finite loss {means[0].item()} at step {step}; stopping without saving "
                f"(last good checkpoint: {last[-1][1] if last else 'none'})")
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        lr = scheduler.get_last_lr()[0]  # the rate this step's update uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        window_sums += means
        progress.update(1)

        if step % config.log_every == 0 or step == config.max_steps:
            window_steps = step - window_start + 1
            window = (window_sums / window_steps).tolist()  # losses: mean over the steps since the last record
            record = {"step": step, "tokens": step * config.global_batch_tokens,
                      "loss": window[0], "lm_loss": window[1], "aux_loss": window[2], "z_loss": window[3],
                      "lr": lr, "grad_norm": float(grad_norm) if grad_norm is not None else None,
                      "tokens_per_s": window_steps * config.global_batch_tokens / (time.perf_counter() - window_time),
                      "batch_crc32": crc}
            if num_experts:
                counts = accelerator.reduce(expert_counts, reduction="sum")
                record.update(expert_load=(counts / counts.sum(-1, keepdim=True)).tolist(),
                              router_names=router_names, load_window=[window_start, step])
                expert_counts.zero_()
            if accelerator.is_main_process:
                log.write(record)
            accelerator.log({k: v for k, v in record.items() if isinstance(v, float)}, step=step)
            progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}")
            window_start, window_time = step + 1, time.perf_counter()
            window_sums.zero_()

        if step % config.eval_every == 0 or step == config.max_steps:
            val = evaluate(model, validation, config.micro_batch_size, accelerator)
            if accelerator.is_main_process:
                log.write({"step": step, "val_loss": val})
            accelerator.log({f"val_loss/{k}": v for k, v in val.items()}, step=step)
            accelerator.print(f"step {step}: val " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))

        if (config.save_every and step % config.save_every == 0) or step == config.max_steps:
            tmp = checkpoint_tmp_dir(output_dir, step)
            if accelerator.is_main_process and tmp.exists():
                shutil.rmtree(tmp)  # left by a save that was killed
            accelerator.wait_for_everyone()
            accelerator.save_state(str(tmp))
            write_json_atomic(tmp / f"data_state_rank{rank}.json", train_batches.state_dict())
            if accelerator.is_main_process:
                write_json_atomic(tmp / "trainer_state.json", {"step": step, "tokens": step * config.global_batch_tokens})
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                finish_checkpoint(output_dir, step, config.keep_last)
            accelerator.wait_for_everyone()
    progress.close()

    # ---- export -----------------------------------------------------------------------------------------------
    final_dir = output_dir / "final"
    state_dict = accelerator.get_state_dict(model)  # gathers ZeRO-3 shards; every rank must call it
    if accelerator.is_main_process:
        # Written beside, then renamed: a kill during the export never leaves a half-written `final/`.
        final_tmp = output_dir / "final.tmp"
        if final_tmp.exists():
            shutil.rmtree(final_tmp)
        accelerator.unwrap_model(model).save_pretrained(final_tmp, state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(final_tmp)
        shutil.copyfile(output_dir / "pretrain_config.yaml", final_tmp / "pretrain_config.yaml")  # for model cards
        publish_dir(final_tmp, final_dir)
        plot_training(output_dir / "log.jsonl", output_dir / "training.png")
        accelerator.print(f"exported {final_dir}; plot {output_dir / 'training.png'}")
    accelerator.end_training()


if __name__ == "__main__":
    main()
