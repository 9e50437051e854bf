"""A real dense LLaMA against its ParameterNet upcycling under continued pretraining (SmolLM2-135M by default).

    python scripts/upcycle_smollm2.py --config configs/replicate/upcycle-smollm2.yaml [key=value ...] [--dry-run]

Stages; each is skipped when its output exists, so re-running the command continues a killed run:

1. ``upcycle``: `pnet.upcycle.upcycle` turns the dense folder into ``<output_root>/upcycled`` (written beside, then
   renamed; it computes the dense function at step 0 and the call checks that on a probe batch).
2. ``before``: held-out perplexity (the first ``evaluation.heldout_docs`` documents of the held-out file, Botchan by
   default) and zero-shot scores (``evaluation.zero_shot_limit`` documents per task) of the dense and the upcycled
   model.
3. ``train``: for every seed, both arms are continued by `pnet.pretrain.train` with a typed `PretrainConfig`: the
   base run config plus ``pretrain_overrides``, ``init_from`` the arm's folder and ``data.tokenizer`` the dense
   model's own tokenizer. Everything else is the same for both arms (data, order, seed, steps, batch), so they see
   the same tokens, and a top-1 router keeps the active FLOPs per token equal to the dense model's plus the router
   (the report gives both counts). A run with checkpoints resumes from the latest one.
4. ``after``: the same evaluations of every run's ``final/``.
5. ``report``: ``<report>.md`` with ``.json`` and ``.png`` beside it: loss curves, before/after table, tokens/s,
   peak memory (RSS) and load averages.

Each training and evaluation stage runs in a fresh (spawned) process: its peak RSS is its own, and a crash names
the stage. ``--dry-run`` validates every run config and prints the plan without running anything.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import multiprocessing
import os
import resource
import time
from pathlib import Path
from typing import Any, Callable

from pydantic import Field, NonNegativeInt, PositiveInt, model_validator

from pnet import run_log as L
from pnet.config import ConfigModel, PretrainConfig, load_config, parse_config, read_yaml, set_dotted
from pnet.run_lock import check_writable_file, exclusive_output
from pnet.upcycle import ARGUMENT_NAMES, check_arguments
from pnet_eval.zero_shot import TASKS as ZERO_SHOT_TASKS
from pnet.training import run_command

ARMS = ("dense", "upcycled")
STAGE_FILE = "stage.json"  # per stage folder: what ran, its wall time, peak RSS and load averages
LITERAL_SECTIONS = ("pretrain_overrides",)


class UpcycleSettings(ConfigModel):
    """How the dense model is upcycled (`pnet-upcycle`)."""

    num_experts: PositiveInt = 8
    """experts per routed projection"""
    projections: list[str] = Field(default_factory=lambda: ["up"])
    """routed projections (gate, up, down)"""
    expert_output_scaling: str = "straight_through"
    """straight_through keeps the dense function at step 0; router_prob is Switch's scaling"""

    @model_validator(mode="after")
    def _check(self) -> UpcycleSettings:  # pnet-upcycle's own checks, naming these keys (a dry run catches them)
        check_arguments(self.num_experts, self.projections, self.expert_output_scaling,
                        names={key: key for key in ARGUMENT_NAMES})
        return self


class EvaluationSettings(ConfigModel):
    """The before/after evaluations (`pnet_eval`)."""

    heldout: str = "eval/data/heldout/botchan.jsonl.gz"
    """held-out text for perplexity (JSON Lines, field text)"""
    heldout_docs: PositiveInt | None = None
    """score only its first N documents (null: all)"""
    heldout_chars: PositiveInt | None = None
    """and of those only the first N characters, cut at a space (null: whole documents)"""
    perplexity_max_length: PositiveInt | None = None
    """rolling-window length in tokens (null: the model's context length)"""
    zero_shot_tasks: list[str] = Field(default_factory=lambda: ["arc_easy", "boolq", "hellaswag", "sst2"])
    """pnet_eval zero-shot tasks (bundled copies when the Hub is offline)"""
    zero_shot_limit: PositiveInt | None = None
    """documents per task (null: the full sets)"""
    batch_size: PositiveInt = 1
    dtype: str | None = None
    """null: bfloat16 on CUDA, float32 on CPU"""
    threads: PositiveInt | None = None
    """torch threads of the evaluation processes (null: torch's default)"""

    @model_validator(mode="after")
    def _check(self) -> EvaluationSettings:
        if not Path(self.heldout).expanduser().is_file():
            raise ValueError(f"heldout {self.heldout!r}: no such file (relative to {os.getcwd()})")
        if unknown := [task for task in self.zero_shot_tasks if task not in ZERO_SHOT_TASKS]:
            raise ValueError(f"zero_shot_tasks: unknown {unknown}; allowed: {sorted(ZERO_SHOT_TASKS)}")
        return self


