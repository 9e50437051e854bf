"""Replicate the paper's Table 7 at small scale: dense LLaMA vs ParameterNet rows at equal active FLOPs.

    python scripts/replicate_table7.py --config configs/replicate/table7-cpu.yaml [--rows dense,up-e8] [key=value ...]

The config is `ReplicateConfig` (typed and validated like every pnet config: unknown keys and bad values fail
before anything runs, and so does the pretraining config every row will get). For every row (a dense LLaMA and
PNet-LLaMA versions with ``num_experts`` experts on ``moe_projections``) the runner

1. derives the row's model file from ``base_model`` (dense: unchanged; MoE: ``model_type`` pnet_llama plus the
   ``moe`` router settings, ``num_experts`` and ``moe_projections``) -> ``<output_root>/models/<row>.json``;
2. pretrains it with `pnet.pretrain`: the ``base_config`` with ``model=<row json> output_dir=<output_root>/<row>
   <pretrain_overrides>``, in this process (``launcher`` null) or as ``<launcher> -m pnet.pretrain ...`` (e.g.
   ``accelerate launch --config_file ...`` for 2 processes). Every row gets the same base config and overrides,
   hence the same data, data order (checked afterwards from the logged batch checksums), seeds, batch and schedule;
   only the model file differs;
3. evaluates zero-shot ARC-e / BoolQ / HellaSwag with `pnet_eval.zero_shot.evaluate` (``zero_shot`` section);
4. optionally fine-tunes SST-2 with `pnet.finetune` (``sst2`` section: settings of `FinetuneSst2Config`);

then collects everything with `pnet_eval.report` and writes ``report`` (markdown), its ``.json`` (all numbers per
row), ``<report stem>-val-loss.png`` (validation loss vs tokens, all rows) and ``<report stem>-expert-load.png``
(expert load per router over training for ``plots.expert_load_row``).

Resumable: each row keeps ``<output_root>/<row>/replicate_state.json`` (stages finished); finished stages are skipped,
and a pretraining run that left checkpoints is continued with ``--resume``, which refuses to continue it with other
settings than it was started with. ``key=value`` overrides use dotted keys and YAML values (``output_root=runs/pilot
zero_shot.limit=50``); ``pretrain_overrides.<key>=value`` / ``sst2.overrides.<key>=value`` set one setting there.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Annotated, Any

import torch
import yaml
from pydantic import Field, model_validator

from pnet import finetune, pretrain
from pnet import run_log as L
from pnet.checkpoint import list_checkpoints, setting_differences, write_json_atomic
from pnet.config import (
    ConfigError,
    ConfigModel,
    FinetuneSst2Config,
    PretrainConfig,
    apply_overrides,
    config_argument_parser,
    parse_config,
    read_yaml,
    yaml_value,
)
from pnet.counting import count_config
from pnet.llama_counting import DEFAULT_SEQ_LEN
from pnet.model_loading import check_config_keys, config_class
from pnet.plots import plot_expert_load_stacked
from pnet.run_lock import check_writable_file, exclusive_output
from pnet.training import run_command

PROJECTIONS = ("gate", "up", "down")
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STATE_FILE = "replicate_state.json"
SECTIONS_OF_DOTTED_KEYS = ("pretrain_overrides", "sst2.overrides")


class RowConfig(ConfigModel):
    """One Table 7 row: ``num_experts`` 0 is the dense LLaMA baseline."""

    name: Annotated[str, Field(pattern=ROW_NAME.pattern)]
    """names the row's folder"""
    num_experts: Annotated[int, Field(strict=True, ge=0)]
    """0: dense; else >= 2 experts per routed projection"""
    moe_projections: list[str] = Field(default_factory=list)
    """routed FFN projections, from gate / up / down"""

    @model_validator(mode="after")
    def _check(self) -> RowConfig:
        where = f"row {self.name!r}"
        if self.num_experts == 1:
            raise ValueError(f"{where}: num_experts must be 0 (dense) or an integer >= 2, got 1")
        bad = [p for p in self.moe_projections if p not in PROJECTIONS]
        if bad:
            raise ValueError(f"{where}: moe_projections {bad} not in {list(PROJECTIONS)}")
        if self.num_experts and not self.moe_projections:
            raise ValueError(f"{where}: num_experts {self.num_experts} needs moe_projections from {list(PROJECTIONS)}")
        if not self.num_experts and self.moe_projections:
            raise ValueError(f"{where}: a dense row (num_experts 0) takes no moe_projections")
        return self


