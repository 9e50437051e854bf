"""Perplexity on any text with lm-eval's rolling log-likelihood (`pnet-eval DIR --perplexity FILE [FILE ...]`).

Each file becomes one lm-eval task of type `loglikelihood_rolling`, the request type of lm-eval's `wikitext` task:
a document is cut into windows of `max_length` tokens, each token is scored exactly once, and the first window is
conditioned on lm-eval's prefix token (BOS when the tokenizer has one, else EOS). The task is built in Python
(an inline config handed to `lm_eval.simple_evaluate`), so nothing is read from the working directory or the Hub:
its documents come from the file, and every metric names its aggregation explicitly (a metric lm-eval does not
know is otherwise looked up in HF `evaluate`, which needs the Hub).

Files: JSON Lines (`.jsonl`, `.ndjson`, `.json`, optionally `.gz`; one document per line, in `text_field`) or
plain UTF-8 text (optionally `.gz`; the whole file is one document). `heldout` names the bundled held-out text
(`eval/data/heldout/botchan.jsonl.gz`, see its README); `LABEL=PATH` names a file's results (default: the file
name without extensions). Every file is read and checked before any model loads.

Metrics, with LL = the summed log-likelihood (natural log) of a file's documents:
  * word_perplexity  = exp(-LL / words), words = whitespace-separated words (`len(text.split())`);
  * byte_perplexity  = exp(-LL / bytes), bytes = UTF-8 bytes of the text; bits_per_byte = -LL / bytes / ln 2;
  * token_perplexity = exp(-LL / tokens), tokens = the tokens lm-eval scores: `len(lm.tok_encode(text))`, the very
    call lm-eval's `loglikelihood_rolling` windows, so it is the mean NLL per predicted token, exactly. The
    tokenizer's BOS is *not* added to the text (`add_bos_token=False`); with it, lm-eval 0.4.13 would score the BOS
    token itself as the first prediction (EleutherAI/lm-evaluation-harness#3333).
All four are lm-eval aggregations (`weighted_perplexity`, `bits_per_byte`) over per-document (LL, count) pairs.

Per model, `pnet_perplexity_results.json` (read by `pnet-report`) gets one entry per file, keyed by the file's
label (its name without extensions), merged with the entries already there; lm-eval's own results dict goes to
`lm_eval_perplexity_results.json`.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import re
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from pnet.checkpoint import write_json_atomic
from pnet.data import undecodable
from pnet_eval.models import (
    checked_models,
    device_and_dtype,
    lm_eval_model_args,
    quiet_git_describe,
    trust_after_weight_check,
)
from pnet_eval.results_files import check_number, check_object, read_json_object

PERPLEXITY_RESULTS_FILE = "pnet_perplexity_results.json"
LM_EVAL_PERPLEXITY_RESULTS_FILE = "lm_eval_perplexity_results.json"
HELDOUT_FILE = Path(__file__).resolve().parent / "data" / "heldout" / "botchan.jsonl.gz"
HELDOUT_NAME = "heldout"  # `--perplexity heldout` -> HELDOUT_FILE
# `.json` too: read as JSON Lines, as datasets' json loader reads it (a file of JSON Lines would otherwise be one
# plain-text document full of braces and keys).
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TASK_PREFIX = "pnet_ppl_"
# metric -> lm-eval aggregation. Given explicitly so lm-eval never searches HF `evaluate` (the Hub) for them.
METRICS = {
    "word_perplexity": "weighted_perplexity",
    "byte_perplexity": "weighted_perplexity",
    "bits_per_byte": "bits_per_byte",
    "token_perplexity": "weighted_perplexity",
}


@dataclass(frozen=True)
class TextFile:
    """One input file, read and checked: its documents and the label its results are stored under."""

    path: Path
    label: str
    format: str  # "jsonl" or "text"
    texts: tuple[str, ...]
    sha256: str


# Extensions are matched in any case: `DATA.JSONL` is JSON Lines too, never scored as one text of braces and keys.
def _suffixes(path: Path) -> list[str]:
    return [suffix.lower() for suffix in path.suffixes]


def _open_text(path: Path):
    gzipped = _suffixes(path)[-1:] == [".gz"]
    return gzip.open(path, "rt", encoding="utf-8") if gzipped else open(path, encoding="utf-8")


def _is_jsonl(path: Path) -> bool:
    suffixes = _suffixes(path)
    suffixes = suffixes[:-1] if suffixes[-1:] == [".gz"] else suffixes
    return bool(suffixes) and suffixes[-1] in JSONL_SUFFIXES


def file_label(path: Path) -> str:
    """`data/botchan.jsonl.gz` -> `botchan`: the name without its extensions, as a task-name-safe string."""
    name = path.name
    while Path(name).suffix.lower() in (".gz", *JSONL_SUFFIXES, ".txt", ".text", ".md"):
        name = Path(name).stem
    return re.sub(r"[^\w.-]", "_", name) or "text"


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents of one file; raises naming the file (and line) on anything that cannot be scored."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"perplexity file {str(path)!r} does not exist" if not path.exists()
                                else f"perplexity file {str(path)!r} is not a file")
    try:
        with _open_text(path) as f:
            if not _is_jsonl(path):
                text = f.read()
                if not text.strip():
                    raise ValueError(f"{path}: empty file (no text to score)")
                return [text]
            texts = []
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"{path}:{number}: not valid JSON ({error.msg}); {', '.join(JSONL_SUFFIXES)} files are read "
                        "as JSON Lines: one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
                if text_field not in row:
                    raise ValueError(f"{path}:{number}: no {text_field!r} field (fields: {sorted(row)})")
                text = row[text_field]
                if not isinstance(text, str):
                    raise ValueError(f"{path}:{number}: {text_field!r} is {type(text).__name__}, not a string")
                if (problem := undecodable(text)) is not None:  # a JSON escape such as "\ud800"
                    raise ValueError(f"{path}:{number}: {text_field!r} holds {problem}")
                if not text.strip():
                    raise ValueError(f"{path}:{number}: {text_field!r} is empty")
                texts.append(text)
    except UnicodeDecodeError as error:
        raise ValueError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except (OSError, EOFError) as error:  # e.g. a .gz that is not gzip
        raise ValueError(f"{path}: cannot be read ({error})") from None
    if not texts:
        raise ValueError(f"{path}: no documents (the file is empty)")
    return texts


def parse_file_spec(spec: str | Path) -> tuple[str | None, Path]:
    """`PATH`, `LABEL=PATH` or `heldout` -> (label or None, path)."""
    label, text = None, str(spec)
    if isinstance(spec, str) and "=" in spec and not Path(spec).expanduser().exists():
        label, text = spec.split("=", 1)
        if not re.fullmatch(r"[\w.-]+", label):
            raise ValueError(f"perplexity file label {label!r} in {spec!r}: use letters, digits, '_', '-', '.'")
    return label, HELDOUT_FILE if text == HELDOUT_NAME else Path(text).expanduser()


def load_text_files(files: str | Path | list[str | Path], text_field: str = "text") -> list[TextFile]:
    """Read and check every file (before any model work). Each is `PATH`, `LABEL=PATH` or `heldout`; the label
    (default: the file name without extensions) keys its results and is made unique (`name`, `name-2`, ...)."""
    files = [files] if isinstance(files, (str, Path)) else list(files)
    if not files:
        raise ValueError("no perplexity files given")
    loaded, labels = [], set()
    for given in files:
        given_label, path = parse_file_spec(given)
        texts = read_documents(path, text_field)
        base = given_label or file_label(path)
        label, n = base, 1
        while label in labels:
            n += 1
            label = f"{base}-{n}"
        labels.add(label)
        loaded.append(
            TextFile(
                path=path.resolve(),
                label=label,
                format="jsonl" if _is_jsonl(path) else "text",
                texts=tuple(texts),
                sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
            )
        )
    return loaded


def task_config(text_file: TextFile, count_tokens: Callable[[str], int]) -> dict[str, Any]:
    """An inline lm-eval task config: wikitext's request type and metrics, plus token perplexity."""
    import datasets

    docs = datasets.DatasetDict({"test": datasets.Dataset.from_dict({"text": list(text_file.texts)})})

    def process_results(doc: dict, results: list[float]) -> dict[str, tuple[float, int]]:
        (loglikelihood,) = results
        text = doc["text"]
        n_bytes = len(text.encode("utf-8"))
        return {
            "word_perplexity": (loglikelihood, len(text.split())),
            "byte_perplexity": (loglikelihood, n_bytes),
            "bits_per_byte": (loglikelihood, n_bytes),
            "token_perplexity": (loglikelihood, count_tokens(text)),
        }

    return {
        "task": TASK_PREFIX + text_file.label,
        "custom_dataset": lambda **_metadata: docs,
        "test_split": "test",
        "output_type": "loglikelihood_rolling",
        "doc_to_text": "",
        "doc_to_target": lambda doc: doc["text"],
        "process_results": process_results,
        "metric_list": [
            {"metric": name, "aggregation": aggregation, "higher_is_better": False}
            for name, aggregation in METRICS.items()
        ],
        "num_fewshot": 0,
        "metadata": {"version": 1.0, "file": str(text_file.path)},
    }


