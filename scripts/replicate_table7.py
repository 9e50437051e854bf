"""Replicate the paper's Table 7 at small scale: dense LLaMA vs ParameterNet rows at equal active FLOPs.

    python scripts/replicate_table7.py --config configs/replicate/table7-cpu.yaml [--rows dense,up-e8] [key=value ...]

Run it from the repository root (the configs' paths are relative to it). For every row of the config (a dense
LLaMA and PNet-LLaMA versions with ``num_experts`` experts on ``moe_projections``) the runner

1. derives the row's model file from ``base_model`` (dense: unchanged; MoE: ``model_type`` pnet_llama plus the
   ``moe`` router settings, ``num_experts`` and ``moe_projections``) -> ``<output_root>/models/<row>.json``;
2. pretrains it with the command a user would type,
   ``accelerate launch ... scripts/pretrain.py --config <base_config> model=<row json> output_dir=<output_root>/<row>
   <pretrain_overrides>`` - every row gets the same base config and overrides, hence the same data, data order
   (checked afterwards from the logged batch checksums), seeds, batch and schedule; only the model file differs;
3. evaluates zero-shot ARC-e / BoolQ / HellaSwag with ``pnet-eval`` (``zero_shot`` section);
4. optionally fine-tunes SST-2 with ``scripts/finetune_sst2.py`` (``sst2`` section);

then collects everything with ``pnet-report`` and writes ``report`` (markdown), its ``.json`` (all numbers per
row), ``<report stem>-val-loss.png`` (validation loss vs tokens, all rows) and ``<report stem>-expert-load.png``
(expert load per router over training for ``plots.expert_load_row``).

Resumable: each row keeps ``<output_root>/<row>/replicate_state.json`` (stages finished, the exact pretraining
command); finished stages are skipped, and a pretraining run that left checkpoints is continued with ``--resume``.
``key=value`` overrides use dotted keys and YAML values (``output_root=runs/pilot zero_shot.limit=50``);
``pretrain_overrides.<key>=value`` sets one pretraining override (``pretrain_overrides.max_steps=40``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pnet.counting import count_config
from pnet.data import dataclass_from_dict
from pnet.llama_counting import DEFAULT_SEQ_LEN
from pnet.train_utils import (
    list_checkpoints,
    load_config,
    read_jsonl,
    read_yaml_with_overrides,
    write_json_atomic,
)

PRETRAIN_SCRIPT = "scripts/pretrain.py"  # paths relative to the repository root, where the runner runs
FINETUNE_SST2_SCRIPT = "scripts/finetune_sst2.py"
PROJECTIONS = ("gate", "up", "down")
ROW_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
STATE_FILE = "replicate_state.json"


@dataclass
class RowConfig:
    """One Table 7 row: ``num_experts`` 0 is the dense LLaMA baseline."""

    name: str
    num_experts: int
    moe_projections: list[str] = field(default_factory=list)


@dataclass
class ZeroShotConfig:
    """Arguments of ``pnet-eval``."""

    tasks: list[str]
    data_dir: str | None = None  # None: the Hub (or the bundled copy when HF_HUB_OFFLINE is set)
    limit: int | float | None = None
    batch_size: int = 1


@dataclass
class Sst2Config:
    """Whether and how to run ``scripts/finetune_sst2.py`` (its command-line arguments, verbatim)."""

    enabled: bool = False
    args: list[str] = field(default_factory=list)


@dataclass
class PlotConfig:
    expert_load_row: str | None = None  # an MoE row; None: no expert-load plot
    loss_window: int = 1  # training loss = mean LM loss over the last N log records (pnet-report --loss-window)


@dataclass
class ReplicateConfig:
    """Everything the runner does, from one YAML file (unknown keys are errors)."""

    output_root: str
    report: str
    launcher: list[str]
    base_config: str
    base_model: str
    rows: list[RowConfig]
    zero_shot: ZeroShotConfig
    threads_per_process: int = 1
    pretrain_overrides: dict[str, Any] = field(default_factory=dict)
    moe: dict[str, Any] = field(default_factory=dict)
    sst2: Sst2Config = field(default_factory=Sst2Config)
    plots: PlotConfig = field(default_factory=PlotConfig)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "ReplicateConfig":
        values = dict(values)
        if not isinstance(values.get("rows"), list) or not values["rows"]:
            raise ValueError("config: 'rows' must be a non-empty list of {name, num_experts, moe_projections}")
        values["rows"] = [dataclass_from_dict(RowConfig, row, f"rows[{i}]") for i, row in enumerate(values["rows"])]
        if "zero_shot" not in values:
            raise ValueError("config has no 'zero_shot' section")
        values["zero_shot"] = dataclass_from_dict(ZeroShotConfig, values["zero_shot"], "zero_shot")
        values["sst2"] = dataclass_from_dict(Sst2Config, values.get("sst2") or {}, "sst2")
        values["plots"] = dataclass_from_dict(PlotConfig, values.get("plots") or {}, "plots")
        return dataclass_from_dict(cls, values, "config")

    def check(self) -> None:
        """Raise naming the bad value and what is allowed; nothing is run before this passes."""
        for key in ("base_config", "base_model"):
            if not os.path.isfile(getattr(self, key)):
                raise FileNotFoundError(f"{key} {getattr(self, key)!r} not found (relative to {os.getcwd()})")
        if not self.launcher or not all(isinstance(part, str) for part in self.launcher):
            raise ValueError(f"launcher must be a non-empty list of strings, got {self.launcher!r}")
        if not (isinstance(self.threads_per_process, int) and self.threads_per_process > 0):
            raise ValueError(f"threads_per_process must be a positive integer, got {self.threads_per_process!r}")
        for key in ("model", "output_dir"):
            if key in self.pretrain_overrides:
                raise ValueError(f"pretrain_overrides must not set {key!r}: the runner sets it per row")
        fixed = sorted({"model_type", "architectures", "num_experts", "moe_projections"} & set(self.moe))
        if fixed:
            raise ValueError(f"moe must not set {fixed}: they come from each row")
        names = [row.name for row in self.rows]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"row names must be unique; repeated: {duplicates}")
        for row in self.rows:
            where = f"row {row.name!r}"
            if not ROW_NAME.match(str(row.name)):
                raise ValueError(f"{where}: name must match {ROW_NAME.pattern} (it names a folder)")
            if not isinstance(row.num_experts, int) or row.num_experts == 1 or row.num_experts < 0:
                raise ValueError(f"{where}: num_experts must be 0 (dense) or an integer >= 2, got {row.num_experts!r}")
            bad = [p for p in row.moe_projections if p not in PROJECTIONS]
            if bad:
                raise ValueError(f"{where}: moe_projections {bad} not in {list(PROJECTIONS)}")
            if row.num_experts and not row.moe_projections:
                raise ValueError(f"{where}: num_experts {row.num_experts} needs moe_projections from "
                                 f"{list(PROJECTIONS)}")
            if not row.num_experts and row.moe_projections:
                raise ValueError(f"{where}: a dense row (num_experts 0) takes no moe_projections")
        moe_rows = [row.name for row in self.rows if row.num_experts]
        if self.plots.expert_load_row is not None and self.plots.expert_load_row not in moe_rows:
            raise ValueError(f"plots.expert_load_row {self.plots.expert_load_row!r} is not an MoE row; "
                             f"allowed: {moe_rows} or null")
        if not (isinstance(self.plots.loss_window, int) and self.plots.loss_window > 0):
            raise ValueError(f"plots.loss_window must be a positive integer, got {self.plots.loss_window!r}")


def load_replicate_config(path: str | os.PathLike, overrides: list[str] = ()) -> ReplicateConfig:
    """Read the YAML, apply ``key=value`` overrides (dotted keys; ``pretrain_overrides.<key>`` literal) and check."""
    values = read_yaml_with_overrides(path, overrides, literal_sections=("pretrain_overrides",))
    config = ReplicateConfig.from_dict(values)
    config.check()
    return config


def select_rows(config: ReplicateConfig, names: str | None) -> list[RowConfig]:
    """The rows named in ``--rows`` (comma-separated), in config order; all rows when None."""
    if names is None:
        return list(config.rows)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    known = [row.name for row in config.rows]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise ValueError(f"--rows: unknown row(s) {unknown or wanted}; allowed: {known}")
    return [row for row in config.rows if row.name in wanted]


# ---------------------------------------------------------------------------------------------------- commands

def derive_model(base_model: dict[str, Any], row: RowConfig, moe: dict[str, Any]) -> dict[str, Any]:
    """The row's config.json-style model dict: the dense base, or its PNet version (same sizes, routed FFN)."""
    if base_model.get("model_type") != "llama":
        raise ValueError(f"base_model must be a dense model_type 'llama' file, got {base_model.get('model_type')!r}")
    model = dict(base_model)
    if row.num_experts:
        model.update(model_type="pnet_llama", architectures=["PNetLlamaForCausalLM"], **moe,
                     num_experts=row.num_experts, moe_projections=list(row.moe_projections))
    return model


