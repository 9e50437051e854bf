"""pnet-report: several models' results in the paper's Table 7 layout, as markdown and JSON.

    pnet-report runs/llama-1b/final runs/pnet-1b-up-e8/final --out results/table7.md

Each argument is a model folder, or a `pnet_eval_results.json` written by `pnet-eval` (its `model_dir` names
the folder). Per model the report reads, when present:
  * `config.json` -> #Expert, Params and FLOPs via `pnet.counting.count_config` (the paper's arithmetic);
  * `pnet_eval_results.json` -> ARC-e, BoolQ, HellaSwag (zero-shot, `pnet-eval`);
  * `sst2_results.json` -> SST-2 (fine-tuned classifier, `scripts/finetune_sst2.py`);
  * `pnet_perplexity_results.json` -> one word PPL / BPB / token PPL column group per scored file
    (`pnet-eval DIR --perplexity FILE`), shown only when some model has one;
  * `log.jsonl` of the pretraining run (in the folder or its parent, `scripts/pretrain.py` writes it next to
    `final/`) -> training loss = mean LM loss of the last `--loss-window` logged steps.
Missing pieces print as "-". Avg is the mean of the four tasks (over those present, flagged when partial).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pnet import run_log
from pnet.counting import CountReport, InvalidConfigError, count_config, short_number

from pnet_eval import perplexity
from pnet_eval.results_files import check_number, check_object, read_json_object
from pnet_eval.zero_shot import RESULTS_FILE, TASKS

SST2_RESULTS_FILE = run_log.SST2_RESULTS_FILE
TRAINING_LOG_FILE = run_log.LOG_FILE
TASK_COLUMNS = (("arc_easy", "ARC-e"), ("boolq", "BoolQ"), ("sst2", "SST-2"), ("hellaswag", "HellaSwag"))
METRIC_CHOICES = ("acc", "acc_norm")
ACC_ONLY_TASKS = ("boolq",)  # lm-eval's BoolQ has no acc_norm: its acc stands in that column
ZERO_SHOT_FRACTIONS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr")


@dataclass
class ModelResults:
    """Everything known about one model: config, counts, training loss, benchmark results."""

    name: str
    model_dir: str | None
    config: dict[str, Any] | None = None
    counts: CountReport | None = None
    training_loss: float | None = None
    training_loss_source: str | None = None
    zero_shot: dict[str, Any] | None = None  # pnet_eval_results.json
    sst2: dict[str, Any] | None = None  # sst2_results.json
    perplexity: dict[str, Any] | None = None  # pnet_perplexity_results.json (pnet-eval --perplexity)
    notes: list[str] = field(default_factory=list)


def read_zero_shot_results(path: Path) -> dict[str, Any]:
    """A `pnet_eval_results.json`, its scores checked (fractions in [0, 1])."""
    results = read_json_object(path)
    if "tasks" not in results:
        raise ValueError(f"{str(path)!r} is not a {RESULTS_FILE} (no 'tasks' key)")
    for task, entry in check_object(path, "tasks", results["tasks"]).items():
        if task not in TASKS:
            raise ValueError(f"{str(path)!r}: task {task!r} is not one pnet-eval runs; allowed: {sorted(TASKS)}")
        entry = check_object(path, f"tasks.{task}", entry)
        for metric in ZERO_SHOT_FRACTIONS:
            check_number(path, f"tasks.{task}.{metric}", entry.get(metric), 0, 1)
        check_number(path, f"tasks.{task}.docs", entry.get("docs"), 0)
    return results


def read_sst2_results(path: Path) -> dict[str, Any]:
    """An `sst2_results.json` (`scripts/finetune_sst2.py`), its accuracy, size and label checked."""
    results = read_json_object(path)
    check_number(path, "accuracy", results.get("accuracy"), 0, 1, required=True)
    check_number(path, "eval_examples", results.get("eval_examples"), 1, required=True)
    if not isinstance(results.get("label"), str):
        raise ValueError(f"{str(path)!r}: label is {results.get('label')!r}, not a string; write it again")
    return results


def training_loss_from_log(log_path: Path, window: int) -> float | None:
    """Mean LM loss (or total loss for logs without `lm_loss`) over the last `window` logged training steps."""
    rows = run_log.train_records(run_log.read_log(log_path))
    losses = [r[run_log.LM_LOSS] if r.get(run_log.LM_LOSS) is not None else r[run_log.LOSS] for r in rows]
    if not losses:
        return None
    tail = losses[-window:]
    return sum(tail) / len(tail)


def load_model_results(path: str | Path, loss_window: int = 10) -> ModelResults:
    """Collect one model's results from a model folder or a `pnet_eval_results.json` file."""
    path = Path(path).expanduser()
    zero_shot = None
    if path.is_file():
        zero_shot = read_zero_shot_results(path)
        model_dir = Path(zero_shot["model_dir"]) if zero_shot.get("model_dir") else path.parent
        results_dir = path.parent
    elif path.is_dir():
        model_dir = results_dir = path
    else:
        raise FileNotFoundError(f"{str(path)!r} is neither a model folder nor a {RESULTS_FILE} file")

    results = ModelResults(name=(zero_shot or {}).get("model") or model_dir.name, model_dir=str(model_dir))
    if results.name == "final":  # scripts/pretrain.py exports to <run>/final: name the run instead
        results.name = model_dir.parent.name
    if zero_shot is None and (results_dir / RESULTS_FILE).is_file():
        zero_shot = read_zero_shot_results(results_dir / RESULTS_FILE)
    results.zero_shot = zero_shot
    for folder in dict.fromkeys((results_dir, model_dir)):
        if (folder / SST2_RESULTS_FILE).is_file():
            results.sst2 = read_sst2_results(folder / SST2_RESULTS_FILE)
            break
    for folder in dict.fromkeys((results_dir, model_dir)):
        if (found := perplexity.read_perplexity_results(folder)) is not None:
            results.perplexity = found
            break
    if (model_dir / "config.json").is_file():
        results.config = read_json_object(model_dir / "config.json")
        try:
            results.counts = count_config(str(model_dir))
        except InvalidConfigError:  # never report counts of a config that describes no model
            raise
        except ValueError as error:  # a model_type the counting code does not know
            results.notes.append(str(error))
    else:
        results.notes.append(f"no config.json in {str(model_dir)!r}: params/FLOPs unknown")
    for folder in (model_dir, model_dir.parent):
        if (folder / TRAINING_LOG_FILE).is_file():
            results.training_loss = training_loss_from_log(folder / TRAINING_LOG_FILE, loss_window)
            results.training_loss_source = str(folder / TRAINING_LOG_FILE)
            break
    return results