class ZeroShotSettings(ConfigModel):
    """Arguments of `pnet_eval.zero_shot.evaluate` (``pnet-eval``)."""

    tasks: Annotated[list[str], Field(min_length=1)]
    data_dir: str | None = None
    """null: the Hub (or the bundled copy when HF_HUB_OFFLINE is set); "bundled": eval/data"""
    limit: Annotated[float, Field(gt=0)] | None = None
    """documents per task (>= 1) or a fraction (< 1)"""
    batch_size: Annotated[int, Field(strict=True, gt=0)] = 1


class PerplexityStage(ConfigModel):
    """Held-out perplexity of every row's final model (`pnet_eval.perplexity.evaluate_perplexity`, the same as
    ``pnet-eval DIR --perplexity FILE ...``); `pnet-report` adds its figures as columns."""

    files: list[str] = Field(default_factory=list)
    """texts to score (jsonl with a text field, or plain text; "heldout": the bundled held-out text); empty: skip"""
    max_length: Annotated[int, Field(strict=True, gt=0)] | None = None
    """rolling-window length in tokens (null: the model's context length)"""
    prefix_token_id: Annotated[int, Field(strict=True, ge=0)] | None = None
    """token that conditions each document's first window (null: lm-eval's default, BOS)"""
    batch_size: Annotated[int, Field(strict=True, gt=0)] = 1


class Sst2Stage(ConfigModel):
    """Whether and how to fine-tune SST-2 (`pnet.finetune`)."""

    enabled: bool = False
    overrides: dict[str, Any] = Field(default_factory=dict)
    """settings of FinetuneSst2Config as {dotted key: value} (model and output_dir are set per row)"""


class PlotSettings(ConfigModel):
    expert_load_row: str | None = None
    """an MoE row whose expert load per router is plotted over training (null: none)"""
    loss_window: Annotated[int, Field(strict=True, gt=0)] = 1
    """training loss = mean LM loss over the last N log records"""