def command_env(threads: int) -> dict[str, str]:
    """Environment of every launched command: this interpreter's environment first on PATH (so ``python``,
    ``accelerate``, ``pnet-eval`` are the ones installed with this package), ``threads`` threads per process."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}


def yaml_value(value: Any) -> str:
    """A value as a ``key=value`` override reads it back (YAML flow style, one line)."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def pretrain_overrides(config: ReplicateConfig) -> list[str]:
    return [f"{key}={yaml_value(value)}" for key, value in config.pretrain_overrides.items()]


def check_pretrain_config(config: ReplicateConfig) -> None:
    """Validate the pretraining config every row will get (values, data files) before running anything."""
    load_config(config.base_config, [f"model={config.base_model}", f"output_dir={config.output_root}",
                                     *pretrain_overrides(config)])


def pretrain_command(config: ReplicateConfig, model_path: Path, run_dir: Path) -> list[str]:
    overrides = pretrain_overrides(config)
    return [*config.launcher, PRETRAIN_SCRIPT, "--config",
            config.base_config, f"model={model_path}", f"output_dir={run_dir}", *overrides]


def zero_shot_command(config: ReplicateConfig, model_dir: Path) -> list[str]:
    zs = config.zero_shot
    command = ["pnet-eval", str(model_dir), "--tasks", ",".join(zs.tasks),
               "--batch-size", str(zs.batch_size)]
    if zs.data_dir is not None:
        command += ["--data-dir", zs.data_dir]
    if zs.limit is not None:
        command += ["--limit", str(zs.limit)]
    return command