def task_score(results: ModelResults, task: str, metric: str) -> float | None:
    """Accuracy in percent: zero-shot `metric` (acc for the tasks that have no acc_norm), SST-2 fine-tuned."""
    if task == "sst2":
        return 100.0 * results.sst2["accuracy"] if results.sst2 else None
    entry = (results.zero_shot or {}).get("tasks", {}).get(task)
    if entry is None:
        return None
    value = entry.get("acc" if task in ACC_ONLY_TASKS else metric)
    return None if value is None else 100.0 * value


def build_table(models: list[ModelResults], metric: str = "acc") -> dict[str, Any]:
    """The Table 7 rows as plain data (what the JSON holds; the markdown is rendered from it)."""
    if metric not in METRIC_CHOICES:
        raise ValueError(f"metric {metric!r} is not one of {list(METRIC_CHOICES)}")
    rows = []
    for m in models:
        scores = {task: task_score(m, task, metric) for task, _ in TASK_COLUMNS}
        present = [v for v in scores.values() if v is not None]
        zero_shot = m.zero_shot or {}
        rows.append(
            {
                "model": m.name,
                "model_dir": m.model_dir,
                "model_type": (m.config or {}).get("model_type"),
                "num_experts": (m.config or {}).get("num_experts")
                if (m.config or {}).get("model_type") == "pnet_llama"
                else None,
                "moe_projections": (m.config or {}).get("moe_projections"),
                "total_params": m.counts.total_params if m.counts else None,
                "active_params": m.counts.active_params if m.counts else None,
                "flops": m.counts.flops if m.counts else None,
                "training_loss": m.training_loss,
                "training_loss_source": m.training_loss_source,
                **scores,
                "avg": sum(present) / len(present) if present else None,
                "avg_over": [task for task, v in scores.items() if v is not None],
                "sst2_label": (m.sst2 or {}).get("label"),
                "docs": {t: e.get("docs") for t, e in zero_shot.get("tasks", {}).items()},
                "zero_shot_limit": zero_shot.get("limit"),
                "zero_shot_data_source": zero_shot.get("data_source"),
                "perplexity": perplexity.report_entries(m.perplexity),
                "notes": m.notes,
            }
        )
    conventions = sorted({m.counts.flops_convention for m in models if m.counts})
    return {"metric": metric, "flops_convention": conventions, "rows": rows}


