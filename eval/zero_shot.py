"""pnet-eval: zero-shot ARC-Easy / BoolQ / HellaSwag (the paper's Table 7) with lm-eval's HF backend.

Two data sources, one code path (`lm_eval.simple_evaluate`; folders of this package's model types load with the
installed classes and run none of the folder's code, others only with `--trust-remote-code`):
  * Hub (default when the Hub is reachable): lm-eval's own tasks `arc_easy`, `boolq`, `hellaswag`, unchanged.
  * Local JSON Lines (`--data-dir DIR`, or `--data-dir bundled` for the copy shipped in `eval/data`; the
    default when `HF_HUB_OFFLINE`/`HF_DATASETS_OFFLINE` is set): the `*_local` tasks of `eval/tasks/`,
    which are the upstream YAMLs with only the dataset lines changed.

Per model, two files are written: lm-eval's full results dict (`lm_eval_results.json`) and a compact
summary (`pnet_eval_results.json`) that `pnet-report` and `pnet-card` read.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pnet.checkpoint import write_json_atomic
from pnet.config import hub_is_offline
from pnet_eval import perplexity
from pnet_eval.models import (
    DTYPES,
    checked_models,
    device_and_dtype,
    lm_eval_model_args,
    quiet_git_describe,
    trust_after_weight_check,
)

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
# lm-eval model types, each with its default batch size: vLLM batches all requests itself (continuous batching).
BACKENDS = {"hf": 1, "vllm": "auto"}
VLLM_CPU_KV_CACHE_GIB = 4  # default KV cache of the vllm backend on CPU (see `evaluate`)


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


def data_source(local_dir: Path | None) -> str:
    """How results files name the data: 'hub', 'bundled' (eval/data) or 'local:<folder>'."""
    if local_dir is None:
        return "hub"
    return "bundled" if local_dir == BUNDLED_DATA_DIR else f"local:{local_dir}"


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
    batch_size: int | str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    output_dir: str | os.PathLike | None = None,
    trust_remote_code: bool = False,
    backend: str = "hf",
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Zero-shot evaluation of each model; returns (and writes) one compact result dict per model.

    Results go to each model's own folder, or to `output_dir/<name>/` when given (`perplexity.results_dirs`: a run's
    `final/` is named after its run); every folder is checked writable, and an earlier result is replaced only with
    `overwrite`, before any model loads. No code from a model
    folder runs unless `trust_remote_code` (`pnet.model_loading.trust_remote_code_for`). `backend` is lm-eval's model
    type: "hf" (transformers) or "vllm" (vLLM with pnet's plugin, see README "Serving"); `batch_size` None is
    1 for hf and "auto" (all requests at once) for vllm.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise ValueError("backend 'vllm' needs vLLM installed beside pnet (README \"Serving\": scripts/setup_vllm.sh)")
    batch_size = BACKENDS[backend] if batch_size is None else batch_size
    from lm_eval.tasks import TaskManager

    models = checked_models(model_dirs)
    selected = resolve_tasks(tasks)
    device, dtype = device_and_dtype(device, dtype)
    trust = trust_after_weight_check(models, trust_remote_code)
    out_dirs = perplexity.results_dirs(models, output_dir)
    perplexity.prepare_results_dirs(out_dirs, earlier_result, overwrite)
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
    if backend == "vllm" and device == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        # vLLM's CPU default reserves 92% of the machine's memory for its KV cache and refuses to start when other
        # processes already hold more than 8% (seen on an idle 24 GB machine). Scoring needs far less.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(VLLM_CPU_KV_CACHE_GIB)
        print(f"vllm on CPU: KV cache of {VLLM_CPU_KV_CACHE_GIB} GiB (set VLLM_CPU_KVCACHE_SPACE=<GiB> to change)")

    return [
        evaluate_model(model, out_dirs[model], selected, task_manager, task_names, local_dir=local_dir, limit=limit,
                       batch_size=batch_size, device=device, dtype=dtype, trust_remote_code=trust[model],
                       backend=backend)
        for model in models
    ]


def evaluate_model(model: str, out: Path, selected: list, task_manager, task_names: list[str], *,
                   local_dir: Path | None, limit: int | float | None, batch_size: int | str, device: str, dtype: str,
                   trust_remote_code: bool, backend: str) -> dict[str, Any]:
    """One model's lm-eval run on the selected tasks; writes lm-eval's results and the compact summary to `out` and
    returns the summary. The inputs are checked by `evaluate`."""
    import lm_eval
    from lm_eval.utils import handle_non_serializable, make_table

    start = time.perf_counter()
    with quiet_git_describe():
        results = lm_eval.simple_evaluate(
            model=backend,
            model_args=lm_eval_model_args(backend, pretrained=model, trust_remote_code=trust_remote_code, dtype=dtype),
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
        "backend": backend,
        "device": device,
        "dtype": dtype,
        "lm_eval_version": lm_eval.__version__,
        "wall_time_s": round(wall_time, 2),
        "tasks": summarize(results, selected, local=local_dir is not None),
    }
    write_json_atomic(out / LM_EVAL_RESULTS_FILE, results, indent=2, default=handle_non_serializable,
                      ensure_ascii=False)
    write_json_atomic(out / RESULTS_FILE, summary, indent=2)
    print(f"wrote {out / RESULTS_FILE} and {out / LM_EVAL_RESULTS_FILE}")
    return summary


def earlier_result(out: Path) -> Path | None:
    """The zero-shot results an evaluation writing to ``out`` would replace."""
    return out / RESULTS_FILE if (out / RESULTS_FILE).exists() else None


def _limit(value: str) -> int | float:
    """`--limit`: a number of documents (an integer >= 1) or a fraction of each task (0 < f < 1)."""
    try:
        number = float(value)
    except ValueError:
        number = math.nan
    if number >= 1 and number.is_integer():
        return int(number)
    if 0 < number < 1:
        return number
    raise argparse.ArgumentTypeError(
        f"{value!r}: allowed: a number of documents per task (an integer >= 1), or a fraction of each task in (0, 1)"
    )


def _batch_size(value: str) -> int | str:
    """`--batch-size`: an integer >= 1, 'auto' or 'auto:N' (lm-eval's; N >= 1 tries of the automatic search)."""
    tries = value.removeprefix("auto:") if value.startswith("auto:") else None
    if value == "auto" or (tries is not None and tries.isdigit() and int(tries) >= 1):
        return value
    if value.isdigit() and int(value) >= 1:
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r}: allowed: an integer >= 1, 'auto' or 'auto:N' with N >= 1")