class ReplicateConfig(ConfigModel):
    """Everything the Table 7 runner does, from one YAML file."""

    output_root: str
    """one folder per row: <output_root>/<row>/{log.jsonl,final/,...}"""
    report: str
    """markdown report (+ .json and two PNGs next to it)"""
    launcher: list[str] | None = None
    """command that launches `pnet.pretrain` as ``<launcher> -m pnet.pretrain ...`` (e.g. accelerate launch
    --config_file ...); null: pretrain in this process"""
    threads_per_process: Annotated[int, Field(strict=True, gt=0)] = 1
    """torch / OMP threads of every training and evaluation process"""
    base_config: str
    """pretraining config every row starts from"""
    base_model: str
    """dense model file (model_type llama) every row derives from"""
    rows: Annotated[list[RowConfig], Field(min_length=1)]
    zero_shot: ZeroShotSettings
    pretrain_overrides: dict[str, Any] = Field(default_factory=dict)
    """pretraining settings for every row, {dotted key: value}"""
    moe: dict[str, Any] = Field(default_factory=dict)
    """PNetLlamaConfig router settings of the MoE rows"""
    perplexity: PerplexityStage = Field(default_factory=PerplexityStage)
    sst2: Sst2Stage = Field(default_factory=Sst2Stage)
    plots: PlotSettings = Field(default_factory=PlotSettings)

    @model_validator(mode="after")
    def _check(self) -> ReplicateConfig:
        for key in ("base_config", "base_model"):
            if not os.path.isfile(getattr(self, key)):
                raise ValueError(f"{key} {getattr(self, key)!r} not found (relative to {os.getcwd()})")
        for key in ("model", "output_dir", "init_from"):
            if key in self.pretrain_overrides:
                raise ValueError(f"pretrain_overrides must not set {key!r}: the runner sets it per row")
        for key in ("model", "output_dir"):
            if key in self.sst2.overrides:
                raise ValueError(f"sst2.overrides must not set {key!r}: the runner sets it per row")
        fixed = sorted({"model_type", "architectures", "num_experts", "moe_projections"} & set(self.moe))
        if fixed:
            raise ValueError(f"moe must not set {fixed}: they come from each row")
        check_config_keys(self.moe, config_class("pnet_llama"), "moe")
        names = [row.name for row in self.rows]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"row names must be unique; repeated: {duplicates}")
        moe_rows = [row.name for row in self.rows if row.num_experts]
        if self.plots.expert_load_row is not None and self.plots.expert_load_row not in moe_rows:
            raise ValueError(f"plots.expert_load_row {self.plots.expert_load_row!r} is not an MoE row; "
                             f"allowed: {moe_rows} or null")
        return self

    # ---- what every row runs, validated up front
    def pretrain_config(self, model: str, output_dir: str) -> PretrainConfig:
        """The row's pretraining config: base config + model + output_dir + pretrain_overrides."""
        values = read_yaml(self.base_config)
        values.update(model=model, output_dir=output_dir)
        apply_overrides(values, [f"{k}={yaml_value(v)}" for k, v in self.pretrain_overrides.items()])
        return parse_config(PretrainConfig, values, f"{self.base_config} with pretrain_overrides")

    def finetune_config(self, model: str) -> FinetuneSst2Config:
        values = {"model": model}
        apply_overrides(values, [f"{k}={yaml_value(v)}" for k, v in self.sst2.overrides.items()])
        return parse_config(FinetuneSst2Config, values, "sst2.overrides")

    def check_stages(self) -> None:
        """Validate the pretraining and fine-tuning settings every row will get, before anything runs."""
        self.pretrain_config(self.base_model, self.output_root)
        if self.sst2.enabled:
            self.finetune_config(self.output_root)


def load_replicate_config(path: str | os.PathLike, overrides: list[str] = ()) -> ReplicateConfig:
    """Read the YAML, apply ``key=value`` overrides and check it, including the stages' own configs.
    ``pretrain_overrides.<key>`` and ``sst2.overrides.<key>`` take the rest of the key whole (a dotted key)."""
    values = read_yaml(path)
    for override in overrides:
        key, equals, raw = override.partition("=")
        section = next((s for s in SECTIONS_OF_DOTTED_KEYS if key.startswith(f"{s}.")), None)
        if section is None or not equals:
            apply_overrides(values, [override])
            continue
        node = values
        for part in section.split("."):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        node[key[len(section) + 1:]] = yaml.safe_load(raw)
    config = parse_config(ReplicateConfig, values, str(path))
    config.check_stages()
    return config


def select_rows(config: ReplicateConfig, names: str | None) -> list[RowConfig]:
    """The rows named in ``--rows`` (comma-separated), in config order; all rows when None."""
    if names is None:
        return list(config.rows)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [row.name for row in config.rows]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ConfigError(f"--rows: unknown row(s) {unknown or wanted}; allowed: {known}")
    return [row for row in config.rows if row.name in wanted]


def derive_model(base_model: dict[str, Any], row: RowConfig, moe: dict[str, Any]) -> dict[str, Any]:
    """The row's config.json-style model dict: the dense base, or its PNet version (same sizes, routed FFN)."""
    if base_model.get("model_type") != "llama":
        raise ConfigError(f"base_model must be a dense model_type 'llama' file, got {base_model.get('model_type')!r}")
    model = dict(base_model)
    if row.num_experts:
        model.update(model_type="pnet_llama", architectures=["PNetLlamaForCausalLM"], **moe,
                     num_experts=row.num_experts, moe_projections=list(row.moe_projections))
    return model


# ---------------------------------------------------------------------------------------------------- stages

