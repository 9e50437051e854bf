"""Streaming pretraining data: a weighted mix of text sources, tokenised and packed on the fly.

One code path for Hub datasets and local files: every source is opened with
``datasets.load_dataset(path, name=config, data_files=..., split=..., streaming=True)`` where ``path`` is a
Hub id (``allenai/c4``) or a packaged builder (``json``, ``parquet``) reading local ``data_files``.

Pipeline per rank (``build_train_stream``)::

    source_i: load_dataset(streaming) -> [skip] -> [shuffle(buffer)] -> split_dataset_by_node(rank)
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

import glob
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Iterator

import torch
from datasets import IterableDataset, interleave_datasets, load_dataset
from datasets.distributed import split_dataset_by_node
from transformers import AutoTokenizer, PreTrainedTokenizerBase

# Packaged `datasets` builders that read local `data_files`; their files are checked before training.
LOCAL_BUILDERS = ("json", "parquet", "csv", "text", "arrow")
STOPPING_STRATEGIES = ("first_exhausted", "all_exhausted", "all_exhausted_without_replacement")


def dataclass_from_dict(cls: type, values: dict[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from ``values``, raising on unknown or missing keys (naming them)."""
    if not isinstance(values, dict):
        raise TypeError(f"{where}: expected a mapping, got {type(values).__name__} {values!r}")
    allowed = [f.name for f in fields(cls)]
    unknown = sorted(set(values) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; allowed keys: {allowed}")
    missing = [f.name for f in fields(cls)
               if f.default is MISSING and f.default_factory is MISSING and f.name not in values]
    if missing:
        raise ValueError(f"{where}: missing required key(s) {missing}")
    values = dict(values)
    for f in fields(cls):
        # YAML 1.1 reads "3e-4" (no dot) as a string; accept it for float fields.
        if f.type in ("float", "float | None") and isinstance(values.get(f.name), str):
            try:
                values[f.name] = float(values[f.name])
            except ValueError:
                raise ValueError(f"{where}.{f.name} must be a number, got {values[f.name]!r}") from None
    return cls(**values)


@dataclass
class SourceConfig:
    """One text source of the mix: a Hub dataset or local files, with its mixing weight."""

    path: str  # Hub id ("allenai/c4") or packaged builder for local files ("json", "parquet")
    weight: float  # share of training tokens (normalised over sources)
    config: str | None = None  # dataset config name, e.g. "en" for allenai/c4
    data_files: dict[str, str | list[str]] | None = None  # {split: glob or list of globs}
    train_split: str = "train"
    validation_split: str | None = "validation"  # None: no validation loss for this domain
    text_field: str = "text"
    train_skip_docs: int = 0  # documents skipped at the start of train_split (held out for validation)
    validation_take_docs: int | None = None  # documents read from validation_split (None: all)
    shuffle_buffer: int = 0  # streaming shuffle buffer (documents); 0 keeps the stored order

    def check(self, name: str) -> None:
        """Raise a clear error for bad values and, for local builders, missing data files."""
        if not (isinstance(self.weight, (int, float)) and self.weight > 0):
            raise ValueError(f"data.sources.{name}.weight must be a positive number, got {self.weight!r}")
        if self.train_skip_docs < 0 or self.shuffle_buffer < 0:
            raise ValueError(f"data.sources.{name}: train_skip_docs and shuffle_buffer must be >= 0")
        if self.path in LOCAL_BUILDERS:
            if not self.data_files:
                raise ValueError(f"data.sources.{name}: builder {self.path!r} needs data_files {{split: glob}}")
            splits = [self.train_split] + ([self.validation_split] if self.validation_split else [])
            for split in splits:
                if split not in self.data_files:
                    raise ValueError(f"data.sources.{name}.data_files has no {split!r} entry; "
                                     f"it has {sorted(self.data_files)}")
                patterns = self.data_files[split]
                for pattern in [patterns] if isinstance(patterns, str) else patterns:
                    if not glob.glob(os.path.expanduser(pattern)):
                        raise FileNotFoundError(f"data.sources.{name}.data_files[{split!r}]: no file matches "
                                                f"{pattern!r} (relative to {os.getcwd()})")


@dataclass
class DataConfig:
    """The pretraining data mix: tokenizer, sequence length and the weighted sources."""

    tokenizer: str  # local folder or Hub id, loaded with AutoTokenizer
    seq_len: int
    sources: dict[str, SourceConfig]
    stopping_strategy: str = "first_exhausted"
    pack_group_docs: int = 64  # documents packed together; the last partial block of each group is dropped
    validation_sequences: int = 16  # packed sequences per domain used for the validation loss

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "DataConfig":
        config = dataclass_from_dict(cls, values, "data")
        if not isinstance(config.sources, dict) or not config.sources:
            raise ValueError("data.sources must be a non-empty mapping {domain_name: source}")
        config.sources = {name: dataclass_from_dict(SourceConfig, spec, f"data.sources.{name}")
                          for name, spec in config.sources.items()}
        return config

    def check(self) -> None:
        """Validate values and local files (no data is read)."""
        if self.stopping_strategy not in STOPPING_STRATEGIES:
            raise ValueError(f"data.stopping_strategy {self.stopping_strategy!r} not in {STOPPING_STRATEGIES}")
        for key in ("seq_len", "pack_group_docs", "validation_sequences"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) > 0):
                raise ValueError(f"data.{key} must be a positive integer, got {getattr(self, key)!r}")
        for name, source in self.sources.items():
            source.check(name)

    def weights(self) -> dict[str, float]:
        """Normalised mixing weights (token shares)."""
        total = sum(s.weight for s in self.sources.values())
        return {name: s.weight / total for name, s in self.sources.items()}


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer and check it has the EOS token that separates packed documents."""
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {path!r} has no EOS token; packing needs one to separate documents")
    return tokenizer


def open_source(name: str, source: SourceConfig, split: str) -> IterableDataset:
    """Stream one split of a source as examples ``{text_field: str}``; errors if it is empty or lacks the field."""
    try:  # the json builder already reads the first rows to infer features, so an empty file stops here
        dataset = load_dataset(source.path, name=source.config, data_files=source.data_files, split=split,
                               streaming=True)
        first = next(iter(dataset))
    except StopIteration:
        raise ValueError(f"data source {name!r} ({source.path}, split {split!r}) is empty") from None
    if source.text_field not in first:
        raise KeyError(f"data source {name!r}: text_field {source.text_field!r} not in its columns "
                       f"{sorted(first)}")
    return dataset.select_columns([source.text_field])


def tokenize_and_pack(dataset: IterableDataset, tokenizer: PreTrainedTokenizerBase, seq_len: int,
                      text_field: str, group_docs: int, domain: str) -> IterableDataset:
    """Map documents to ``{"input_ids": seq_len tokens, "domain": name}`` blocks (doc EOS doc EOS ...)."""
    eos = tokenizer.eos_token_id

    def pack(batch: dict[str, list]) -> dict[str, list]:
        ids: list[int] = []
        for doc in tokenizer(batch[text_field], add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(doc)
            ids.append(eos)
        blocks = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
        return {"input_ids": blocks, "domain": [domain] * len(blocks)}

    return dataset.map(pack, batched=True, batch_size=group_docs, remove_columns=[text_field])


def build_train_stream(config: DataConfig, tokenizer: PreTrainedTokenizerBase, seed: int, rank: int = 0,
                       world_size: int = 1) -> IterableDataset:
    """The interleaved, packed training stream of one rank (ranks read disjoint documents)."""
    streams = []
    for name, source in config.sources.items():
        dataset = open_source(name, source, source.train_split)
        if source.train_skip_docs:
            dataset = dataset.skip(source.train_skip_docs)
        if source.shuffle_buffer:
            dataset = dataset.shuffle(seed=seed, buffer_size=source.shuffle_buffer)
        # Whole shards per rank when n_shards % world_size == 0, else every world_size-th document.
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        streams.append(tokenize_and_pack(dataset, tokenizer, config.seq_len, source.text_field,
                                         config.pack_group_docs, name))
    weights = config.weights()
    return interleave_datasets(streams, probabilities=[weights[name] for name in config.sources], seed=seed,
                               stopping_strategy=config.stopping_strategy)


def build_validation_sets(config: DataConfig, tokenizer: PreTrainedTokenizerBase) -> dict[str, torch.Tensor]:
    """Per domain, the first ``validation_sequences`` packed sequences of its validation split, (N, seq_len)."""
    sets = {}
    for name, source in config.sources.items():
        if source.validation_split is None:
            continue
        dataset = open_source(name, source, source.validation_split)
        if source.validation_take_docs is not None:
            dataset = dataset.take(source.validation_take_docs)
        packed = tokenize_and_pack(dataset, tokenizer, config.seq_len, source.text_field,
                                   config.pack_group_docs, name)
        rows = [example["input_ids"] for example, _ in zip(packed, range(config.validation_sequences))]
        if not rows:
            raise ValueError(f"validation split of {name!r} has fewer than {config.seq_len} tokens")
        sets[name] = torch.tensor(rows, dtype=torch.long)
    return sets


class DataExhaustedError(RuntimeError):
    """The training stream ended (a source ran out under ``first_exhausted``) before training finished."""


@dataclass
class PackedBatchIterator:
    """Micro-batches ``(batch_size, seq_len)`` from a packed stream, with an exactly resumable position.

    ``state_dict()`` is the stream's ``IterableDataset.state_dict()`` after the last batch returned, plus the
    number of sequences consumed; ``load_state_dict()`` must be called before the first ``next_batch()``.
    """

    dataset: IterableDataset
    batch_size: int
    sequences_consumed: int = 0
    domain_tokens: dict[str, int] = field(default_factory=dict)  # tokens read per domain (this rank)
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
            self.domain_tokens[example["domain"]] = self.domain_tokens.get(example["domain"], 0) + len(
                example["input_ids"])
            self.sequences_consumed += 1
        return torch.tensor(rows, dtype=torch.long)

    def state_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset.state_dict(), "sequences_consumed": self.sequences_consumed,
                "domain_tokens": dict(self.domain_tokens)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self._iterator is not None:
            raise RuntimeError("load_state_dict must be called before the first next_batch()")
        self.dataset.load_state_dict(state["dataset"])
        self.sequences_consumed = state["sequences_consumed"]
        self.domain_tokens = dict(state["domain_tokens"])
