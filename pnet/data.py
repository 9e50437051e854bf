"""Streaming pretraining data: a weighted mix of text sources, tokenised and packed on the fly.

One code path for Hub datasets and local files: every source is opened with
``datasets.load_dataset(path, name=config, data_files=..., split=..., streaming=True)`` where ``path`` is a
Hub id (``allenai/c4``) or a packaged builder (``parquet``, ``csv``, ...) reading local ``data_files``. JSON Lines
(``path: json``) are read line by line and parsed here (one shard per file), one record per line: a malformed
line or a record whose text field is missing, null or not a string is then an error naming the file, the line and
the field (found by `check_records` when the source is opened, before training), or, with
``data.on_bad_record: skip``, a record skipped and counted (``PackedBatchIterator.skipped_records``, in the log),
instead of a pyarrow error for a whole 10 MB chunk.

Pipeline per rank (``build_train_stream``)::

    source_i: load_dataset(streaming) -> map(record -> {"text": str | None, "bad": bool}) -> [skip]
              -> [shuffle(buffer)] -> split_dataset_by_node(rank)
              -> map(tokenise + append EOS + pack into seq_len blocks)
    interleave_datasets(sources, probabilities=weights, seed, stopping_strategy)

Packing happens inside each source, before interleaving, so every interleaved example is exactly ``seq_len``
tokens: the interleave probabilities are then token shares, not document shares. Documents are joined with
EOS (``doc_1 EOS doc_2 EOS ...``, no BOS) and cut into ``seq_len`` blocks within groups of
``pack_group_docs`` documents; the last partial block of each group is dropped (as in transformers'
``run_clm`` ``group_texts``), which loses < ``seq_len`` tokens per group.

Because tokenising and packing are ``IterableDataset.map`` steps, the whole stream is exactly resumable with
``IterableDataset.state_dict()`` / ``load_state_dict()`` (datasets >= 3): ``PackedBatchIterator`` exposes
that state, and the training script stores it per rank in each checkpoint.

Stopping strategy: ``first_exhausted`` (default) stops the mix when the first source runs out, so the
configured token shares hold for the whole stream and no document is repeated (the paper uses every token
once). ``all_exhausted`` oversamples (repeats) the smaller sources; ``all_exhausted_without_replacement``
keeps going on the remaining sources, so late shares drift from the weights.
"""

from __future__ import annotations

import csv
import functools
import gzip
import json
import os
import zlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from datasets import Features, IterableDataset, Value, interleave_datasets, load_dataset
from datasets.distributed import split_dataset_by_node
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from pnet.config import ConfigError, SourceConfig, TextDataConfig

MAX_BAD_RECORD_EXAMPLES = 5  # locations listed in the log when bad records are skipped


class DataRecordError(ValueError):
    """A data record the pipeline cannot use; the message names the file, the line and the field."""


def load_tokenizer(path: str, key: str = "data.tokenizer") -> PreTrainedTokenizerBase:
    """Load a tokenizer and check it has the EOS token that separates packed documents (``key``: the setting that
    names it, for the error)."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as error:  # ValueError: a folder without tokenizer files
        raise ConfigError(f"{key}={path!r}: no tokenizer could be loaded from it ({str(error).splitlines()[0]}); "
                          "allowed: a folder with tokenizer files, or a Hub id when online") from None
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {path!r} has no EOS token; packing needs one to separate documents")
    return tokenizer


# ------------------------------------------------------------------------------------------- record checks

def undecodable(text: str) -> str | None:
    """Why ``text`` cannot be encoded as UTF-8 (and so cannot be tokenised), or None: an invalid byte of the file
    (read with ``surrogateescape``: U+DC80..U+DCFF) or a lone surrogate from a JSON escape such as ``"\\ud800"``."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as error:
        code = ord(text[error.start])
        if 0xDC80 <= code <= 0xDCFF:
            return f"invalid UTF-8 byte 0x{code - 0xDC00:02x} at character {error.start + 1}"
        return (f"a lone surrogate \\u{code:04x} at character {error.start + 1} (not a character: UTF-8 cannot hold "
                "it and the tokenizer rejects it)")