def sst2_command(config: ReplicateConfig, model_dir: Path) -> list[str]:
    return ["python", FINETUNE_SST2_SCRIPT, str(model_dir), *config.sst2.args]


def run_command(command: list[str], env: dict[str, str]) -> None:
    """Print the command (as a shell line) and run it; a failure stops the runner naming the command."""
    if shutil.which(command[0], path=env["PATH"]) is None:
        raise FileNotFoundError(f"{command[0]!r} not found on PATH (is the project installed in this environment?)")
    print("$ " + shlex.join(command), flush=True)
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise RuntimeError(f"command failed with exit status {result.returncode}: {shlex.join(command)}")


# ------------------------------------------------------------------------------------------------------- stages

def read_state(run_dir: Path) -> dict[str, Any]:
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.is_file() else {"done": []}


def run_row(config: ReplicateConfig, row: RowConfig, env: dict[str, str]) -> None:
    """Pretrain, evaluate and (optionally) fine-tune one row, skipping the stages already done."""
    root = Path(config.output_root)
    run_dir = root / row.name
    model_path = root / "models" / f"{row.name}.json"
    with open(config.base_model, encoding="utf-8") as f:
        model = derive_model(json.load(f), row, config.moe)
    state = read_state(run_dir)
    command = pretrain_command(config, model_path, run_dir)

    if "pretrain" in state["done"]:
        print(f"[{row.name}] pretraining finished earlier: skipped", flush=True)
    else:
        checkpoints = list_checkpoints(run_dir)
        if checkpoints:
            # Continuing with another model or other hyper-parameters would silently mix two experiments.
            if state.get("pretrain_command") != command or json.loads(model_path.read_text()) != model:
                raise ValueError(f"[{row.name}] {run_dir} holds checkpoints of a run with a different command or "
                                 f"model file than this config gives; use another output_root or delete {run_dir}")
            print(f"[{row.name}] continuing pretraining from {checkpoints[-1][1].name}", flush=True)
        else:
            model_path.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(model_path, model)
            run_dir.mkdir(parents=True, exist_ok=True)
            state["pretrain_command"] = command
            write_json_atomic(run_dir / STATE_FILE, state)
        run_command(command + (["--resume"] if checkpoints else []), env)
        state["done"].append("pretrain")
        write_json_atomic(run_dir / STATE_FILE, state)

    final = run_dir / "final"
    stages = [("zero_shot", zero_shot_command(config, final))]
    if config.sst2.enabled:
        stages.append(("sst2", sst2_command(config, final)))
    for stage, stage_command in stages:
        if stage in state["done"]:
            print(f"[{row.name}] {stage} finished earlier: skipped", flush=True)
            continue
        run_command(stage_command, env)
        state["done"].append(stage)
        write_json_atomic(run_dir / STATE_FILE, state)


