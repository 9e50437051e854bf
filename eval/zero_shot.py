"""`pnet-eval`: zero-shot ARC-Easy / BoolQ / HellaSwag (the paper's Table 7) with lm-eval's HF backend.

Two data sources, one code path (`lm_eval.simple_evaluate` with `trust_remote_code=True`):
  * Hub (default when the Hub is reachable): lm-eval's own tasks `arc_easy`, `boolq`, `hellaswag`, unchanged.
  * Local JSON Lines (`--data-dir DIR`, or `--data-dir bundled` for the copy shipped in `eval/data`; the
    default when `HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` is set): the `*_local` tasks of `eval/tasks/`,
    which are the upstream YAMLs with only the dataset lines changed.

Per model, two files are written: lm-eval's full results dict (`lm_eval_results.json`) and a compact
summary (`pnet_eval_results.json`) that `pnet-report` and `pnet-card` read.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
BUNDLED_DATA_DIR = Path(__file__).resolve().parent / "data"
RESULTS_FILE = "pnet_eval_results.json"
LM_EVAL_RESULTS_FILE = "lm_eval_results.json"


@dataclass(frozen=True)
class ZeroShotTask:
    """One benchmark: its upstream lm-eval task, our offline mirror, the metrics we report."""

    name: str
    upstream_task: str
    local_task: str
    metrics: tuple[str, ...]


TASKS: dict[str, ZeroShotTask] = {
    "arc_easy": ZeroShotTask("arc_easy", "arc_easy", "arc_easy_local", ("acc", "acc_norm")),
    "boolq": ZeroShotTask("boolq", "boolq", "boolq_local", ("acc",)),
    "hellaswag": ZeroShotTask("hellaswag", "hellaswag", "hellaswag_local", ("acc", "acc_norm")),
    # The paper's SST-2 is a fine-tuned classifier (scripts/finetune_sst2.py); zero-shot SST-2 is an extra.
    "sst2": ZeroShotTask("sst2", "sst2", "sst2_local", ("acc",)),
}
DEFAULT_TASKS = ("arc_easy", "boolq", "hellaswag")


def hub_is_offline() -> bool:
    """True when the user has switched the Hub off (`HF_HUB_OFFLINE` / `HF_DATASETS_OFFLINE`)."""
    return any(
        os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")
        for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )


def resolve_tasks(tasks: str | list[str] | tuple[str, ...]) -> list[ZeroShotTask]:
    """Task names (list or comma-separated) -> ZeroShotTask; unknown names raise listing the allowed ones."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    unknown = [n for n in names if n not in TASKS]
    if unknown or not names:
        raise ValueError(f"unknown task(s) {unknown or names!r}; allowed: {sorted(TASKS)}")
    return [TASKS[n] for n in names]


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """None -> Hub (or the bundled copy when offline); 'bundled' -> eval/data; else the given folder."""
    if data_dir is None:
        return BUNDLED_DATA_DIR if hub_is_offline() else None
    if str(data_dir) == "bundled":
        return BUNDLED_DATA_DIR
    path = Path(data_dir).expanduser().resolve()
    if not path.is_dir():
        raise FileNotFoundError(f"--data-dir {str(data_dir)!r} is not a folder")
    return path


def check_local_data(tasks: list[ZeroShotTask], data_dir: Path) -> None:
    """Fail before loading any model if a local task's files are missing (the error names them)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    from pnet_eval.tasks.local_data import resolve_data_files

    problems = []
    for task in tasks:
        config = load_yaml(TASKS_DIR / f"{task.local_task}.yaml", resolve_func=False)
        try:
            resolve_data_files(config["dataset_kwargs"]["data_files"], data_dir)
        except FileNotFoundError as error:
            problems.append(f"{task.name}: {error}")
    if problems:
        raise FileNotFoundError("\n".join(problems))


def check_model(model: str) -> str:
    """A local folder with a config.json, or (online only) a Hub repo id."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            present = sorted(p.name for p in path.iterdir())
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json; it holds: {present}")
        return str(path.resolve())
    if not hub_is_offline() and re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return model
    raise FileNotFoundError(
        f"model folder {model!r} does not exist"
        + (" (the Hub is offline, so it cannot be a Hub id)" if hub_is_offline() else "")
    )


def data_source(local_dir: Path | None) -> str:
    """How results files name the data: 'hub', 'bundled' (eval/data) or 'local:<folder>'."""
    if local_dir is None:
        return "hub"
    return "bundled" if local_dir == BUNDLED_DATA_DIR else f"local:{local_dir}"


