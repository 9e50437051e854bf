"""The paper's low-FLOPs trap in miniature: do models of equal FLOPs gain equally from 10x more training data?

    python scripts/low_flops_trap.py --config configs/replicate/low-flops-trap.yaml [key=value ...]

ParameterNet's central claim: a low-FLOPs model does not gain from more (pre)training data unless it gets more
parameters at the same FLOPs. The config (`LowFlopsTrapConfig`, typed and validated like every pnet config) names
models of (nearly) equal FLOPs, the shares of the training set (e.g. 10% and 100%) and the seeds. Every
(model, share, seed) run is `pnet.vision_train.train` on the ``base_config`` recipe with ``train_overrides``, the
same for every run; a run differs from another only in ``model``, ``seed`` and ``data.train_subset`` (a fixed,
class-balanced share drawn with ``subset_seed``, identical for every model and seed). The step budget follows from
the overrides, one rule for every share: ``max_steps`` = the same number of steps (and images seen) for every share,
``epochs`` = the same number of passes (a larger share trains for more steps).

Runs execute in ``workers`` processes (1: in this process), longest first; each run's output goes to
``<output_root>/<run>/output.txt``. Resumable: a finished run (``results.json`` with the same settings) is skipped,
an interrupted one continues from its last checkpoint (`pnet.checkpoint` refuses other settings); settings that
differ from a finished run's are an error before anything runs. Then the runner writes ``report`` (markdown: test
accuracy mean +- std per model and share, the gain from more data and how it compares with the baseline model's),
its ``.json`` and ``<report stem>.png`` (accuracy against training images per model, and the gains). A section of
the report between `HANDWRITTEN_BEGIN` and `HANDWRITTEN_END` (a reading written from the numbers) is kept when the
report is rewritten. Each invocation's wall time and load average (sampled every ``load_sample_s``) are recorded in
``<output_root>/sessions.json`` and shown in the report.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import hashlib
import json
import math
import multiprocessing
import os
import shlex
import statistics
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from pnet.checkpoint import flatten, list_checkpoints, read_json, setting_differences, write_json_atomic
from pnet.config import (
    ConfigError,
    ConfigModel,
    NonNegativeInt,
    PositiveInt,
    VisionTrainConfig,
    apply_overrides,
    config_argument_parser,
    parse_config,
    read_yaml,
    yaml_value,
)
from pnet.run_lock import check_writable_file, exclusive_output
from pnet.training import run_command
from experiments.table7 import ROW_NAME

RUN_OUTPUT = "output.txt"  # a run's stdout and stderr (tqdm, prints)
SESSIONS_FILE = "sessions.json"
HANDWRITTEN_BEGIN = "<!-- hand-written: kept when the runner rewrites this page -->"
HANDWRITTEN_END = "<!-- end hand-written -->"
SET_PER_RUN = ("model", "output_dir", "seed", "data.train_subset")


class TrapModel(ConfigModel):
    """One model of the comparison."""

    name: Annotated[str, Field(pattern=ROW_NAME.pattern)]
    """names the model's runs: <name>-<percent>pct-seed<seed>"""
    model: str
    """model file (configs/vision/*.json)"""