def build_parser() -> argparse.ArgumentParser:
    """`pnet-eval`'s options: zero-shot tasks and, from `perplexity.add_arguments`, perplexity."""
    parser = argparse.ArgumentParser(prog="pnet-eval", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", help="saved model folders (or Hub ids when online)")
    parser.add_argument(
        "--tasks",
        default=None,
        help=f"comma-separated, from {sorted(TASKS)} (default: {','.join(DEFAULT_TASKS)}; none with --perplexity)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder with <task>/<split>.jsonl[.gz] files, or 'bundled' for eval/data; "
        "default: the Hub, or 'bundled' when HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set",
    )
    parser.add_argument("--limit", type=_limit, default=None, help="documents per task (int) or fraction (<1)")
    parser.add_argument(
        "--batch-size",
        type=_batch_size,
        default=None,
        help="int, 'auto' or 'auto:N' (lm-eval's batch size; default: 1 for hf, auto for vllm)",
    )
    parser.add_argument("--device", default=None, help="cuda, cuda:0, cpu, ... (default: cuda if available)")
    parser.add_argument(
        "--dtype", default=None, choices=DTYPES, help="default: bfloat16 on a GPU, float32 on the CPU"
    )
    parser.add_argument(
        "--output-dir", default=None,
        help="write results to DIR/<model name>/ instead of the model folder (runs/a/final -> DIR/a-final)"
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the results of an earlier evaluation (default: refuse)"
    )
    parser.add_argument(
        "--backend",
        choices=sorted(BACKENDS),
        default="hf",
        help="lm-eval model type for the zero-shot tasks: hf (transformers) or vllm (needs vLLM; README \"Serving\")",
    )
    parser.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="run the model folder's own code (auto_map); pnet_llama / llama folders load without it",
    )
    perplexity.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    batch_size = args.batch_size
    try:
        if args.tasks is not None:
            resolve_tasks(args.tasks)  # a bad task name fails before the perplexity run, not after it
            if args.perplexity:  # and so do the zero-shot results' folders
                out_dirs = perplexity.results_dirs(checked_models(args.models), args.output_dir)
                perplexity.prepare_results_dirs(out_dirs, earlier_result, args.overwrite)
        if args.perplexity:
            perplexity.evaluate_perplexity(
                args.models,
                args.perplexity,
                text_field=args.text_field,
                max_length=args.max_length,
                batch_size=BACKENDS["hf"] if batch_size is None else batch_size,
                device=args.device,
                dtype=args.dtype,
                prefix_token_id=args.prefix_token_id,
                output_dir=args.output_dir,
                trust_remote_code=args.trust_remote_code,
                overwrite=args.overwrite,
            )
            if args.tasks is None:
                return
        evaluate(
            args.models,
            tasks=args.tasks or DEFAULT_TASKS,
            data_dir=args.data_dir,
            limit=args.limit,
            batch_size=batch_size,
            device=args.device,
            dtype=args.dtype,
            output_dir=args.output_dir,
            trust_remote_code=args.trust_remote_code,
            backend=args.backend,
            overwrite=args.overwrite,
        )
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        parser.exit(2, f"pnet-eval: error: {error}\n")


if __name__ == "__main__":
    main()