def pretrain_arguments(config: ReplicateConfig, model_path: Path, run_dir: Path) -> list[str]:
    """`pnet.pretrain` arguments of a row (the same for every row apart from model= and output_dir=)."""
    return ["--config", config.base_config, f"model={model_path}", f"output_dir={run_dir}",
            *[f"{key}={yaml_value(value)}" for key, value in config.pretrain_overrides.items()]]


def pretrain_command(config: ReplicateConfig, model_path: Path, run_dir: Path) -> list[str]:
    """The command line that runs (or, in this process, is equivalent to) a row's pretraining."""
    launcher = config.launcher or ["python"]
    return [*launcher, "-m", "pnet.pretrain", *pretrain_arguments(config, model_path, run_dir)]


def zero_shot_command(config: ReplicateConfig, model_dir: Path) -> list[str]:
    """The ``pnet-eval`` command equivalent to the zero-shot stage (for the report)."""
    zs = config.zero_shot
    command = ["pnet-eval", str(model_dir), "--tasks", ",".join(zs.tasks), "--batch-size", str(zs.batch_size)]
    if zs.data_dir is not None:
        command += ["--data-dir", zs.data_dir]
    if zs.limit is not None:
        command += ["--limit", f"{zs.limit:g}"]
    return command


def perplexity_command(config: ReplicateConfig, model_dir: Path) -> list[str]:
    """The ``pnet-eval --perplexity`` command equivalent to the perplexity stage (for the report)."""
    stage = config.perplexity
    command = ["pnet-eval", str(model_dir), "--perplexity", *stage.files, "--batch-size", str(stage.batch_size)]
    if stage.max_length is not None:
        command += ["--max-length", str(stage.max_length)]
    if stage.prefix_token_id is not None:
        command += ["--prefix-token-id", str(stage.prefix_token_id)]
    return command


def sst2_command(config: ReplicateConfig, model_dir: Path) -> list[str]:
    return ["python", "scripts/finetune_sst2.py", str(model_dir),
            *[f"{key}={yaml_value(value)}" for key, value in config.sst2.overrides.items()]]


def evaluation_stages(config: ReplicateConfig, model_dir: Path) -> list[tuple[str, list[str]]]:
    """(stage name, equivalent command) of each stage after pretraining that the config enables, in run order."""
    stages = [("zero_shot", zero_shot_command(config, model_dir))]
    if config.perplexity.files:
        stages.append(("perplexity", perplexity_command(config, model_dir)))
    if config.sst2.enabled:
        stages.append(("sst2", sst2_command(config, model_dir)))
    return stages


def command_env(threads: int) -> dict[str, str]:
    """Environment of a launched pretraining: this interpreter's environment first on PATH (so ``accelerate`` is the
    one installed with this package), ``threads`` threads per process."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def run_pretraining(config: ReplicateConfig, model_path: Path, run_dir: Path, resume: bool) -> None:
    """Pretrain a row in this process, or through ``launcher`` (a failure stops the runner naming the command)."""
    arguments = pretrain_arguments(config, model_path, run_dir) + (["--resume"] if resume else [])
    print("$ " + shlex.join(pretrain_command(config, model_path, run_dir) + (["--resume"] if resume else [])),
          flush=True)
    if not config.launcher:
        pretrain.train(config.pretrain_config(str(model_path), str(run_dir)), resume=resume)
        return
    env = command_env(config.threads_per_process)
    if shutil.which(config.launcher[0], path=env["PATH"]) is None:
        raise FileNotFoundError(f"launcher {config.launcher[0]!r} not found on PATH")
    result = subprocess.run([*config.launcher, "-m", "pnet.pretrain", *arguments], env=env)
    if result.returncode != 0:
        raise RuntimeError(f"pretraining failed with exit status {result.returncode}: "
                           f"{shlex.join(pretrain_command(config, model_path, run_dir))}")


def read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"done": []}


def run_sst2(config: FinetuneSst2Config) -> None:
    """Fine-tune SST-2, continuing from the checkpoints a killed runner left."""
    finetune.train(config, resume=bool(list_checkpoints(finetune.output_dir_of(config))))


# Settings of a finished row that may differ when the runner is run again (they change no figure of the report).
FREE_ON_RERUN = ("cpu_threads", "tensorboard", "keep_last", "log_every")


def check_finished_stage(run_dir: Path, stage: str, saved: Any, now: Any) -> None:
    """A stage that finished earlier is skipped only with the settings it ran with: the report would otherwise state
    today's settings beside figures made with others. State files written before this check saved none: skipped."""
    if saved is None:
        return
    now = json.loads(json.dumps(now))  # as the state file holds it (tuples become lists)
    old, new = (v if isinstance(v, dict) else {"command": v} for v in (saved, now))
    differences = setting_differences(old, new, free=FREE_ON_RERUN)
    if differences:
        lines = "\n".join(f"  {key}: {a!r} there, {b!r} now" for key, (a, b) in differences.items())
        raise ConfigError(f"{run_dir}: its {stage} finished earlier with other settings:\n{lines}\nRemove that row's "
                          "folder to run it again with these, or choose another output_root")