# ------------------------------------------------------------------------------------------------------ results

def row_results(config: ReplicateConfig, row: RowConfig, report_row: dict[str, Any]) -> dict[str, Any]:
    """Numbers of one finished row: counts, losses, validation curve, data checksums, expert load."""
    run_dir = Path(config.output_root) / row.name
    records = read_jsonl(run_dir / "log.jsonl")
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    if not train or not evals:
        raise ValueError(f"[{row.name}] {run_dir / 'log.jsonl'} has no training or validation records")
    tokens_per_step = train[0]["tokens"] // train[0]["step"]
    counts = count_config(str(run_dir / "final"))
    final_val = evals[-1]["val_loss"]
    return {
        **report_row,
        "row": row.name,
        "router_flops": counts.details.get("router_flops", 0),
        "flops_per_token": counts.flops / DEFAULT_SEQ_LEN,
        "steps": train[-1]["step"],
        "tokens": train[-1]["tokens"],
        "final_lm_loss_window": train[-1]["lm_loss"],
        "final_aux_loss_window": train[-1]["aux_loss"],
        "val_loss": final_val,
        "val_loss_mean": sum(final_val.values()) / len(final_val),
        "val_curve": [{"tokens": r["step"] * tokens_per_step, "val_loss": r["val_loss"]} for r in evals],
        "batch_crc32": {str(r["step"]): r["batch_crc32"] for r in train},
        "expert_load": [{"tokens": r["step"] * tokens_per_step, "load": r["expert_load"]}
                        for r in train if "expert_load" in r],
        "router_names": next((r["router_names"] for r in train if "router_names" in r), []),
        "expert_load_window": next((r["load_window"][1] - r["load_window"][0] + 1 for r in train if "load_window" in r),
                                   None),
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
    """The pretraining command the rows were actually run with, minus the per-row model= and output_dir=."""
    def shared(command: list[str] | None) -> list[str] | None:
        return None if command is None else [a for a in command if not a.startswith(("model=", "output_dir="))]

    commands = [shared(r["pretrain_command"]) for r in rows]
    if any(c != commands[0] for c in commands[1:]) or commands[0] is None:
        return "DIFFERENT pretraining commands across rows (see Commands run) - the rows are not comparable"
    return f"identical for every row apart from `model=` and `output_dir=`: `{shlex.join(commands[0])}`"


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


def plot_expert_load(row: dict[str, Any], png_path: Path) -> None:
    """Per router (layer x projection): each expert's share of tokens per log window, stacked, over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    names = row["router_names"]
    tokens = [w["tokens"] for w in row["expert_load"]]
    cols = min(4, len(names))
    rows_ = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows_, cols, figsize=(3.6 * cols, 2.9 * rows_), squeeze=False, sharey=True)
    for i, name in enumerate(names):
        ax = axes[i // cols][i % cols]
        shares = list(zip(*[w["load"][i] for w in row["expert_load"]]))  # experts x windows
        ax.stackplot(tokens, shares, labels=[f"expert {e}" for e in range(len(shares))])
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
        ax.set_xlabel("training tokens", fontsize=8)
        ax.xaxis.set_major_formatter(EngFormatter())
    for j in range(len(names), rows_ * cols):
        axes[j // cols][j % cols].axis("off")
    for r in range(rows_):
        axes[r][0].set_ylabel("share of tokens (top-1)", fontsize=8)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=7)
    fig.suptitle(f"Expert load per router over training: {row['row']}\neach expert's share of the tokens of each "
                 f"{row['expert_load_window']}-step log window (equal bands = uniform)", fontsize=9)
    fig.tight_layout(rect=(0, 0, 0.86, 1))
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
        plot_expert_load(load_row, load_png)
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
        f"- Pretraining command: {settings_check(rows)}; OMP_NUM_THREADS={config.threads_per_process}.",
        f"- Tokens per row: {rows[0]['tokens']:,} ({rows[0]['steps']} steps).",
        f"- Data order: {data_order_check(rows)}.",
        f"- Zero-shot: `{json.dumps(config.zero_shot.__dict__)}`; SST-2 fine-tuning: "
        + (f"`{shlex.join(config.sst2.args)}`" if config.sst2.enabled else "off") + ".",
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
    lines += ["## Commands run", "", "```bash", *commands, "```", ""]
    report.write_text("\n".join(lines), encoding="utf-8")
    summary = {"invocation": invocation, "config": json.loads(json.dumps(config, default=lambda o: o.__dict__)),
               "data_order": data_order_check(rows), "pretrain_settings": settings_check(rows), "rows": rows}
    report.with_suffix(".json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print(f"wrote {report}, {report.with_suffix('.json')}, {val_png}" + (f", {load_png}" if load_row else ""))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="configs/replicate/<name>.yaml")
    parser.add_argument("--rows", default=None, help="comma-separated row names (default: all rows of the config)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, dotted keys, YAML values")
    args = parser.parse_args(argv)
    if not os.path.isfile(PRETRAIN_SCRIPT):
        parser.error(f"run from the repository root: {PRETRAIN_SCRIPT} not found in {os.getcwd()}")
    config = load_replicate_config(args.config, args.overrides)
    rows = select_rows(config, args.rows)
    check_pretrain_config(config)
    invocation = shlex.join(["python", "scripts/replicate_table7.py", *(argv if argv is not None else sys.argv[1:])])
    env = command_env(config.threads_per_process)

    for row in rows:
        run_row(config, row, env)

    root = Path(config.output_root)
    finals = [root / row.name / "final" for row in rows]
    report_md = root / "pnet-report.md"
    report_command = ["pnet-report", *map(str, finals), "--out", str(report_md),
                      "--loss-window", str(config.plots.loss_window)]
    run_command(report_command, env)
    report_rows = json.loads(report_md.with_suffix(".json").read_text())["rows"]
    results = [row_results(config, row, report_row) for row, report_row in zip(rows, report_rows)]
    commands = []
    for row in rows:
        commands.append(shlex.join(read_state(root / row.name)["pretrain_command"]))
        commands.append(shlex.join(zero_shot_command(config, root / row.name / "final")))
        if config.sst2.enabled:
            commands.append(shlex.join(sst2_command(config, root / row.name / "final")))
    commands.append(shlex.join(report_command))
    write_report(config, results, report_md.read_text(), commands, invocation)


if __name__ == "__main__":
    main()