def summarize_file(text_file: TextFile, task_results: dict[str, Any], samples: list[dict]) -> dict[str, Any]:
    """Totals from lm-eval's per-document samples and the four metrics from its aggregation (cross-checked)."""
    loglikelihood = math.fsum(s["token_perplexity"][0] for s in samples)
    counts = {key: sum(s[metric][1] for s in samples) for key, metric in
              (("words", "word_perplexity"), ("bytes", "bits_per_byte"), ("tokens", "token_perplexity"))}
    entry: dict[str, Any] = {
        "path": str(text_file.path),
        "sha256": text_file.sha256,
        "format": text_file.format,
        "docs": len(samples),
        **counts,
        "loglikelihood": loglikelihood,
    }
    for metric in METRICS:
        entry[metric] = float(task_results[f"{metric},none"])
    # lm-eval's aggregation and the totals must agree; a mismatch means a document was dropped or double counted.
    expected = math.exp(-loglikelihood / counts["tokens"])
    if not math.isclose(entry["token_perplexity"], expected, rel_tol=1e-9):
        raise RuntimeError(f"token perplexity {entry['token_perplexity']} != exp(-LL/tokens) {expected}")
    return entry


GENERIC_FOLDER_NAMES = ("final",)  # a training run exports final/: named after its run instead


