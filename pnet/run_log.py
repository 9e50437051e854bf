"""The training log, ``log.jsonl``: one JSON object per line, written by every training command, read by the
plots, ``pnet-report`` and the Table 7 runner. The field names below are the contract between the writer and the
readers: both import them from here instead of spelling the strings.

Record kinds (every record has ``step``):

* training window (``loss`` present): losses averaged over the steps since the previous record, ``lr`` of the
  last step, ``grad_norm``, throughput; pretraining adds ``tokens``, ``lm_loss``/``aux_loss``/``z_loss``, the
  CRC32 of the last step's token ids, expert load per router over the window and the bad records skipped so far;
* evaluation (``val_loss`` for language models: {domain: LM loss}; ``eval_loss``/``eval_accuracy`` for classifiers);
* event (``event`` present): ``resume`` (the checkpoint and the settings changed on resume) and ``data_check``
  (bad records found in the local data files before training).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LOG_FILE = "log.jsonl"
UPCYCLING_FILE = "upcycling.json"  # how pnet-upcycle made a folder (from what, how); read by the model card
SST2_RESULTS_FILE = "sst2_results.json"  # the fine-tuned classifier's SST-2 result; read by pnet-report, the card
VISION_RESULTS_FILE = "results.json"  # a vision run's test result; read by the model card and the trap runner

# ---- fields of every record
STEP = "step"
EPOCH = "epoch"
# ---- training window
TOKENS = "tokens"  # training tokens consumed up to this step (all processes)
LOSS = "loss"  # the loss that is back-propagated (PNet: LM loss + router losses)
LM_LOSS = "lm_loss"
AUX_LOSS = "aux_loss"  # Switch load-balancing loss (1.0 = uniform routing), before its coefficient
Z_LOSS = "z_loss"  # router z-loss, before its coefficient
LR = "lr"
GRAD_NORM = "grad_norm"  # before clipping
TOKENS_PER_S = "tokens_per_s"
ELAPSED_S = "elapsed_s"
BATCH_CRC32 = "batch_crc32"  # CRC32 of the token ids of the step (rank 0): equal data order across runs
EXPERT_LOAD = "expert_load"  # [router][expert] share of the window's tokens whose top-1 choice is that expert
ROUTER_NAMES = "router_names"
LOAD_WINDOW = "load_window"  # [first step, last step] of the window EXPERT_LOAD counts
BAD_RECORDS_SKIPPED = "bad_records_skipped"  # {domain: records skipped so far} with data.on_bad_record: skip
# ---- evaluation
VAL_LOSS = "val_loss"  # {domain: mean LM loss on the fixed validation sequences}
EVAL_LOSS = "eval_loss"  # classifiers: mean cross-entropy on the evaluation split
EVAL_ACCURACY = "eval_accuracy"
EVAL_LOSS_EMA = "eval_loss_ema"  # the same for the EMA weights (vision)
EVAL_ACCURACY_EMA = "eval_accuracy_ema"
EVAL_SAMPLES = "eval_samples"
TRAIN_ACCURACY = "train_accuracy"  # at the end: accuracy of the exported weights on (a fixed part of) the train set
TRAIN_ACCURACY_SAMPLES = "train_accuracy_samples"
# ---- events
EVENT = "event"
EVENT_RESUME = "resume"
EVENT_DATA_CHECK = "data_check"
CHECKPOINT = "checkpoint"  # resume: the checkpoint folder resumed from
CHANGES = "changes"  # resume: {setting: [value in the checkpoint, value now]} allowed with --allow-change
BAD_RECORDS = "bad_records"  # data_check: {source: {split: count}}
BAD_RECORD_EXAMPLES = "bad_record_examples"  # data_check: the first few "file:line: problem" descriptions


class JsonlLog:
    """Append-only writer of ``log.jsonl``.

    A fresh run (``resume_step`` None) starts an empty file. A resumed run first drops the records written after
    the checkpoint it resumes from (the uninterrupted run would not have them) and a half-written last line (a
    kill in the middle of a write), so the log reads as if the run had never been interrupted.
    """

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None or not self.path.exists():
            self.path.write_text("")
        else:
            kept = [r for r in read_log(self.path) if r[STEP] <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """All records of a ``log.jsonl``. A last line cut short (no newline, not valid JSON: the writer was killed
    mid-write, or is writing it now) is ignored; any other bad line raises naming the file and line."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            if number == len(lines):  # the unterminated last line
                break
            raise ValueError(f"{path}, line {number}: not a JSON object ({error})") from None
        if not isinstance(record, dict) or STEP not in record:
            raise ValueError(f"{path}, line {number}: a log record must be a JSON object with {STEP!r}, got {line!r}")
        records.append(record)
    return records


def train_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if r.get(LOSS) is not None]


def val_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if VAL_LOSS in r]


def eval_records(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in records if EVAL_ACCURACY in r]


def event_records(records: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [r for r in records if r.get(EVENT) == event]