class UpcycleStudyConfig(ConfigModel):
    """Every setting of the study (``--help`` lists them)."""

    dense_model: str
    """dense LLaMA folder (scripts/get_real_model.sh writes models/smollm2-135m-instruct)"""
    output_root: str
    """folder of every stage's outputs"""
    report: str
    """report page (.md); .json and .png are written beside it"""
    upcycle: UpcycleSettings = Field(default_factory=UpcycleSettings)
    seeds: list[NonNegativeInt] = Field(default_factory=lambda: [0], min_length=1)
    """one dense and one upcycled run per seed (seed of data order and dropout-free init of the routers)"""
    base_config: str
    """pretraining run config giving the data mix and optimiser (configs/pretrain/*.yaml)"""
    pretrain_overrides: dict[str, Any] = Field(default_factory=dict)
    """dotted keys set on the base config for every run alike"""
    evaluation: EvaluationSettings = Field(default_factory=EvaluationSettings)
    notes: str = ""
    """markdown for the report's "What this budget can and cannot show" section"""

    @model_validator(mode="after")
    def _check(self) -> UpcycleStudyConfig:
        if len(set(self.seeds)) != len(self.seeds):  # each seed's runs would be planned (and written) twice
            raise ValueError(f"seeds {self.seeds}: allowed: distinct seeds")
        config = Path(self.dense_model).expanduser() / "config.json"
        if config.is_file() and (model_type := json.loads(config.read_text()).get("model_type")) != "llama":
            raise ValueError(f"dense_model {self.dense_model!r} is a {model_type!r} model; allowed: a dense LLaMA "
                             "('llama') folder, which the study upcycles itself")
        return self


def load_study_config(path: str | os.PathLike, overrides: list[str] = ()) -> UpcycleStudyConfig:
    """The YAML with ``key=value`` overrides; ``pretrain_overrides.<dotted key>`` takes the rest of the key whole."""
    return load_config(UpcycleStudyConfig, path, overrides, literal_sections=LITERAL_SECTIONS)


# --------------------------------------------------------------------------------------------------- layout

def root(study: UpcycleStudyConfig) -> Path:
    return Path(study.output_root)


def arm_model(study: UpcycleStudyConfig, arm: str) -> Path:
    """The folder an arm starts from."""
    return Path(study.dense_model) if arm == "dense" else root(study) / "upcycled"


def run_dir(study: UpcycleStudyConfig, arm: str, seed: int) -> Path:
    return root(study) / f"{arm}-seed{seed}"


def pretrain_config(study: UpcycleStudyConfig, arm: str, seed: int, init_from: Path | None = None) -> PretrainConfig:
    """The typed run config of one arm: base config + pretrain_overrides + this arm's model, seed and folder."""
    values = read_yaml(study.base_config)
    for key, value in study.pretrain_overrides.items():
        set_dotted(values, key, value)
    values.update(model=None, model_overrides={}, init_from=str(init_from or arm_model(study, arm)),
                  output_dir=str(run_dir(study, arm, seed)), seed=seed)
    set_dotted(values, "data.tokenizer", study.dense_model)  # the model's own tokenizer, never the LLaMA-32k one
    return parse_config(PretrainConfig, values, f"{study.base_config} + pretrain_overrides ({arm}, seed {seed})")