def results_dirs(models: list[str], output_dir: str | Path | None) -> dict[str, Path]:
    """Where each model's results go: its own folder (a Hub id: ``./<owner__name>``), or with ``output_dir``
    ``output_dir/<name>``, where ``<name>`` is the model folder's name joined to as many parent names as tell the
    models of one command apart, and never a bare ``final`` (``runs/a/final`` -> ``a-final``): two models never
    write to one folder."""
    def hub_name(model: str) -> str:
        return re.sub(r"[^\w.-]", "__", model)

    if output_dir is None:
        return {m: Path(m) if Path(m).is_dir() else Path.cwd() / hub_name(m) for m in models}
    parts = {m: Path(m).resolve().parts[1:] if Path(m).is_dir() else (hub_name(m),) for m in models}
    depth = {m: 2 if p[-1] in GENERIC_FOLDER_NAMES and len(p) > 1 else 1 for m, p in parts.items()}
    while True:
        names = {m: "-".join(parts[m][-depth[m]:]) for m in parts}
        clashes = [m for m in parts if list(names.values()).count(names[m]) > 1]
        if not clashes:
            return {m: Path(output_dir) / names[m] for m in parts}
        if all(depth[m] == len(parts[m]) for m in clashes):
            raise ValueError(f"models {clashes} would write their results to one folder "
                             f"{Path(output_dir) / names[clashes[0]]}; evaluate them with separate --output-dir")
        for m in clashes:
            depth[m] = min(depth[m] + 1, len(parts[m]))


def prepare_results_dirs(dirs: dict[str, Path], earlier_result: Callable[[Path], str | None],
                         overwrite: bool) -> None:
    """Before any model loads: make each results folder and check it can be written, and refuse to replace an
    earlier result (``earlier_result(folder)`` names it, or None) unless ``overwrite``."""
    for model, out in dirs.items():
        try:
            out.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=out):
                pass
        except OSError as error:
            raise ValueError(f"the results of {model} go to {out}, which cannot be written "
                             f"({error.strerror or error}); pass --output-dir DIR to write them elsewhere") from None
        if not overwrite and (earlier := earlier_result(out)):
            raise FileExistsError(f"{earlier} holds the results of an earlier evaluation; pass --overwrite to "
                                  "replace them, or --output-dir DIR to keep both")


def read_perplexity_results(folder: str | Path) -> dict[str, Any] | None:
    """A folder's `pnet_perplexity_results.json`, its numbers checked, or None."""
    path = Path(folder) / PERPLEXITY_RESULTS_FILE
    if not path.is_file():
        return None
    results = read_json_object(path)
    for label, entry in check_object(path, "files", results.get("files")).items():
        entry = check_object(path, f"files.{label}", entry)
        for metric in METRICS:  # a perplexity is >= 1, bits per byte >= 0
            check_number(path, f"files.{label}.{metric}", entry.get(metric), 0 if metric == "bits_per_byte" else 1)
        for count in ("docs", "tokens", "max_length"):
            check_number(path, f"files.{label}.{count}", entry.get(count), 1)
    return results