def record_problem(record: Any, text_field: str) -> str | None:
    """Why ``record`` (a parsed JSON value / a row) has no usable text, or None when it has."""
    if not isinstance(record, dict):
        return f"not a JSON object but {type(record).__name__}"
    if text_field not in record:
        return f"no field {text_field!r} (fields: {sorted(record)})"
    value = record[text_field]
    if value is None:
        return f"field {text_field!r} is null"
    if not isinstance(value, str):
        return f"field {text_field!r} is {type(value).__name__} {value!r:.40}, not a string"
    if (problem := undecodable(value)) is not None:
        return f"field {text_field!r} holds {problem}"
    return None


def parse_json_line(line: str, text_field: str) -> tuple[str | None, str | None]:
    """(text, problem) of one JSON Lines line; a blank line is (None, None)."""
    if not line.strip():
        return None, None
    if (problem := undecodable(line)) is not None:
        return None, problem
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        return None, f"not valid JSON ({error.msg.removesuffix(' at')} at column {error.colno})"
    problem = record_problem(record, text_field)
    return (None, problem) if problem else (record[text_field], None)


@dataclass(frozen=True)
class RecordCheck:
    """What `check_records` found in one split of a local source."""

    source: str
    split: str
    records: int
    bad: int
    examples: tuple[str, ...]  # "file, line N: problem" of the first bad records


# An invalid UTF-8 byte is kept as one escaped character of its line (``surrogateescape``), so that it makes one bad
# record, named by line, instead of a decode error for the whole file. The JSON Lines stream reads the same way.
ENCODING_ERRORS = "surrogateescape"
UNREADABLE = (OSError, EOFError, zlib.error)  # a garbled or truncated .gz, an unreadable file


def _open_text(path: str):
    if path.lower().endswith(".gz"):  # any case: UP.JSONL.GZ is gzip too (read as text, every line was a bad record)
        return gzip.open(path, "rt", encoding="utf-8", errors=ENCODING_ERRORS)
    return open(path, encoding="utf-8", errors=ENCODING_ERRORS, newline="")


def _unreadable(path: str, line: int, error: Exception) -> DataRecordError:
    return DataRecordError(f"{path}: cannot be read after line {line}: {error}. data.on_bad_record=skip skips bad "
                           "records, not damaged files: replace the file or remove it from data_files")


class _Scan:
    """Counts of one file's records, with the first problems."""

    def __init__(self) -> None:
        self.records, self.bad, self.examples = 0, 0, []

    def add(self, where: str, problem: str | None) -> None:
        self.records += 1
        if problem:
            self.bad += 1
            if len(self.examples) < MAX_BAD_RECORD_EXAMPLES:
                self.examples.append(f"{where}: {problem}")

    def result(self, path: str) -> tuple[int, int, tuple[str, ...]]:
        if not self.records:  # an export that failed, or the wrong file: never silently part of the mix
            raise DataRecordError(f"{path}: no records (an empty shard); remove it from data_files or replace it")
        return self.records, self.bad, tuple(self.examples)


@functools.lru_cache(maxsize=64)
def _scan_jsonl(path: str, mtime: float, text_field: str) -> tuple[int, int, tuple[str, ...]]:
    """(records, bad records, first problems) of one JSON Lines file (cached per file version)."""
    scan, number = _Scan(), 0
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, start=1):
                text, problem = parse_json_line(line, text_field)
                if text is not None or problem is not None:
                    scan.add(f"{path}, line {number}", problem)
    except UNREADABLE as error:
        raise _unreadable(path, number, error) from None
    return scan.result(path)


def _scan_csv(path: str, text_field: str) -> tuple[int, int, tuple[str, ...]]:
    """CSV as datasets' csv builder (pandas) reads it: an empty cell is a null text."""
    scan, number = _Scan(), 1
    try:
        with _open_text(path) as f:
            reader = csv.DictReader(f)
            if text_field not in (reader.fieldnames or []):
                return 1, 1, (f"{path}, line 1: no column {text_field!r} (columns: {reader.fieldnames})",)
            for row in reader:
                number = reader.line_num
                value = row[text_field]
                if value is not None and (problem := undecodable(value)):  # pandas decodes whole blocks: no skip
                    raise DataRecordError(f"{path}, line {number}: {problem}. The CSV reader cannot skip one row "
                                          "of a file with invalid UTF-8: fix the file")
                scan.add(f"{path}, line {number}", f"field {text_field!r} is an empty cell" if not value else None)
    except UNREADABLE as error:
        raise _unreadable(path, number, error) from None
    return scan.result(path)