class LowFlopsTrapConfig(ConfigModel):
    """Everything the low-FLOPs trap runner does, from one YAML file."""

    output_root: str
    """one folder per run: <output_root>/<model>-<percent>pct-seed<seed>/{log.jsonl,results.json,final/,...}"""
    report: str
    """markdown report (+ .json and .png next to it)"""
    base_config: str
    """vision training recipe (VisionTrainConfig YAML) every run starts from"""
    train_overrides: dict[str, Any] = Field(default_factory=dict)
    """training settings for every run, {dotted key: value}: the recipe as run, step budget included"""
    models: Annotated[list[TrapModel], Field(min_length=1)]
    baseline: str
    """the model whose gain from more data the others are compared with"""
    data_fractions: Annotated[list[Annotated[float, Field(gt=0, le=1)]], Field(min_length=2)]
    """shares of the training split (each run draws it per class with subset_seed)"""
    subset_seed: NonNegativeInt = 0
    """seed of every share's draw: the same images for every model and seed"""
    seeds: Annotated[list[NonNegativeInt], Field(min_length=1)]
    """run seeds (weight init, data order, augmentation)"""
    workers: PositiveInt = 2
    """runs at a time, one process each (1: in the runner's process)"""
    threads_per_process: PositiveInt = 1
    """torch threads of every run (sets cpu_threads)"""
    load_sample_s: Annotated[float, Field(gt=0)] = 30.0
    """seconds between load-average samples"""

    @model_validator(mode="after")
    def _check(self) -> LowFlopsTrapConfig:
        if not os.path.isfile(self.base_config):
            raise ValueError(f"base_config {self.base_config!r} not found (relative to {os.getcwd()})")
        for key in self.train_overrides:
            if key in SET_PER_RUN or key.startswith("data.train_subset.") or key == "cpu_threads":
                raise ValueError(f"train_overrides must not set {key!r}: the runner sets it per run "
                                 f"(set per run: {list(SET_PER_RUN)}; threads: threads_per_process)")
        for key, values in (("models", [m.name for m in self.models]), ("data_fractions", self.data_fractions),
                            ("seeds", self.seeds)):
            repeated = sorted({v for v in values if values.count(v) > 1})
            if repeated:
                raise ValueError(f"{key} must be unique; repeated: {repeated}")
        names = [m.name for m in self.models]
        if self.baseline not in names:
            raise ValueError(f"baseline {self.baseline!r} is not a model; allowed: {names}")
        return self

    def train_config(self, model: TrapModel, fraction: float, seed: int) -> VisionTrainConfig:
        """One run's training config: base_config + train_overrides + the per-run settings."""
        values = read_yaml(self.base_config)
        apply_overrides(values, [f"{k}={yaml_value(v)}" for k, v in self.train_overrides.items()])
        values.update(model=model.model, output_dir=str(Path(self.output_root) / run_name(model.name, fraction, seed)),
                      seed=seed, cpu_threads=self.threads_per_process)
        values.setdefault("data", {})["train_subset"] = {"fraction": fraction, "seed": self.subset_seed}
        return parse_config(VisionTrainConfig, values, f"{self.base_config} with train_overrides ({model.name})")

    def runs(self) -> list[Run]:
        """Every (model, share, seed) run, validated (all before anything trains)."""
        return [Run(model.name, fraction, seed, self.train_config(model, fraction, seed))
                for model in self.models for fraction in sorted(self.data_fractions) for seed in self.seeds]


@dataclass
class Run:
    model: str
    fraction: float
    seed: int
    config: VisionTrainConfig

    @property
    def name(self) -> str:
        return run_name(self.model, self.fraction, self.seed)

    @property
    def output_dir(self) -> Path:
        return Path(self.config.output_dir)


def run_name(model: str, fraction: float, seed: int) -> str:
    return f"{model}-{100 * fraction:g}pct-seed{seed}"


def load_trap_config(path: str | os.PathLike, overrides: list[str] = ()) -> LowFlopsTrapConfig:
    """Read the YAML and ``key=value`` overrides (``train_overrides.<key>`` takes the rest of the key whole)."""
    values = read_yaml(path)
    apply_overrides(values, overrides, literal_sections=("train_overrides",))
    return parse_config(LowFlopsTrapConfig, values, str(path))


# ------------------------------------------------------------------------------------------------------ running

def settings_differences(saved: dict[str, Any], now: dict[str, Any]) -> dict[str, list[Any]]:
    """Settings that differ between a run's saved config and this one, ignoring the keys that may change on
    resume without changing what the run computes (logging, checkpointing, threads); the step budget counts."""
    return setting_differences(saved, now, free=[key for key in VisionTrainConfig.free_on_resume if key != "max_steps"])