def run_row(config: ReplicateConfig, row: RowConfig) -> None:
    """Pretrain, evaluate and (optionally) fine-tune one row, skipping the stages already done."""
    from pnet_eval.perplexity import evaluate_perplexity
    from pnet_eval.zero_shot import evaluate

    root = Path(config.output_root)
    run_dir = root / row.name
    model_path = root / "models" / f"{row.name}.json"
    with open(config.base_model, encoding="utf-8") as f:
        model = derive_model(json.load(f), row, config.moe)
    state = read_state(run_dir)

    def pretrain_settings() -> dict[str, Any]:  # (the pretraining config checks that the model file exists)
        return {"model": model, "pretrain": config.pretrain_config(str(model_path), str(run_dir)).to_dict()}

    if "pretrain" in state["done"]:
        check_finished_stage(run_dir, "pretraining", state.get("settings", {}).get("pretrain"), pretrain_settings())
        print(f"[{row.name}] pretraining finished earlier: skipped", flush=True)
    else:
        checkpoints = list_checkpoints(run_dir)
        if checkpoints:  # pnet.pretrain --resume refuses settings that differ from the checkpoint's
            print(f"[{row.name}] continuing pretraining from {checkpoints[-1][1].name}", flush=True)
        else:
            model_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(model_path, model)
            run_dir.mkdir(parents=True, exist_ok=True)
        state["pretrain_command"] = pretrain_command(config, model_path, run_dir)
        state["pretrain_config"] = config.pretrain_config(str(model_path), str(run_dir)).to_dict()
        run_pretraining(config, model_path, run_dir, resume=bool(checkpoints))
        state["done"].append("pretrain")
        state.setdefault("settings", {})["pretrain"] = pretrain_settings()
        write_json_atomic(run_dir / STATE_FILE, state)

    final = run_dir / "final"
    zs, ppl = config.zero_shot, config.perplexity
    limit = int(zs.limit) if zs.limit is not None and zs.limit >= 1 else zs.limit
    # A stage runs again only when the runner's state says it did not finish: its earlier files are partial.
    runners = {
        "zero_shot": lambda: evaluate(str(final), tasks=zs.tasks, data_dir=zs.data_dir, limit=limit,
                                      batch_size=zs.batch_size, overwrite=True),
        "perplexity": lambda: evaluate_perplexity(str(final), ppl.files, max_length=ppl.max_length,
                                                  batch_size=ppl.batch_size, prefix_token_id=ppl.prefix_token_id,
                                                  overwrite=True),
        "sst2": lambda: run_sst2(config.finetune_config(str(final))),
    }
    for name, command in evaluation_stages(config, final):
        if name in state["done"]:
            check_finished_stage(run_dir, name, state.get("settings", {}).get(name), command)
            print(f"[{row.name}] {name} finished earlier: skipped", flush=True)
            continue
        print("$ " + shlex.join(command), flush=True)
        runners[name]()
        state["done"].append(name)
        state.setdefault("settings", {})[name] = command
        write_json_atomic(run_dir / STATE_FILE, state)