def heldout_subset(study: UpcycleStudyConfig) -> Path:
    """The held-out text scored: the first ``heldout_docs`` documents, cut to ``heldout_chars`` characters, written
    once under the output root (the file itself when neither is set)."""
    settings = study.evaluation
    source = Path(settings.heldout)
    if settings.heldout_docs is None and settings.heldout_chars is None:
        return source
    out = root(study) / f"heldout-{settings.heldout_docs or 'all'}docs-{settings.heldout_chars or 'all'}chars.jsonl"
    if not out.is_file():
        with gzip.open(source, "rt", encoding="utf-8") if source.suffix == ".gz" else open(source) as f:
            records = [json.loads(line) for line in f if line.strip()][:settings.heldout_docs]
        budget, kept = settings.heldout_chars, []
        for record in records:
            text = record["text"]
            cut = budget is not None and len(text) > budget
            if cut:
                text = text[:budget].rsplit(" ", 1)[0]
            kept.append({"text": text})
            if cut:
                break
            budget = None if budget is None else budget - len(text)
        tmp = out.with_name(out.name + ".tmp")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept), encoding="utf-8")
        tmp.replace(out)
    return out


# ------------------------------------------------------------------------------------------- stages (children)

def _stage_child(target: Callable[..., Any], args: tuple, stage_dir: str) -> None:
    """Runs in the spawned process: the stage, then its resources into stage.json (written last: the stage's
    completion mark)."""
    load_start, start = os.getloadavg(), time.perf_counter()
    result = target(*args)
    record = {"wall_s": round(time.perf_counter() - start, 1),
              "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
              "loadavg_start": [round(x, 2) for x in load_start],
              "loadavg_end": [round(x, 2) for x in os.getloadavg()], "result": result}
    tmp = Path(stage_dir) / (STAGE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(Path(stage_dir) / STAGE_FILE)


def run_stage(name: str, stage_dir: Path, target: Callable[..., Any], *args: Any) -> dict[str, Any]:
    """Run ``target(*args)`` in a fresh process unless ``stage_dir/stage.json`` says it already ran."""
    done = stage_dir / STAGE_FILE
    if done.is_file():
        print(f"[{name}] done before: {done}", flush=True)
        return json.loads(done.read_text())
    stage_dir.mkdir(parents=True, exist_ok=True)
    print(f"[{name}] running (load average {os.getloadavg()[0]:.2f})", flush=True)
    process = multiprocessing.get_context("spawn").Process(target=_stage_child, args=(target, args, str(stage_dir)),
                                                           name=name)
    process.start()
    process.join()
    if process.exitcode != 0 or not done.is_file():
        raise RuntimeError(f"stage {name} failed (exit status {process.exitcode}); re-run the same command to "
                           "continue from the last finished stage")
    return json.loads(done.read_text())


def upcycle_stage(study_dict: dict[str, Any]) -> dict[str, Any]:
    from pnet.upcycle import upcycle
    from pnet_eval.model_card import write_card

    study = UpcycleStudyConfig.model_validate(study_dict)
    out = arm_model(study, "upcycled")
    if (out / "config.json").is_file():  # published by an earlier run whose stage.json was not written
        return {"out_dir": str(out)}
    return upcycle(study.dense_model, out, study.upcycle.num_experts, study.upcycle.projections,
                   study.upcycle.expert_output_scaling, write_card=write_card)


def evaluate_stage(study_dict: dict[str, Any], model_dir: str, out_dir: str) -> dict[str, Any]:
    import torch

    from pnet_eval.perplexity import evaluate_perplexity
    from pnet_eval.zero_shot import evaluate

    study = UpcycleStudyConfig.model_validate(study_dict)
    settings = study.evaluation
    if settings.threads:
        torch.set_num_threads(settings.threads)
    # The stage runs again only when the runner has no record of it finishing: earlier files are partial.
    perplexity = evaluate_perplexity(model_dir, heldout_subset(study), max_length=settings.perplexity_max_length,
                                     batch_size=settings.batch_size, dtype=settings.dtype, output_dir=out_dir,
                                     overwrite=True)[0]
    zero_shot = evaluate(model_dir, settings.zero_shot_tasks, limit=settings.zero_shot_limit,
                         batch_size=settings.batch_size, dtype=settings.dtype, output_dir=out_dir, overwrite=True)[0]
    return {"perplexity": perplexity["files"], "zero_shot": zero_shot["tasks"],
            "zero_shot_wall_s": zero_shot["wall_time_s"]}


def train_stage(study_dict: dict[str, Any], arm: str, seed: int) -> dict[str, Any]:
    from pnet.pretrain import train

    study = UpcycleStudyConfig.model_validate(study_dict)
    config = pretrain_config(study, arm, seed)
    resume = any(Path(config.output_dir).glob("checkpoint-*[0-9]"))
    final = train(config, resume=resume)
    return {"final": str(final), "resumed": resume}


# --------------------------------------------------------------------------------------------------- report

def read_run(study: UpcycleStudyConfig, arm: str, seed: int) -> dict[str, Any]:
    """Curves and throughput of one run from its log.jsonl."""
    records = L.read_log(run_dir(study, arm, seed) / L.LOG_FILE)
    train = L.train_records(records)
    val = L.val_records(records)
    steady = [r[L.TOKENS_PER_S] for r in train[1:]] or [r[L.TOKENS_PER_S] for r in train]
    return {
        "train_curve": [{"tokens": r[L.TOKENS], "lm_loss": r[L.LM_LOSS], "aux_loss": r[L.AUX_LOSS]} for r in train],
        "val_curve": [{"step": r[L.STEP], "val_loss": r[L.VAL_LOSS]} for r in val],
        "batch_crc32": [r[L.BATCH_CRC32] for r in train],
        "tokens": train[-1][L.TOKENS] if train else 0,
        "tokens_per_s": sum(steady) / len(steady) if steady else None,  # mean over log windows after the first
    }


def flops_per_token(model_dir: Path, seq_len: int) -> dict[str, Any]:
    from pnet.counting import load_config_dict
    from pnet.llama_counting import count_llama

    report = count_llama(load_config_dict(str(model_dir)), model_dir.name, seq_len)
    return {"total_params": report.total_params, "active_params": report.active_params,
            "forward_flops_per_token": report.details["flops+routers"] / seq_len}


def scores(evaluation: dict[str, Any]) -> dict[str, float]:
    """Flat {metric: value} of one evaluation: token/word perplexity per file, accuracy per task."""
    flat = {}
    for label, entry in evaluation["perplexity"].items():
        flat[f"{label} token ppl"] = entry["token_perplexity"]
        flat[f"{label} bits/byte"] = entry["bits_per_byte"]
    for task, entry in evaluation["zero_shot"].items():
        for metric in ("acc", "acc_norm"):
            if metric in entry:
                flat[f"{task} {metric}"] = 100 * entry[metric]
    return flat


def plot_curves(runs: dict[str, dict[str, Any]], png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    colors = {"dense": "black", "upcycled": "tab:orange"}
    for name, run in runs.items():
        arm = name.split("-seed")[0]
        tokens = [p["tokens"] for p in run["train_curve"]]
        axes[0].plot(tokens, [p["lm_loss"] for p in run["train_curve"]], color=colors[arm], lw=1.2, label=name)
        steps_to_tokens = run["tokens"] / max(run["val_curve"][-1]["step"], 1) if run["val_curve"] else 0
        val_tokens = [p["step"] * steps_to_tokens for p in run["val_curve"]]
        mean_val = [sum(p["val_loss"].values()) / len(p["val_loss"]) for p in run["val_curve"]]
        axes[1].plot(val_tokens, mean_val, color=colors[arm], lw=1.2, marker="o", ms=3, label=name)
    for ax, title in zip(axes, ("training LM loss (log windows)", "validation LM loss, mean of the mix's domains")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("continued-pretraining tokens")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("cross-entropy (nats/token)")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:,.{digits}f}"


def final_validation_lines(runs: dict[str, dict[str, Any]], seeds: list[int]) -> list[str]:
    """Markdown table of each run's last validation loss per domain, and upcycled - dense per seed (same tokens)."""
    finals = {name: run["val_curve"][-1]["val_loss"] for name, run in runs.items() if run["val_curve"]}
    if len(finals) != len(runs):
        return []
    names = [f"{arm}-seed{seed}" for seed in seeds for arm in ARMS]
    step = runs[names[0]]["val_curve"][-1]["step"]
    domains = list(finals[names[0]])

    def loss(name: str, domain: str) -> float:
        values = finals[name]
        return sum(values.values()) / len(values) if domain == "mean" else values[domain]

    lines = ["", f"## Validation loss at step {step} (nats/token)", "",
             "| domain | " + " | ".join(names) + " | " + " | ".join(f"upcycled - dense, seed {s}" for s in seeds) + " |",
             "|---|" + "---:|" * (len(names) + len(seeds))]
    for domain in domains + ["mean"]:
        cells = [f"{loss(name, domain):.4f}" for name in names]
        cells += [f"{loss(f'upcycled-seed{s}', domain) - loss(f'dense-seed{s}', domain):+.4f}" for s in seeds]
        lines.append(f"| {domain} | " + " | ".join(cells) + " |")
    return lines


def write_report(study: UpcycleStudyConfig, stages: dict[str, dict[str, Any]], command: str) -> dict[str, Any]:
    report_md = Path(study.report)
    report_md.parent.mkdir(parents=True, exist_ok=True)
    runs = {f"{arm}-seed{seed}": read_run(study, arm, seed) for seed in study.seeds for arm in ARMS}
    seq_len = pretrain_config(study, "dense", study.seeds[0]).data.seq_len
    counts = {arm: flops_per_token(arm_model(study, arm), seq_len) for arm in ARMS}
    evaluations = {name: scores(stage["result"]) for name, stage in stages.items() if name.startswith(("before",
                                                                                                       "after"))}
    same_tokens = len({run["tokens"] for run in runs.values()}) == 1
    same_order = all(runs[f"dense-seed{s}"]["batch_crc32"] == runs[f"upcycled-seed{s}"]["batch_crc32"]
                      for s in study.seeds)
    summary = {"config": study.to_dict(), "command": command, "flops": counts, "runs": runs,
               "evaluations": evaluations,  # the evaluation stages' results, flattened; train stages keep theirs
               "stages": {k: {kk: vv for kk, vv in v.items() if kk != "result" or k.startswith("train-")}
                          for k, v in stages.items()},
               "upcycle": stages["upcycle"]["result"], "equal_tokens": same_tokens, "same_data_order": same_order}
    report_md.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    plot_curves(runs, report_md.with_suffix(".png"))

    run_config = pretrain_config(study, "dense", study.seeds[0])
    metrics = list(next(iter(evaluations.values())))
    columns = list(evaluations)
    lines = [
        f"# Continued pretraining: dense {Path(study.dense_model).name} vs its ParameterNet upcycling",
        "",
        f"Command: `{command}` (outputs in `{study.output_root}`; this page is written by "
        "`experiments/upcycle_smollm2.py`; re-running the command continues a killed run).",
        "",
        f"- Upcycling: {'+'.join(study.upcycle.projections)} x {study.upcycle.num_experts} experts, "
        f"{study.upcycle.expert_output_scaling} output scaling; max |logit difference| to the dense model on the "
        f"probe batch: {_fmt(stages['upcycle']['result'].get('max_logit_difference'), 6)}.",
        f"- Parameters: dense {counts['dense']['total_params']:,}, upcycled {counts['upcycled']['total_params']:,} "
        f"(active {counts['upcycled']['active_params']:,}). Forward FLOPs per token at seq {seq_len}: dense "
        f"{counts['dense']['forward_flops_per_token']:,.0f}, upcycled "
        f"{counts['upcycled']['forward_flops_per_token']:,.0f} (ratio "
        f"{counts['upcycled']['forward_flops_per_token'] / counts['dense']['forward_flops_per_token']:.5f}: the "
        "top-1 routers).",
        f"- Continued pretraining, each run: {run_config.max_steps} steps x {run_config.global_batch_tokens:,} "
        f"tokens = {run_config.max_steps * run_config.global_batch_tokens:,} tokens of `{study.base_config}`'s mix "
        f"(seq {seq_len}, tokenizer of the dense model), lr {run_config.lr:g}, warmup {run_config.warmup_steps}, "
        f"precision {run_config.precision}, seeds {study.seeds}. Equal tokens in both arms: {same_tokens}; same data "
        f"order (CRC32 of every logged batch): {same_order}.",
        "",
        f"![curves]({report_md.with_suffix('.png').name})",
        "",
        "## Before and after",
        "",
        "| metric | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    lines += [f"| {m} | " + " | ".join(_fmt(evaluations[c].get(m)) for c in columns) + " |" for m in metrics]
    lines += final_validation_lines(runs, study.seeds)
    lines += [
        "",
        "Perplexity: " + (f"the first {study.evaluation.heldout_docs} document(s)" if study.evaluation.heldout_docs
                          else "all documents") + f" of `{study.evaluation.heldout}`"
        + (f", cut to {study.evaluation.heldout_chars:,} characters" if study.evaluation.heldout_chars else "") + "; "
        f"zero-shot: {study.evaluation.zero_shot_limit or 'all'} documents per task (accuracy in %).",
        "",
        "## Throughput and memory",
        "",
        "| stage | wall (s) | tokens/s (training) | peak RSS (MiB) | load average at start / end (1 min) |",
        "|---|---:|---:|---:|---|",
    ]
    for name, stage in stages.items():
        run = runs.get(name.removeprefix("train-"))
        tps = _fmt(run["tokens_per_s"], 0) if name.startswith("train-") and run else ""
        lines.append(f"| {name} | {_fmt(stage['wall_s'], 0)} | {tps} | {_fmt(stage['peak_rss_mib'], 0)} | "
                     f"{stage['loadavg_start'][0]:.2f} / {stage['loadavg_end'][0]:.2f} |")
    if study.notes:
        lines += ["", "## What this budget can and cannot show", "", study.notes.strip()]
    report_md.write_text("\n".join(lines) + "\n")
    return summary


# ------------------------------------------------------------------------------------------------------ main

def plan(study: UpcycleStudyConfig) -> list[str]:
    """The stages in order, by name."""
    names = ["upcycle"] + [f"before-{arm}" for arm in ARMS]
    for seed in study.seeds:
        names += [f"train-{arm}-seed{seed}" for arm in ARMS]
    for seed in study.seeds:
        names += [f"after-{arm}-seed{seed}" for arm in ARMS]
    return names


def run(study: UpcycleStudyConfig, command: str) -> dict[str, Any]:
    for path, what in ((study.dense_model, "dense_model"), (study.base_config, "base_config"),
                       (study.evaluation.heldout, "evaluation.heldout")):
        if not Path(path).exists():
            raise FileNotFoundError(f"{what} {path!r} not found (relative to {os.getcwd()})")
    pretrain_config(study, "dense", study.seeds[0])  # every run setting checked before any work
    out = root(study)
    out.mkdir(parents=True, exist_ok=True)
    study_dict = study.to_dict()
    stages = {"upcycle": run_stage("upcycle", out / "stages" / "upcycle", upcycle_stage, study_dict)}
    for arm in ARMS:
        stages[f"before-{arm}"] = run_stage(f"before-{arm}", out / "eval" / f"before-{arm}", evaluate_stage,
                                            study_dict, str(arm_model(study, arm)), str(out / "eval" / f"before-{arm}"))
    for seed in study.seeds:
        for arm in ARMS:
            name = f"train-{arm}-seed{seed}"
            stages[name] = run_stage(name, out / "stages" / name, train_stage, study_dict, arm, seed)
    for seed in study.seeds:
        for arm in ARMS:
            name = f"after-{arm}-seed{seed}"
            stages[name] = run_stage(name, out / "eval" / name, evaluate_stage, study_dict,
                                     str(run_dir(study, arm, seed) / "final"), str(out / "eval" / name))
    summary = write_report(study, stages, command)
    print(f"wrote {study.report} (+ .json, .png)")
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(prog="upcycle_smollm2", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="study config (configs/replicate/upcycle-smollm2.yaml)")
    parser.add_argument("--dry-run", action="store_true", help="check every run config and print the plan only")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="dotted-key overrides (YAML values)")
    args = parser.parse_intermixed_args(argv)  # overrides may come before and after --dry-run
    study = load_study_config(args.config, args.overrides)
    shown = [o if not o.startswith("notes=") else "notes=..." for o in args.overrides]  # (the text is on the page)
    command = " ".join(["python scripts/upcycle_smollm2.py", "--config", args.config, *shown])
    if args.dry_run:
        for seed in study.seeds:
            # The upcycled folder may not exist yet: its run config is checked from the dense folder's.
            for arm in ARMS:
                config = pretrain_config(study, arm, seed, init_from=Path(study.dense_model))
                print(f"{arm}-seed{seed}: {config.max_steps} steps x {config.global_batch_tokens} tokens, "
                      f"precision {config.precision}, lr {config.lr:g}, output {config.output_dir}")
        print("stages: " + ", ".join(plan(study)))
        return None
    check_writable_file(study.report, "report")
    with exclusive_output(root(study)):  # one runner per output root
        return run(study, command)


def cli(argv: list[str] | None = None) -> None:
    run_command("upcycle_smollm2", main, argv)


if __name__ == "__main__":
    cli()