def check_prefix_token_id(model: str, prefix_token_id: int) -> None:
    """Refuse a prefix token the model has no embedding for, from its config.json (before it loads)."""
    from pnet.model_loading import read_config_dict

    vocab_size = read_config_dict(model).get("vocab_size")
    if vocab_size is not None and not 0 <= prefix_token_id < vocab_size:
        raise ValueError(
            f"prefix_token_id={prefix_token_id} is outside the vocabulary of {model}; allowed: 0 <= id < {vocab_size}"
        )


def evaluate_perplexity(
    model_dirs: str | list[str],
    files: str | Path | list[str | Path],
    text_field: str = "text",
    max_length: int | None = None,
    batch_size: int | str = 1,
    device: str | None = None,
    dtype: str | None = None,
    prefix_token_id: int | None = None,
    output_dir: str | Path | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
) -> list[dict[str, Any]]:
    """Rolling-window perplexity of each model on each file; returns (and writes) one result dict per model.

    Each returned dict is the model's `pnet_perplexity_results.json`: `{"model", "model_dir", "files": {label:
    {path, sha256, format, docs, words, bytes, tokens, loglikelihood, word_perplexity, byte_perplexity,
    bits_per_byte, token_perplexity, max_length, prefix_token_id, device, dtype, batch_size, lm_eval_version,
    run_wall_time_s, date}}}`. `max_length` defaults to the model's context length (lm-eval's rule);
    `trust_remote_code=False` loads PNet folders with the classes of this installed package, never the folder's own
    Python files (`pnet.model_loading.trust_remote_code_for`).
    """
    models = checked_models(model_dirs)
    text_files = load_text_files(files, text_field)
    device, dtype = device_and_dtype(device, dtype)
    if max_length is not None and max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}")
    if prefix_token_id is not None:
        for model in models:
            check_prefix_token_id(model, prefix_token_id)
    trust = trust_after_weight_check(models, trust_remote_code)
    out_dirs = results_dirs(models, output_dir)

    def earlier_result(out: Path) -> str | None:  # the same files scored before (other files' results are kept)
        scored = (read_perplexity_results(out) or {}).get("files", {})
        again = [f.label for f in text_files if f.label in scored]
        return f"{out / PERPLEXITY_RESULTS_FILE} (files {again})" if again else None

    prepare_results_dirs(out_dirs, earlier_result, overwrite)

    return [
        score_model(model, text_files, out_dirs[model], trust_remote_code=trust[model], text_field=text_field,
                    max_length=max_length, batch_size=batch_size, device=device, dtype=dtype,
                    prefix_token_id=prefix_token_id)
        for model in models
    ]