def default_dtype(device: str) -> str:
    """bf16 on GPUs; fp32 on CPU, where bf16 matmuls are far slower than fp32."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def summarize(lm_eval_results: dict[str, Any], tasks: list[ZeroShotTask], local: bool) -> dict[str, dict]:
    """Compact per-task numbers: docs scored, each metric and its stderr, keyed by our task names."""
    summary = {}
    for task in tasks:
        lm_name = task.local_task if local else task.upstream_task
        numbers = lm_eval_results["results"][lm_name]
        entry: dict[str, Any] = {
            "lm_eval_task": lm_name,
            "docs": int(lm_eval_results["n-samples"][lm_name]["effective"]),
        }
        for metric in task.metrics:
            entry[metric] = float(numbers[f"{metric},none"])
            stderr = numbers.get(f"{metric}_stderr,none")
            entry[f"{metric}_stderr"] = float(stderr) if isinstance(stderr, (int, float)) else None
        summary[task.name] = entry
    return summary


def evaluate(
    model_dirs: str | list[str],
    tasks: str | list[str] | tuple[str, ...] = DEFAULT_TASKS,
    data_dir: str | os.PathLike | None = None,
    limit: int | float | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    dtype: str | None = None,
    output_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Zero-shot evaluation of each model; returns (and writes) one compact result dict per model.

    Results go to each model's own folder, or to `output_dir/<model folder name>/` when given.
    """
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    model_dirs = [model_dirs] if isinstance(model_dirs, str) else list(model_dirs)
    models = [check_model(m) for m in model_dirs]
    selected = resolve_tasks(tasks)
    local_dir = resolve_data_dir(data_dir)
    if local_dir is not None:
        check_local_data(selected, local_dir)
        # Only our folder is indexed: scanning lm-eval's thousands of task YAMLs takes many seconds.
        task_manager = TaskManager(
            include_path=str(TASKS_DIR), include_defaults=False, metadata={"pnet_data_dir": str(local_dir)}
        )
        task_names = [t.local_task for t in selected]
    else:
        task_manager = TaskManager()
        task_names = [t.upstream_task for t in selected]
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or default_dtype(device)

    summaries = []
    for model in models:
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(
            model="hf",
            model_args={"pretrained": model, "trust_remote_code": True, "dtype": dtype},
            tasks=task_names,
            num_fewshot=0,
            limit=limit,
            batch_size=batch_size,
            device=device,
            task_manager=task_manager,
            log_samples=False,
        )
        wall_time = time.perf_counter() - start
        print(make_table(results))
        summary = {
            "model": Path(model).name,
            "model_dir": model,
            "data_source": data_source(local_dir),
            "num_fewshot": 0,
            "limit": limit,
            "device": device,
            "dtype": dtype,
            "lm_eval_version": lm_eval.__version__,
            "wall_time_s": round(wall_time, 2),
            "tasks": summarize(results, selected, local=local_dir is not None),
        }
        out = Path(output_dir) / Path(model).name if output_dir else Path(model)
        if not out.is_dir() and output_dir is None:  # a Hub id: write into the working directory
            out = Path.cwd() / re.sub(r"[^\w.-]", "__", model)
        out.mkdir(parents=True, exist_ok=True)
        (out / LM_EVAL_RESULTS_FILE).write_text(
            json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
        )
        (out / RESULTS_FILE).write_text(json.dumps(summary, indent=2))
        print(f"wrote {out / RESULTS_FILE} and {out / LM_EVAL_RESULTS_FILE}")
        summaries.append(summary)
    return summaries


def _limit(value: str) -> int | float:
    number = float(value)
    return int(number) if number >= 1 and number.is_integer() else number


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="pnet-eval", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="saved model folders (or Hub ids when online)")
    parser.add_argument(
        "--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, from {sorted(TASKS)} (default: %(default)s)"
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with <task>/<split>.jsonl[.gz] files, or 'bundled' for eval/data; "
        "default: the Hub, or 'bundled' when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set",
    )
    parser.add_argument("--limit", type=_limit, default=None, help="documents per task (int) or fraction (<1)")
    parser.add_argument("--batch-size", default="1", help="int, 'auto' or 'auto:N' (lm-eval's batch size)")
    parser.add_argument("--device", default=None, help="cuda, cuda:0, cpu, ... (default: cuda if available)")
    parser.add_argument(
        "--dtype", default=None, help="float32, bfloat16, float16, auto (default: bf16 on GPU, fp32 on CPU)"
    )
    parser.add_argument(
        "--output-dir", default=None, help="write results to DIR/<model name>/ instead of the model folder"
    )
    args = parser.parse_args(argv)
    batch_size = int(args.batch_size) if args.batch_size.isdigit() else args.batch_size
    try:
        evaluate(
            args.models,
            tasks=args.tasks,
            data_dir=args.data_dir,
            limit=args.limit,
            batch_size=batch_size,
            device=args.device,
            dtype=args.dtype,
            output_dir=args.output_dir,
        )
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"pnet-eval: error: {error}\n")


if __name__ == "__main__":
    main()