def render_markdown(table: dict[str, Any]) -> str:
    """Markdown of `build_table`'s output: the paper's columns, footnotes for anything non-standard."""
    metric = table["metric"]
    ppl_columns = perplexity.report_columns(table["rows"])
    header = ["Model", "#Expert", "Params", "FLOPs", "Training loss", "ARC-e", "BoolQ", "SST-2", "HellaSwag", "Avg"]
    header += [title for *_, title in ppl_columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|"]
    footnotes: dict[str, str] = {}

    def mark(text: str) -> str:
        symbol = footnotes.setdefault(text, str(len(footnotes) + 1))
        return f"<sup>{symbol}</sup>"

    for row in table["rows"]:
        experts = (
            "-" if row["num_experts"] is None else f"{row['num_experts']} ({'+'.join(row['moe_projections'] or [])})"
        )
        cells = [
            row["model"],
            experts,
            short_number(row["total_params"], "params"),
            short_number(row["flops"], "flops"),
            "-" if row["training_loss"] is None else f"{row['training_loss']:.2f}",
        ]
        if row["zero_shot_limit"] is not None:
            docs = ", ".join(f"{t} {n}" for t, n in row["docs"].items())
            cells[0] += mark(f"zero-shot scores on a subset (--limit {row['zero_shot_limit']}: {docs} docs)")
        for task, _ in TASK_COLUMNS:
            value = row[task]
            cell = "-" if value is None else f"{value:.2f}"
            if task == "sst2" and value is not None and row["sst2_label"] and "offline" in row["sst2_label"]:
                cell += mark(row["sst2_label"])
            cells.append(cell)
        avg = "-" if row["avg"] is None else f"{row['avg']:.2f}"
        if row["avg"] is not None and len(row["avg_over"]) < len(TASK_COLUMNS):
            avg += mark("Avg over the tasks present only: " + ", ".join(row["avg_over"]))
        cells.append(avg)
        cells += perplexity.report_cells(row, ppl_columns)
        lines.append("| " + " | ".join(cells) + " |")
    zero_shot_metric = "acc_norm" if metric == "acc_norm" else "acc"
    notes = [
        f"ARC-e, BoolQ, HellaSwag: zero-shot lm-eval `{zero_shot_metric}` (BoolQ has `acc` only), in %. "
        "SST-2: fine-tuned classifier accuracy, in %. Training loss: mean LM loss over the last logged steps.",
    ]
    notes += [f"FLOPs: {c}." for c in table["flops_convention"]]
    notes += perplexity.report_notes(table["rows"])
    notes += [f"<sup>{symbol}</sup> {text}" for text, symbol in footnotes.items()]
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pnet-report", description=__doc__.splitlines()[0])
    parser.add_argument("inputs", nargs="+", help="model folders or pnet_eval_results.json files")
    parser.add_argument("--out", default=None, help="markdown file to write (the JSON goes next to it, .json)")
    parser.add_argument(
        "--metric", default="acc", choices=METRIC_CHOICES,
        help="zero-shot metric for ARC-e and HellaSwag (default: %(default)s)",
    )
    parser.add_argument(
        "--loss-window", type=int, default=10,
        help="logged steps averaged for the training loss (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    try:
        models = [load_model_results(p, loss_window=args.loss_window) for p in args.inputs]
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"pnet-report: error: {error}\n")
    table = build_table(models, metric=args.metric)
    markdown = render_markdown(table)
    print(markdown)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown, encoding="utf-8")
        out.with_suffix(".json").write_text(json.dumps(table, indent=2), encoding="utf-8")
        print(f"wrote {out} and {out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