# ------------------------------------------------------------------------------------------------------ results

def row_results(config: ReplicateConfig, row: RowConfig, report_row: dict[str, Any]) -> dict[str, Any]:
    """Numbers of one finished row: counts, losses, validation curve, data checksums, expert load."""
    run_dir = Path(config.output_root) / row.name
    records = L.read_log(run_dir / L.LOG_FILE)
    train, evals = L.train_records(records), L.val_records(records)
    if not train or not evals:
        raise ValueError(f"[{row.name}] {run_dir / L.LOG_FILE} has no training or validation records")
    tokens_at = {r[L.STEP]: r[L.TOKENS] for r in train}
    tokens_per_step = train[0][L.TOKENS] // train[0][L.STEP]
    counts = count_config(str(run_dir / "final"))
    final_val = evals[-1][L.VAL_LOSS]
    loads = [r for r in train if L.EXPERT_LOAD in r]
    return {
        **report_row,
        "row": row.name,
        "router_flops": counts.details.get("router_flops", 0),
        "flops_per_token": counts.flops / DEFAULT_SEQ_LEN,
        "steps": train[-1][L.STEP],
        "tokens": train[-1][L.TOKENS],
        "final_lm_loss_window": train[-1][L.LM_LOSS],
        "final_aux_loss_window": train[-1][L.AUX_LOSS],
        "val_loss": final_val,
        "val_loss_mean": sum(final_val.values()) / len(final_val),
        "val_curve": [{"tokens": tokens_at.get(r[L.STEP], r[L.STEP] * tokens_per_step), "val_loss": r[L.VAL_LOSS]}
                      for r in evals],
        "batch_crc32": {str(r[L.STEP]): r[L.BATCH_CRC32] for r in train},
        "expert_load": [{"tokens": r[L.TOKENS], "load": r[L.EXPERT_LOAD]} for r in loads],
        "router_names": loads[0][L.ROUTER_NAMES] if loads else [],
        "expert_load_window": loads[0][L.LOAD_WINDOW][1] - loads[0][L.LOAD_WINDOW][0] + 1 if loads else None,
        "pretrain_config": read_state(run_dir).get("pretrain_config"),
        "pretrain_command": read_state(run_dir).get("pretrain_command"),
    }


def data_order_check(rows: list[dict[str, Any]]) -> str:
    """Whether every row logged the same batch checksum at every logged step (same tokens, same order)."""
    reference = rows[0]["batch_crc32"]
    different = [r["row"] for r in rows[1:] if r["batch_crc32"] != reference]
    if different:
        return (f"DIFFERENT data: rows {different} logged other batch checksums than {rows[0]['row']!r} - "
                "the rows are not comparable")
    return (f"identical: all {len(rows)} rows logged the same batch checksum (CRC32 of the token ids) at each of "
            f"the {len(reference)} logged steps")