def score_model(model: str, text_files: list, out: Path, *, trust_remote_code: bool, text_field: str,
                max_length: int | None, batch_size: int | str, device: str, dtype: str,
                prefix_token_id: int | None) -> dict[str, Any]:
    """One model's rolling-window perplexity on every file in one lm-eval run, merged into (and written to) its
    `pnet_perplexity_results.json` in `out`, beside lm-eval's own results; the inputs are checked by the caller."""
    import lm_eval
    from lm_eval.api.registry import get_model
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import handle_non_serializable, make_table

    model_args = lm_eval_model_args(
        "hf",
        pretrained=model,
        trust_remote_code=trust_remote_code,
        dtype=dtype,
        add_bos_token=False,  # score the text's tokens only (see the module docstring)
    )
    if max_length is not None:
        model_args["max_length"] = max_length
    if prefix_token_id is not None:
        model_args["prefix_token_id"] = prefix_token_id
    lm = get_model("hf").create_from_arg_obj(model_args, {"batch_size": batch_size, "device": device})

    def count_tokens(text: str) -> int:  # the tokenisation lm-eval windows
        return len(lm.tok_encode(text))

    start = time.perf_counter()
    with quiet_git_describe():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=[task_config(f, count_tokens) for f in text_files],
            num_fewshot=0,
            batch_size=batch_size,
            device=device,
            task_manager=TaskManager(include_defaults=False),  # inline tasks only: no lm-eval YAML indexing
            log_samples=True,  # per-document (LL, count) pairs, for the totals
            bootstrap_iters=0,
        )
    wall_time = time.perf_counter() - start
    samples = results.pop("samples")
    print(make_table(results))
    summary = read_perplexity_results(out) or {}
    summary.update({"model": Path(model).name, "model_dir": model})
    summary.setdefault("files", {})
    for text_file in text_files:
        task = TASK_PREFIX + text_file.label
        entry = summarize_file(text_file, results["results"][task], samples[task])
        entry.update(
            {
                "text_field": text_field if text_file.format == "jsonl" else None,
                "max_length": lm.max_length,
                "prefix_token_id": lm.prefix_token_id,
                "device": device,
                "dtype": dtype,
                "batch_size": batch_size,
                "lm_eval_task": task,
                "lm_eval_version": lm_eval.__version__,
                "run_wall_time_s": round(wall_time, 2),  # the whole lm-eval run (all files given with it)
                "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
        )
        summary["files"][text_file.label] = entry
        print(
            f"{Path(model).name} on {text_file.label}: word perplexity {entry['word_perplexity']:.4f}, "
            f"bits per byte {entry['bits_per_byte']:.4f}, token perplexity {entry['token_perplexity']:.4f} "
            f"({entry['docs']} docs, {entry['tokens']} tokens, windows of {lm.max_length})"
        )
    write_json_atomic(out / LM_EVAL_PERPLEXITY_RESULTS_FILE, results, indent=2, default=handle_non_serializable,
                      ensure_ascii=False)
    write_json_atomic(out / PERPLEXITY_RESULTS_FILE, summary, indent=2)
    print(f"wrote {out / PERPLEXITY_RESULTS_FILE} and {out / LM_EVAL_PERPLEXITY_RESULTS_FILE}")
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The perplexity options of `pnet-eval`."""
    group = parser.add_argument_group("perplexity (lm-eval loglikelihood_rolling)")
    group.add_argument(
        "--perplexity",
        nargs="+",
        metavar="FILE",
        default=None,
        help="score these .jsonl/.ndjson/.json[.gz] (JSON Lines) / plain-text files (PATH or LABEL=PATH; "
        "'heldout' = the bundled held-out "
        "text) instead of the zero-shot tasks (zero-shot runs too when --tasks is given)",
    )
    group.add_argument("--text-field", default="text", help="JSON Lines field holding the text (default: %(default)s)")
    group.add_argument(
        "--max-length", type=int, default=None, help="window length in tokens (default: the model's context length)"
    )
    group.add_argument(
        "--prefix-token-id",
        type=int,
        default=None,
        help="token the first window is conditioned on (default: BOS, else EOS)",
    )


# --------------------------------------------------------------------------------------------- pnet-report columns

# (metric, column title, decimals) shown per file in `pnet-report` when a model has perplexity results.
REPORT_METRICS = (("word_perplexity", "word PPL", 2), ("bits_per_byte", "BPB", 3), ("token_perplexity", "token PPL", 2))
REPORT_FIELDS = ("docs", "tokens", "max_length", "sha256", *METRICS)


def report_entries(results: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The per-file numbers a report row keeps from a `pnet_perplexity_results.json` (empty when absent)."""
    files = (results or {}).get("files", {})
    return {label: {k: entry.get(k) for k in REPORT_FIELDS} for label, entry in files.items()}


def report_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, int, str]]:
    """(file label, metric, decimals, header) for every file any row has results for, in order of appearance."""
    labels = list(dict.fromkeys(label for row in rows for label in row.get("perplexity") or {}))
    return [(label, metric, digits, f"{label} {title}") for label in labels for metric, title, digits in REPORT_METRICS]


def report_cells(row: dict[str, Any], columns: list[tuple[str, str, int, str]]) -> list[str]:
    cells = []
    for label, metric, digits, _ in columns:
        value = ((row.get("perplexity") or {}).get(label) or {}).get(metric)
        cells.append("-" if value is None else f"{value:.{digits}f}")
    return cells


def report_notes(rows: list[dict[str, Any]]) -> list[str]:
    """One note per file: what was scored and how (window length, tokens), flagging rows that differ."""
    notes = []
    for label in dict.fromkeys(label for row in rows for label in row.get("perplexity") or {}):
        entries = [row["perplexity"][label] for row in rows if label in (row.get("perplexity") or {})]
        settings = sorted({(e["docs"], e["tokens"], e["max_length"], e["sha256"]) for e in entries}, key=str)
        described = "; ".join(
            f"{d} docs, {t} tokens, windows of {m} tokens, file sha256 {(s or '?')[:12]}" for d, t, m, s in settings
        )
        notes.append(
            f"{label}: lm-eval `loglikelihood_rolling` perplexity ({described}"
            + (" - NOT the same text/tokenizer/window for all rows" if len(settings) > 1 else "")
            + "). word PPL = exp(-LL/words), BPB = -LL/bytes/ln 2, token PPL = exp(-LL/tokens); lower is better."
        )
    return notes