def _scan_text(path: str) -> tuple[int, int, tuple[str, ...]]:
    """A text file as datasets' text builder reads it: one record per line, decoded strictly (an invalid byte fails
    the whole file in the stream, so it is an error here whatever on_bad_record says, naming the line)."""
    scan, number = _Scan(), 0
    try:
        with _open_text(path) as f:
            for number, line in enumerate(f, start=1):
                if problem := undecodable(line):
                    raise DataRecordError(f"{path}, line {number}: {problem}. The text reader cannot skip one line "
                                          "of a file with invalid UTF-8: fix the file")
                scan.add(f"{path}, line {number}", None)
    except UNREADABLE as error:
        raise _unreadable(path, number, error) from None
    return scan.result(path)


def _scan_parquet(path: str, text_field: str) -> tuple[int, int, tuple[str, ...]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    if text_field not in schema.names:
        return 1, 1, (f"{path}: no column {text_field!r} (columns: {schema.names})",)
    if not (pa.types.is_string(schema.field(text_field).type) or pa.types.is_large_string(
            schema.field(text_field).type)):
        return 1, 1, (f"{path}: column {text_field!r} has type {schema.field(text_field).type}, not string",)
    column = pq.read_table(path, columns=[text_field]).column(text_field)
    if not len(column):  # as an empty JSON Lines shard: the stream fails on it (ArrowInvalid: BatchSize ... 0)
        raise DataRecordError(f"{path}: no records (an empty shard); remove it from data_files or replace it")
    nulls = column.null_count
    examples = ()
    if nulls:
        first = column.is_null().to_pylist().index(True)
        examples = (f"{path}, row {first + 1}: field {text_field!r} is null",)
    return len(column), nulls, examples


def check_records(name: str, source: SourceConfig, split: str, on_bad_record: str = "error") -> RecordCheck | None:
    """Check every record of a local source's split before any is streamed (None for Hub sources, which can only be
    checked as they stream). JSON Lines: each line must be a JSON object whose ``text_field`` is a string;
    parquet: each file must have ``text_field`` as a string column, without nulls. With ``on_bad_record`` "error"
    the first bad record raises `DataRecordError` naming file, line and field; with "skip" they are counted."""
    if source.path not in ("json", "parquet", "csv", "text"):
        return None
    files = source.files(split)
    records = bad = 0
    examples: list[str] = []
    for path in files:
        if source.path == "json":
            n, n_bad, found = _scan_jsonl(path, os.path.getmtime(path), source.text_field)
        elif source.path == "csv":
            n, n_bad, found = _scan_csv(path, source.text_field)
        elif source.path == "text":
            n, n_bad, found = _scan_text(path)
        else:
            n, n_bad, found = _scan_parquet(path, source.text_field)
        records, bad = records + n, bad + n_bad
        examples += found[:MAX_BAD_RECORD_EXAMPLES - len(examples)]
        if n_bad and on_bad_record == "error":
            raise DataRecordError(f"data source {name!r} ({split}): {found[0]}; data.sources.{name}.text_field is "
                                  f"{source.text_field!r}. Fix the record, or set data.on_bad_record=skip to skip "
                                  "bad records (they are counted in the log)")
    if records - bad <= 0:
        raise DataRecordError(f"data source {name!r} ({source.path}, split {split!r}) is empty"
                         + (f": all {records} records are bad" if records else "") + f" (files: {files})")
    return RecordCheck(name, split, records, bad, tuple(examples))


def check_data(config: TextDataConfig) -> list[RecordCheck]:
    """`check_records` for the training and validation split of every local source."""
    checks = []
    for name, source in config.sources.items():
        for split in dict.fromkeys([source.train_split, source.validation_split]):
            if split is not None and (check := check_records(name, source, split, config.on_bad_record)):
                checks.append(check)
                if split == source.train_split and source.train_skip_docs >= check.records:
                    raise ConfigError(f"data.sources.{name}.train_skip_docs={source.train_skip_docs} skips every "
                                      f"document of its {split!r} split ({check.records}); allowed: < "
                                      f"{check.records}")
    return checks


# ------------------------------------------------------------------------------------------------ streams

RECORD_FEATURES = Features({"text": Value("string"), "bad": Value("bool")})


def _json_lines_records(files: list[str], text_field: str, on_bad_record: str, where: str) -> Iterator[dict]:
    """The records of JSON Lines files in order, as `open_source` streams them (one shard per file)."""
    for path in files:
        with _open_text(path) as f:
            for number, line in enumerate(f, start=1):
                text, problem = parse_json_line(line, text_field)
                if problem and on_bad_record == "error":  # the file changed after check_records
                    raise DataRecordError(f"{where}: {path}, line {number}: {problem}")
                yield {"text": text, "bad": problem is not None}


def open_source(name: str, source: SourceConfig, split: str, on_bad_record: str = "error") -> IterableDataset:
    """Stream one split of a source as records ``{"text": str | None, "bad": bool}``: ``text`` None marks a record
    without usable text (``bad``: a bad record, counted when skipped; not bad: a blank JSON Lines line)."""
    check_records(name, source, split, on_bad_record)  # local files: every record, before streaming
    where = f"data source {name!r} ({source.path}, split {split!r})"
    if source.path == "json":
        # Read here, not by datasets' text builder: its streaming reader of .gz files decodes strictly (an invalid
        # byte would fail the whole file), and Arrow cannot hold the escaped byte; the check reads the same way.
        return IterableDataset.from_generator(
            _json_lines_records, features=RECORD_FEATURES,
            gen_kwargs={"files": source.files(split), "text_field": source.text_field,
                        "on_bad_record": on_bad_record, "where": where})

    # CSV: only an empty cell is a null text, as the up-front check reads it. pandas' defaults also read the words
    # NA, null, NaN, N/A, ... as null: texts the check passed that the stream then dropped or stopped on.
    csv_options = {"keep_default_na": False, "na_values": [""]} if source.path == "csv" else {}
    try:  # Hub datasets: the first record shows the columns (an empty split stops here)
        dataset = load_dataset(source.path, name=source.config, data_files=source.data_files, split=split,
                               streaming=True, **csv_options)
        first = next(iter(dataset))
    except StopIteration:
        raise ValueError(f"{where} is empty") from None
    if source.text_field not in first:
        raise DataRecordError(f"{where}: text_field {source.text_field!r} is not one of its columns {sorted(first)}")

    def validate(batch: dict[str, list]) -> dict[str, list]:
        texts, bad = [], []
        for value in batch[source.text_field]:
            problem = record_problem({source.text_field: value}, source.text_field)
            if problem and on_bad_record == "error":
                raise DataRecordError(f"{where}: a record's {problem}; set data.on_bad_record=skip to skip such "
                                      "records")
            texts.append(None if problem else value)
            bad.append(problem is not None)
        return {"text": texts, "bad": bad}

    return dataset.select_columns([source.text_field]).map(validate, batched=True,
                                                           remove_columns=[source.text_field])


def tokenize_and_pack(dataset: IterableDataset, tokenizer: PreTrainedTokenizerBase, seq_len: int,
                      group_docs: int, domain: str) -> IterableDataset:
    """Map records to ``{"input_ids": seq_len tokens, "domain": name, "skipped": bad records}`` blocks
    (doc EOS doc EOS ...); a group's skipped bad records are counted on its first block."""
    eos = tokenizer.eos_token_id

    def pack(batch: dict[str, list]) -> dict[str, list]:
        ids: list[int] = []
        texts = [text for text in batch["text"] if text is not None]
        for doc in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"] if texts else []:
            ids.extend(doc)
            ids.append(eos)
        blocks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        skipped = [0] * len(blocks)
        if blocks:
            skipped[0] = sum(batch["bad"])
        return {"input_ids": blocks, "domain": [domain] * len(blocks), "skipped": skipped}

    return dataset.map(pack, batched=True, batch_size=group_docs, remove_columns=["text", "bad"])


def build_train_stream(config: TextDataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, rank: int = 0,
                       world_size: int = 1) -> IterableDataset:
    """The interleaved, packed training stream of one rank (ranks read disjoint documents)."""
    streams = []
    for name, source in config.sources.items():
        dataset = open_source(name, source, source.train_split, config.on_bad_record)
        if source.train_skip_docs:
            dataset = dataset.skip(source.train_skip_docs)
        if source.shuffle_buffer:
            dataset = dataset.shuffle(seed=seed, buffer_size=source.shuffle_buffer)
        # Whole shards per rank when n_shards % world_size == 0, else every world_size-th document.
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        streams.append(tokenize_and_pack(dataset, tokenizer, config.seq_len, config.pack_group_docs, name))
    weights = config.weights()
    try:  # interleaving reads each stream's first example
        return interleave_datasets(streams, probabilities=[weights[name] for name in config.sources], seed=seed,
                                   stopping_strategy=config.stopping_strategy)
    except StopIteration:
        raise DataExhaustedError("a training source yields no sequence (empty, all records bad, or train_skip_docs "
                                 "past its end): check data.sources") from None


def build_validation_sets(config: TextDataConfig, tokenizer: PreTrainedTokenizerBase,
                          world_size: int = 1) -> dict[str, torch.Tensor]:
    """Per domain, the first ``validation_sequences`` packed sequences of its validation split, (N, seq_len); at least
    one per process (each scores its share: with fewer sequences than processes some would score none, a 0/0 loss)."""
    sets = {}
    for name, source in config.sources.items():
        if source.validation_split is None:
            continue
        dataset = open_source(name, source, source.validation_split, config.on_bad_record)
        if source.validation_take_docs is not None:
            dataset = dataset.take(source.validation_take_docs)
        packed = tokenize_and_pack(dataset, tokenizer, config.seq_len, config.pack_group_docs, name)
        rows = [example["input_ids"] for example, _ in zip(packed, range(config.validation_sequences))]
        if not rows:
            raise DataRecordError(f"validation split of {name!r} has fewer than data.seq_len={config.seq_len} tokens: "
                                  "no validation sequence; add documents, or set its validation_split to null")
        if len(rows) < world_size:
            raise ConfigError(f"validation split of {name!r}: {len(rows)} packed sequence(s) for {world_size} processes; "
                              f"allowed: data.validation_sequences >= {world_size} and a split that packs to as many")
        sets[name] = torch.tensor(rows, dtype=torch.long)
    return sets


class DataExhaustedError(RuntimeError):
    """The training stream ended (a source ran out under ``first_exhausted``) before training finished."""


@dataclass
class PackedBatchIterator:
    """Micro-batches ``(batch_size, seq_len)`` from a packed stream, with an exactly resumable position.

    ``state_dict()`` is the stream's ``IterableDataset.state_dict()`` after the last batch returned, plus the
    number of sequences consumed, tokens per domain and bad records skipped per domain; ``load_state_dict()`` must
    be called before the first ``next_batch()``.
    """

    dataset: IterableDataset
    batch_size: int
    sequences_consumed: int = 0
    domain_tokens: dict[str, int] = field(default_factory=dict)  # tokens read per domain (this rank)
    skipped_records: dict[str, int] = field(default_factory=dict)  # bad records skipped per domain (this rank)
    _iterator: Iterator[dict] | None = None

    def next_batch(self) -> torch.Tensor:
        if self._iterator is None:
            self._iterator = iter(self.dataset)
        rows = []
        for _ in range(self.batch_size):
            try:
                example = next(self._iterator)
            except StopIteration:
                raise DataExhaustedError(
                    f"training data exhausted after {self.sequences_consumed} sequences on this rank; lower "
                    "max_steps, add data, or use data.stopping_strategy=all_exhausted") from None
            rows.append(example["input_ids"])
            domain = example["domain"]
            self.domain_tokens[domain] = self.domain_tokens.get(domain, 0) + len(example["input_ids"])
            if example["skipped"]:
                self.skipped_records[domain] = self.skipped_records.get(domain, 0) + example["skipped"]
            self.sequences_consumed += 1
        return torch.tensor(rows, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset.state_dict(), "sequences_consumed": self.sequences_consumed,
                "domain_tokens": dict(self.domain_tokens), "skipped_records": dict(self.skipped_records)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._iterator is not None:
            raise RuntimeError("load_state_dict must be called before the first next_batch()")
        self.dataset.load_state_dict(state["dataset"])
        self.sequences_consumed = state["sequences_consumed"]
        self.domain_tokens = dict(state["domain_tokens"])
        self.skipped_records = dict(state.get("skipped_records", {}))