def run_status(run: Run) -> str:
    """"finished", "interrupted" (checkpoints, no results) or "new"; a run folder that holds another run's settings
    is an error naming them."""
    from pnet.vision_train import CONFIG_FILE, RESULTS_FILE

    saved_config = run.output_dir / CONFIG_FILE
    if saved_config.is_file():
        differences = settings_differences(yaml.safe_load(saved_config.read_text()), run.config.to_dict())
        if differences:
            lines = "\n".join(f"  {key}: {old!r} there, {new!r} now" for key, (old, new) in differences.items())
            raise ConfigError(f"{run.output_dir} holds a run with other settings:\n{lines}\nRemove that folder or "
                              "choose another output_root.")
    if (run.output_dir / RESULTS_FILE).is_file():
        return "finished"
    return "interrupted" if list_checkpoints(run.output_dir) else "new"


def train_run(config_values: dict[str, Any]) -> dict[str, Any]:
    """Train (or continue) one run, its output in <output_dir>/output.txt; the function each worker calls."""
    from pnet.vision_train import train

    config = VisionTrainConfig.model_validate(config_values)
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    resume = bool(list_checkpoints(output_dir))
    with open(output_dir / RUN_OUTPUT, "a", encoding="utf-8") as out, \
            contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        print(f"=== {datetime.datetime.now():%Y-%m-%d %H:%M:%S} {'resuming' if resume else 'starting'} "
              f"{output_dir.name}", flush=True)
        return train(config, resume=resume)


def exit_with_parent(parent_pid: int, every_s: float = 5.0) -> None:
    """Worker initializer: end this worker when the runner that started it is gone (killed), so that a re-run of
    the runner never trains a run twice at the same time."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


class LoadSampler:
    """Samples the 1-minute load average in a background thread."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.samples: list[float] = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            self.samples.append(os.getloadavg()[0])

    def __enter__(self) -> LoadSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> dict[str, Any]:
        return {"mean": round(statistics.fmean(self.samples), 2), "min": round(min(self.samples), 2),
                "max": round(max(self.samples), 2), "samples": len(self.samples), "every_s": self.every_s}


def estimated_cost(run: Run) -> float:
    """Relative cost of a run, for longest-first scheduling: training FLOPs per image x images seen."""
    # Every run reads the same training split, so epochs x share is proportional to its steps.
    return training_flops(run.config.model) * (run.config.max_steps or run.config.epochs * run.fraction)


@functools.lru_cache(maxsize=None)
def training_flops(model_file: str) -> int:
    """Forward FLOPs per image of the model as trained (`pnet-count`; RepConv: with its parallel branches)."""
    from pnet.vision_counting import count_vision

    with open(model_file, encoding="utf-8") as f:
        counts = count_vision(json.load(f), name=os.path.basename(model_file))
    return counts.details.get("training_flops", counts.flops)