def settings_check(rows: list[dict[str, Any]]) -> str:
    """Whether the rows were pretrained with the same resolved config apart from ``model`` and ``output_dir``."""
    def shared(config: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if config is None else {k: v for k, v in config.items() if k not in ("model", "output_dir")}

    configs = [shared(r["pretrain_config"]) for r in rows]
    if configs[0] is None or any(c != configs[0] for c in configs[1:]):
        return "DIFFERENT pretraining settings across rows (see Commands run) - the rows are not comparable"
    command = [a for a in rows[0]["pretrain_command"] if not a.startswith(("model=", "output_dir="))]
    return f"identical for every row apart from `model=` and `output_dir=`: `{shlex.join(command)}`"


def plot_val_loss(rows: list[dict[str, Any]], png_path: Path) -> None:
    """Validation loss vs training tokens, one line per row; a panel for the domain mean and one per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    domains = list(rows[0]["val_loss"])
    panels = ["mean"] + domains
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4), squeeze=False)
    colors = {"": "black", "gate": "tab:blue", "up": "tab:orange", "down": "tab:green"}
    for ax, panel in zip(axes[0], panels):
        for row in rows:
            projections = "+".join(row.get("moe_projections") or [])
            style = "-" if (row.get("num_experts") or 0) >= 8 or not projections else "--"
            tokens = [point["tokens"] for point in row["val_curve"]]
            values = [sum(p["val_loss"].values()) / len(p["val_loss"]) if panel == "mean" else p["val_loss"][panel]
                      for p in row["val_curve"]]
            ax.plot(tokens, values, style, color=colors.get(projections, "tab:gray"), lw=1.3, marker="o", ms=2.5,
                    label=row["row"])
        ax.set_title(f"validation LM loss: {panel}" + (" of domains" if panel == "mean" else ""), fontsize=10)
        ax.set_xlabel("training tokens")
        ax.xaxis.set_major_formatter(EngFormatter())
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("cross-entropy (nats/token)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def comparison_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Each MoE row's final mean validation loss against dense (numbers only; the reading is the reader's)."""
    dense = next((r for r in rows if not r.get("num_experts")), None)
    if dense is None:
        return ["No dense row in this run: no comparison."]
    lines = []
    for r in rows:
        if r is dense:
            continue
        delta = r["val_loss_mean"] - dense["val_loss_mean"]
        lines.append(f"- {r['row']}: mean val loss {r['val_loss_mean']:.3f} vs dense {dense['val_loss_mean']:.3f} "
                     f"({delta:+.3f} nats, {'lower' if delta < 0 else 'not lower'}); total params "
                     f"{r['total_params'] / dense['total_params']:.2f}x dense, active FLOPs "
                     f"{r['flops'] / dense['flops']:.3f}x dense")
    return lines


def write_report(config: ReplicateConfig, rows: list[dict[str, Any]], pnet_report_md: str, commands: list[str],
                 invocation: str) -> None:
    report = Path(config.report)
    report.parent.mkdir(parents=True, exist_ok=True)
    val_png = report.with_name(f"{report.stem}-val-loss.png")
    load_png = report.with_name(f"{report.stem}-expert-load.png")
    plot_val_loss(rows, val_png)
    load_row = next((r for r in rows if r["row"] == config.plots.expert_load_row), None)
    if load_row is not None:
        plot_expert_load_stacked(
            load_row["expert_load"], load_row["router_names"],
            f"Expert load per router over training: {load_row['row']}\neach expert's share of the tokens of each "
            f"{load_row['expert_load_window']}-step log window (equal bands = uniform)", load_png)
    domains = list(rows[0]["val_loss"])
    moe_row = next((r for r in rows if r.get("num_experts")), None)
    moe_settings = {}
    if moe_row is not None:
        run_model = json.loads((Path(config.output_root) / "models" / f"{moe_row['row']}.json").read_text())
        moe_settings = {key: run_model.get(key) for key in config.moe}
    lines = [
        "# Table 7 at CPU scale: dense LLaMA vs ParameterNet at equal active FLOPs",
        "",
        f"Generated by `{invocation}` on {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC "
        f"({len(rows)} of {len(config.rows)} configured rows).",
        "",
        "## Setup",
        "",
        f"- Base model `{config.base_model}`; MoE rows add `num_experts` experts on `moe_projections` with "
        f"`{json.dumps(moe_settings)}` (as run: from the rows' model files).",
        f"- Pretraining: {settings_check(rows)}; {config.threads_per_process} thread(s) per process.",
        f"- Tokens per row: {rows[0]['tokens']:,} ({rows[0]['steps']} steps).",
        f"- Data order: {data_order_check(rows)}.",
        f"- Zero-shot: `{json.dumps(config.zero_shot.to_dict())}`; SST-2 fine-tuning: "
        + (f"`{json.dumps(config.sst2.overrides)}`" if config.sst2.enabled else "off") + ".",
        "",
        "## Table 7 layout (`pnet-report`)",
        "",
        pnet_report_md.strip(),
        "",
        "## Losses, parameters and FLOPs per row",
        "",
        "| Row | #Expert | Total params | Active params | FLOPs/token | Router FLOPs/token | Tokens | "
        "Train LM loss (last window) | " + " | ".join(f"Val {d}" for d in domains) + " | Val mean |",
        "|---|---|" + "---:|" * (7 + len(domains)),
    ]
    for r in rows:
        experts = f"{r['num_experts']} ({'+'.join(r['moe_projections'])})" if r.get("num_experts") else "-"
        lines.append(
            f"| {r['row']} | {experts} | {r['total_params']:,} | {r['active_params']:,} | "
            f"{r['flops_per_token']:,.0f} | "
            f"{r['router_flops'] / DEFAULT_SEQ_LEN:,.0f} | {r['tokens']:,} | {_fmt(r['final_lm_loss_window'])} | "
            + " | ".join(_fmt(r["val_loss"][d]) for d in domains) + f" | {_fmt(r['val_loss_mean'])} |")
    lines += [
        "",
        f"FLOPs/token = the `pnet-count` forward FLOPs of one {DEFAULT_SEQ_LEN}-token sequence / {DEFAULT_SEQ_LEN} "
        "(routers listed separately). Val = LM loss on the fixed validation sequences after the last step.",
        "",
        "## Comparison with dense (final validation loss, mean of domains)",
        "",
        *comparison_lines(rows),
        "",
        "## Plots",
        "",
        f"![validation loss vs tokens]({val_png.name})",
        "",
    ]
    if load_row is not None:
        lines += [f"![expert load of {load_row['row']}]({load_png.name})", ""]
    lines += ["## Commands run (or their command-line equivalents)", "", "```bash", *commands, "```", ""]
    report.write_text("\n".join(lines), encoding="utf-8")
    summary = {"invocation": invocation, "config": config.to_dict(), "data_order": data_order_check(rows),
               "pretrain_settings": settings_check(rows), "rows": rows}
    report.with_suffix(".json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"wrote {report}, {report.with_suffix('.json')}, {val_png}" + (f", {load_png}" if load_row else ""))


# ------------------------------------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> None:
    from pnet_eval.report import build_table, load_model_results, render_markdown

    parser = config_argument_parser("replicate_table7.py", __doc__.split("\n\n")[0], ReplicateConfig)
    parser.add_argument("--config", required=True, help="configs/replicate/<name>.yaml")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all rows of the config)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    args = parser.parse_intermixed_args(argv)
    config = load_replicate_config(args.config, args.overrides)
    rows = select_rows(config, args.rows)
    check_writable_file(config.report, "report")
    with exclusive_output(config.output_root):  # one runner per output root
        invocation = shlex.join(["python", "scripts/replicate_table7.py", *(argv if argv is not None else sys.argv[1:])])
        torch.set_num_threads(config.threads_per_process)  # the stages that run in this process
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

        for row in rows:
            run_row(config, row)

        root = Path(config.output_root)
        finals = [root / row.name / "final" for row in rows]
        report_md = root / "pnet-report.md"
        table = build_table([load_model_results(final, loss_window=config.plots.loss_window) for final in finals])
        markdown = render_markdown(table)
        report_md.write_text(markdown, encoding="utf-8")
        report_md.with_suffix(".json").write_text(json.dumps(table, indent=2), encoding="utf-8")
        results = [row_results(config, row, report_row) for row, report_row in zip(rows, table["rows"])]
        commands = []
        for row in rows:
            commands.append(shlex.join(read_state(root / row.name)["pretrain_command"]))
            commands += [shlex.join(command) for _, command in evaluation_stages(config, root / row.name / "final")]
        commands.append(shlex.join(["pnet-report", *map(str, finals), "--out", str(report_md), "--loss-window",
                                    str(config.plots.loss_window)]))
        write_report(config, results, markdown, commands, invocation)


def cli(argv: list[str] | None = None) -> None:
    run_command("replicate_table7", main, argv)


if __name__ == "__main__":
    cli()