def execute(config: LowFlopsTrapConfig, runs: list[Run], invocation: str) -> None:
    """Train every run not finished yet, ``workers`` at a time, and record the session (wall time, load)."""
    statuses = {run.name: run_status(run) for run in runs}
    todo = sorted((r for r in runs if statuses[r.name] != "finished"), key=estimated_cost, reverse=True)
    finished = len(runs) - len(todo)
    print(f"{len(runs)} runs: {finished} finished earlier (skipped), "
          f"{sum(s == 'interrupted' for s in statuses.values())} to continue, "
          f"{sum(s == 'new' for s in statuses.values())} to start; {config.workers} at a time", flush=True)
    if not todo:
        return
    sessions_path = Path(config.output_root) / SESSIONS_FILE
    sessions = read_json(sessions_path) if sessions_path.is_file() else []
    start = time.time()
    session = {"invocation": invocation, "started": datetime.datetime.now().isoformat(timespec="seconds"),
               "workers": config.workers, "threads_per_process": config.threads_per_process,
               "cpu_count": os.cpu_count(), "runs": {}, "wall_s": None, "load_1min": None}
    sessions.append(session)
    failures = []

    def record(run: Run, result: dict[str, Any] | None, error: BaseException | None) -> None:
        if error is not None:
            failures.append(f"{run.name}: {type(error).__name__}: {error} (output: {run.output_dir / RUN_OUTPUT})")
            progress.write(f"FAILED {failures[-1]}")
        else:
            session["runs"][run.name] = result["train_time_s"]
            progress.write(f"done {run.name}: test accuracy {100 * result['test_accuracy']:.2f}%, "
                           f"{result['train_time_s']:.0f} s")
        session["wall_s"] = round(time.time() - start, 1)
        session["load_1min"] = sampler.summary()
        write_json_atomic(sessions_path, sessions)
        progress.update(1)

    Path(config.output_root).mkdir(parents=True, exist_ok=True)
    with LoadSampler(config.load_sample_s) as sampler, \
            tqdm(total=len(runs), initial=finished, desc="runs", unit="run") as progress:
        if config.workers == 1:
            for run in todo:
                progress.write(f"start {run.name} ({statuses[run.name]}): {run.output_dir / RUN_OUTPUT}")
                try:
                    record(run, train_run(run.config.to_dict()), None)
                except Exception as error:  # noqa: BLE001 - reported with the others at the end
                    record(run, None, error)
        else:
            # One fresh process per run (spawn: no state shared between runs); longest runs first.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(config.workers, mp_context=context, max_tasks_per_child=1,
                                     initializer=exit_with_parent, initargs=(os.getpid(),)) as pool:
                pending = {}
                for run in todo:
                    pending[pool.submit(train_run, run.config.to_dict())] = run
                    progress.write(f"queued {run.name} ({statuses[run.name]}): {run.output_dir / RUN_OUTPUT}")
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        run = pending.pop(future)
                        error = future.exception()
                        record(run, None if error else future.result(), error)
    session["wall_s"] = round(time.time() - start, 1)
    session["load_1min"] = sampler.summary()
    session["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    write_json_atomic(sessions_path, sessions)
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed:\n" + "\n".join(failures))


# ------------------------------------------------------------------------------------------------------ results

def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def subset_summaries(config: LowFlopsTrapConfig, runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Per share: the training images its runs see, as count per class and a digest of their indices (the same
    for every model and seed by construction: the draw depends only on the share and subset_seed)."""
    from pnet.vision_data import load_image_dataset, stratified_subset

    data_cfg = runs[0].config.data
    train = load_image_dataset(data_cfg.path, data_cfg.name, limit=data_cfg.limit)[data_cfg.train_split]
    if data_cfg.label_column != "label":
        train = train.rename_column(data_cfg.label_column, "label")
    train = train.select_columns(["label"]).add_column("index", list(range(len(train))))
    names = train.features["label"].names
    summaries = {}
    for fraction in sorted(config.data_fractions):
        subset = stratified_subset(train, fraction, config.subset_seed)
        labels = list(subset["label"])
        summaries[str(fraction)] = {
            "images": len(subset), "of": len(train),
            "per_class": {names[c]: labels.count(c) for c in sorted(set(labels))},
            "indices_sha1": hashlib.sha1(json.dumps(list(subset["index"])).encode()).hexdigest()[:12]}
    return summaries


def collect(config: LowFlopsTrapConfig, runs: list[Run]) -> dict[str, Any]:
    """Every number of the report: per run, per (model, share) mean +- std, gains and comparisons."""
    from pnet.vision_counting import count_vision
    from pnet.vision_train import RESULTS_FILE

    per_run = []
    for run in runs:
        result = read_json(run.output_dir / RESULTS_FILE)
        per_run.append({"run": run.name, "model": run.model, "fraction": run.fraction, "seed": run.seed,
                        "test_accuracy": result["test_accuracy"], "train_accuracy": result["train_accuracy"],
                        "train_samples": result["train_samples"], "steps": result["steps"],
                        "eval_samples": result["eval_samples"], "train_time_s": result["train_time_s"]})
    fractions = sorted(config.data_fractions)
    models = []
    for model in config.models:
        counts = count_vision(config.train_config(model, 1.0, 0).build_model_config().to_dict(), name=model.name)
        cells = {}
        for fraction in fractions:
            rows = [r for r in per_run if r["model"] == model.name and r["fraction"] == fraction]
            acc, acc_sd = mean_std([r["test_accuracy"] for r in rows])
            train_acc, train_sd = mean_std([r["train_accuracy"] for r in rows])
            cells[str(fraction)] = {
                "test_accuracy": acc, "test_accuracy_std": acc_sd, "n": len(rows),
                "train_accuracy": train_acc, "train_accuracy_std": train_sd,
                "seeds": {r["seed"]: r["test_accuracy"] for r in rows},
                "train_samples": rows[0]["train_samples"], "steps": rows[0]["steps"],
                "epochs": rows[0]["steps"] * run_batch(runs) / rows[0]["train_samples"],
                "train_time_s": statistics.fmean(r["train_time_s"] for r in rows)}
        low, high = cells[str(fractions[0])], cells[str(fractions[-1])]
        gain = high["test_accuracy"] - low["test_accuracy"]
        gain_se = math.sqrt(high["test_accuracy_std"] ** 2 / high["n"] + low["test_accuracy_std"] ** 2 / low["n"])
        models.append({"name": model.name, "model": model.model, "params": counts.total_params,
                       "inference_params": counts.details.get("inference_params", counts.total_params),
                       "flops": counts.flops, "training_flops": counts.details.get("training_flops", counts.flops),
                       "cells": cells, "gain": gain, "gain_se": gain_se})
    baseline = next(m for m in models if m["name"] == config.baseline)
    comparisons = []
    for m in models:
        if m is baseline:
            continue
        difference = m["gain"] - baseline["gain"]
        se = math.sqrt(m["gain_se"] ** 2 + baseline["gain_se"] ** 2)
        at_share = {}
        for fraction in fractions:
            a, b = m["cells"][str(fraction)], baseline["cells"][str(fraction)]
            d = a["test_accuracy"] - b["test_accuracy"]
            d_se = math.sqrt(a["test_accuracy_std"] ** 2 / a["n"] + b["test_accuracy_std"] ** 2 / b["n"])
            at_share[str(fraction)] = {"difference": d, "se": d_se}
        comparisons.append({"model": m["name"], "gain_difference": difference, "se": se, "at_share": at_share})
    return {"fractions": fractions, "models": models, "baseline": config.baseline, "comparisons": comparisons,
            "eval_samples": per_run[0]["eval_samples"], "runs": per_run}


def run_batch(runs: list[Run]) -> int:
    return runs[0].config.micro_batch_size


def step_rule(runs: list[Run], numbers: dict[str, Any]) -> str:
    """The step-budget rule in words, from the configs as run."""
    config = runs[0].config
    by_share = {f: numbers["models"][0]["cells"][str(f)] for f in numbers["fractions"]}
    detail = "; ".join(f"{100 * f:g}%: {c['train_samples']:,} images, {c['steps']} steps = {c['epochs']:.2f} epochs"
                       for f, c in by_share.items())
    if config.max_steps is not None:
        return (f"fixed step budget: every run takes max_steps={config.max_steps} steps of {config.micro_batch_size} "
                f"images (equal training compute per model; a smaller share repeats its images more often) - {detail}")
    return (f"equal epochs: every run makes epochs={config.epochs} passes over its share (a larger share trains "
            f"for proportionally more steps) - {detail}")


def plot(numbers: dict[str, Any], png_path: Path) -> None:
    """Test accuracy against training images per model (mean +- std, seeds as dots), and each model's gain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 4.3), gridspec_kw={"width_ratios": [3, 2]})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (m, color) in enumerate(zip(numbers["models"], colors)):
        cells = [m["cells"][str(f)] for f in numbers["fractions"]]
        x = [c["train_samples"] for c in cells]
        shift = 1 + 0.03 * (i - (len(numbers["models"]) - 1) / 2)  # side by side on the log axis
        ax.errorbar([v * shift for v in x], [100 * c["test_accuracy"] for c in cells],
                    yerr=[100 * c["test_accuracy_std"] for c in cells], marker="o", capsize=4, color=color,
                    label=f"{m['name']} ({m['params'] / 1e3:.0f}K params, {m['flops'] / 1e6:.2f}M FLOPs)")
        for xv, c in zip(x, cells):
            ax.plot([xv * shift] * len(c["seeds"]), [100 * a for a in c["seeds"].values()], ".", color=color,
                    alpha=0.4)
    ax.set_xscale("log")
    sizes = [numbers["models"][0]["cells"][str(f)]["train_samples"] for f in numbers["fractions"]]
    ax.set_xticks(sizes, [f"{n:,}\n({100 * f:g}%)" for n, f in zip(sizes, numbers["fractions"])])
    ax.minorticks_off()
    ax.set(xlabel="training images (log scale)", ylabel=f"test accuracy (%), {numbers['eval_samples']:,} images",
           title="Accuracy vs training-set size (mean ± std over seeds; dots: seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    names = [m["name"] for m in numbers["models"]]
    bars.bar(names, [100 * m["gain"] for m in numbers["models"]], yerr=[100 * m["gain_se"] for m in numbers["models"]],
             capsize=5, color=colors[:len(names)])
    low, high = numbers["fractions"][0], numbers["fractions"][-1]
    bars.set(ylabel="accuracy points", title=f"Gain from {100 * low:g}% to {100 * high:g}% of the data (± 1 SE)")
    bars.axhline(0, color="black", lw=0.8)
    bars.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _pm(mean: float, std: float) -> str:
    return f"{100 * mean:.2f} ± {100 * std:.2f}"


def verdict(difference: float, se: float) -> str:
    if se == 0:
        return "no seed spread to compare with (one seed)"
    ratio = abs(difference) / se
    return (f"{ratio:.1f} SE: " + ("larger than the seed spread (> 2 SE)" if ratio > 2 else
                                    "within the seed spread (<= 2 SE)"))


def _header_and_setup(config: LowFlopsTrapConfig, runs: list[Run], numbers: dict[str, Any], invocation: str,
                      subsets: dict[str, Any]) -> list[str]:
    """Title, claim, models and setup sections of the report."""
    fractions = numbers["fractions"]
    low, high = (f"{100 * f:g}%" for f in (fractions[0], fractions[-1]))
    recipe = {k: v for k, v in flatten(runs[0].config.to_dict()).items()
              if k not in ("model", "output_dir", "seed") and not k.startswith("data.train_subset")}
    return [
        "# The low-FLOPs trap in miniature: Fashion-MNIST, GhostNet vs ParameterNet vs RepConv at equal FLOPs",
        "",
        f"Generated by `{invocation}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC from "
        f"{len(runs)} runs ({len(config.models)} models x {len(fractions)} data shares x {len(config.seeds)} seeds "
        f"{config.seeds}).",
        "",
        "The paper's claim: a low-FLOPs model does not gain from more pretraining data unless it gets more "
        "parameters at the same FLOPs. Here: does a model's test accuracy rise more from "
        f"{low} to {high} of the training set when it has more parameters at (nearly) the same FLOPs?",
        "",
        "## Models (`pnet-count`)",
        "",
        "| model | file | training params | inference params | FLOPs (inference, 28²) | training FLOPs / image |",
        "|---|---|---:|---:|---:|---:|",
        *[f"| {m['name']} | `{m['model']}` | {m['params']:,} | {m['inference_params']:,} | {m['flops']:,} | "
          f"{m['training_flops']:,} |" for m in numbers["models"]],
        "",
        "Training FLOPs / image: the forward FLOPs of the model as trained (RepConv trains 4 parallel branches per "
        "convolution and merges them for inference).",
        "",
        "## Setup",
        "",
        f"- Data: `{runs[0].config.data.path}`; test accuracy on the `{runs[0].config.data.eval_split}` split "
        f"({numbers['eval_samples']:,} images); "
        "training shares drawn per class with `data.train_subset` (seed "
        f"{config.subset_seed}), the same images for every model and seed:",
        *[f"  - {100 * float(f):g}%: {s['images']:,} of {s['of']:,} images, per class "
          f"{sorted(set(s['per_class'].values()))} (indices sha1 {s['indices_sha1']})" for f, s in subsets.items()],
        f"- Step budget: {step_rule(runs, numbers)}.",
        "- Recipe (every run; only `model`, `seed`, `data.train_subset` and `output_dir` differ): "
        f"`{config.base_config}` with `{json.dumps(config.train_overrides)}`, i.e.",
        "",
        "```yaml",
        yaml.safe_dump(recipe, sort_keys=False, width=120).strip(),
        "```",
        "",
    ]


def _results(config: LowFlopsTrapConfig, runs: list[Run], numbers: dict[str, Any], png: Path) -> list[str]:
    """Accuracy table, comparison with the baseline model and the plot."""
    fractions = numbers["fractions"]
    low, high = (f"{100 * f:g}%" for f in (fractions[0], fractions[-1]))
    lines = [
        "## Results: test accuracy (%), mean ± std over seeds",
        "",
        f"| model | {low} | {high} | gain {low} -> {high} (± SE) | train acc. {low} | train acc. {high} | "
        "per seed " + " / ".join(f"{100 * f:g}%" for f in fractions) + " |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for m in numbers["models"]:
        a, b = m["cells"][str(fractions[0])], m["cells"][str(fractions[-1])]
        per_seed = " / ".join(", ".join(f"{100 * v:.2f}" for v in m["cells"][str(f)]["seeds"].values())
                              for f in fractions)
        lines.append(f"| {m['name']} | {_pm(a['test_accuracy'], a['test_accuracy_std'])} | "
                     f"{_pm(b['test_accuracy'], b['test_accuracy_std'])} | {100 * m['gain']:+.2f} ± "
                     f"{100 * m['gain_se']:.2f} | {100 * a['train_accuracy']:.2f} | {100 * b['train_accuracy']:.2f} | "
                     f"{per_seed} |")
    lines += [
        "",
        "std: sample standard deviation over seeds (n - 1). SE of a gain: sqrt(std_low²/n + std_high²/n); of a "
        "difference of gains: the two SEs combined. Train acc.: accuracy on (up to) "
        f"{runs[0].config.train_eval_samples:,} images of the run's own training share, evaluation transform.",
        "",
        f"## Compared with {config.baseline}",
        "",
    ]
    for c in numbers["comparisons"]:
        lines.append(f"- {c['model']}: gain {100 * c['gain_difference']:+.2f} points vs {config.baseline}'s "
                     f"(± {100 * c['se']:.2f} SE; {verdict(c['gain_difference'], c['se'])}); accuracy difference "
                     + ", ".join(f"at {100 * float(f):g}% {100 * d['difference']:+.2f} ± {100 * d['se']:.2f} "
                                 f"({verdict(d['difference'], d['se'])})" for f, d in c["at_share"].items()) + ".")
    return lines + [
        "",
        "With 3 seeds a 2-SE bar is loose (the t-distribution's 95% point for ~4 degrees of freedom is 2.8 SE).",
        "",
        "## Plot",
        "",
        f"![accuracy vs training-set size]({png.name})",
        "",
    ]


def _handwritten(report: Path) -> list[str]:
    """The hand-written reading of the existing report, kept; or the placeholder for it."""
    old = report.read_text(encoding="utf-8") if report.is_file() else ""
    if HANDWRITTEN_BEGIN in old and HANDWRITTEN_END in old:
        return [old[old.index(HANDWRITTEN_BEGIN):old.index(HANDWRITTEN_END) + len(HANDWRITTEN_END)], ""]
    return [HANDWRITTEN_BEGIN, "## Reading", "", "(to be written from the numbers above)", HANDWRITTEN_END, ""]


def _budget_and_command(config: LowFlopsTrapConfig, numbers: dict[str, Any], invocation: str,
                        sessions: list[dict[str, Any]]) -> list[str]:
    """Measured wall time and load of every session, training time per run, and the commands."""
    fractions = numbers["fractions"]
    lines = ["## Budget (measured)", ""]
    for s in sessions:
        load = s.get("load_1min") or {}
        lines.append(f"- `{s['invocation']}` started {s['started']}: {s['wall_s']} s wall for {len(s['runs'])} "
                     f"run(s), {s['workers']} worker(s) x {s['threads_per_process']} thread(s) on {s['cpu_count']} "
                     f"CPUs; 1-min load average mean {load.get('mean')} (min {load.get('min')}, max "
                     f"{load.get('max')}, {load.get('samples')} samples every {load.get('every_s')} s), this "
                     "runner's workers included.")
    return lines + [
        "",
        "| model | " + " | ".join(f"training time per run, {100 * f:g}% (s)" for f in fractions) + " |",
        "|---|" + "---:|" * len(fractions),
        *[f"| {m['name']} | " + " | ".join(f"{m['cells'][str(f)]['train_time_s']:.0f}" for f in fractions) + " |"
          for m in numbers["models"]],
        "",
        "## Command",
        "",
        "```bash",
        invocation,
        "```",
        "",
        "Re-running it skips finished runs and continues an interrupted one from its last checkpoint. One run "
        "alone, as the runner trains it: `python scripts/train_vision.py --config "
        f"{config.base_config} "
        + " ".join(f"{k}={shlex.quote(yaml_value(v))}" for k, v in config.train_overrides.items())
        + f" model=<file> seed=<seed> data.train_subset.fraction=<share> data.train_subset.seed={config.subset_seed} "
        f"cpu_threads={config.threads_per_process} output_dir=<dir>`.",
        "",
    ]


def write_report(config: LowFlopsTrapConfig, runs: list[Run], numbers: dict[str, Any], invocation: str) -> None:
    """The markdown report (sections above), its JSON with every number, and the plot."""
    report = Path(config.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    png = report.with_suffix(".png")
    plot(numbers, png)
    subsets = subset_summaries(config, runs)
    sessions_path = Path(config.output_root) / SESSIONS_FILE
    sessions = read_json(sessions_path) if sessions_path.is_file() else []
    lines = (_header_and_setup(config, runs, numbers, invocation, subsets) + _results(config, runs, numbers, png)
             + _handwritten(report) + _budget_and_command(config, numbers, invocation, sessions))
    report.write_text("\n".join(lines), encoding="utf-8")
    summary = {"invocation": invocation, "config": config.to_dict(), "subsets": subsets, "sessions": sessions,
               **numbers}
    report.with_suffix(".json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"wrote {report}, {report.with_suffix('.json')}, {png}")


# ------------------------------------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = config_argument_parser("low_flops_trap.py", __doc__.split("\n\n")[0], LowFlopsTrapConfig)
    parser.add_argument("--config", required=True, help="configs/replicate/low-flops-trap.yaml")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    args = parser.parse_intermixed_args(argv)
    config = load_trap_config(args.config, args.overrides)
    runs = config.runs()
    invocation = shlex.join(["python", "scripts/low_flops_trap.py", *(argv if argv is not None else sys.argv[1:])])
    os.environ.setdefault("OMP_NUM_THREADS", str(config.threads_per_process))  # inherited by the workers
    check_writable_file(config.report, "report")
    with exclusive_output(config.output_root):  # one runner per output root
        execute(config, runs, invocation)
        numbers = collect(config, runs)
        write_report(config, runs, numbers, invocation)
    return numbers


def cli(argv: list[str] | None = None) -> None:
    run_command("low_flops_trap", main, argv)


if __name__ == "__main__":
    cli()
