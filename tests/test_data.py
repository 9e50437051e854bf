"""Streaming data pipeline (pnet/data.py) and the bundled offline mix: packing, mix shares, rank split,
exact resume, the errors raised before training (bad settings; bad records named by file, line and field),
skipping bad records, and the tokenizer saved beside a model."""

import gzip
import hashlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from pnet.config import ConfigError, TextDataConfig, load_pretrain_config, parse_config
from pnet.data import (
    DataExhaustedError,
    DataRecordError,
    PackedBatchIterator,
    build_train_stream,
    build_validation_sets,
    check_data,
    load_tokenizer,
    open_source,
)

DOMAINS = ("web", "wikipedia", "arxiv")


def mix_config(repo_root, weights=(0.5, 0.3, 0.2), seq_len=64, **extra) -> TextDataConfig:
    sources = {
        domain: {"path": "json", "weight": weight,
                 "data_files": {"train": str(repo_root / f"data/mix/{domain}/train-*.jsonl.gz"),
                                "validation": str(repo_root / f"data/mix/{domain}/validation-*.jsonl.gz")}}
        for domain, weight in zip(DOMAINS, weights)}
    return parse_config(TextDataConfig, {"tokenizer": str(repo_root / "data/tokenizer/llama"), "seq_len": seq_len,
                                         "pack_group_docs": 8, "sources": sources, **extra})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(Path(__file__).resolve().parents[1] / "data/tokenizer/llama"))


def test_offline_mix_is_deterministic_and_small(repo_root, shared_data, tmp_path):
    spec = importlib.util.spec_from_file_location("make_offline_mix", repo_root / "scripts/make_offline_mix.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--corpus", str(shared_data / "corpus"), "--out", str(tmp_path)])
    bundled = sorted((repo_root / "data/mix").glob("*/*.jsonl.gz"))
    assert len(bundled) == 9  # 3 domains x (2 train shards + 1 validation)
    for path in bundled:
        rebuilt = tmp_path / path.parent.name / path.name
        assert hashlib.sha256(rebuilt.read_bytes()).hexdigest() == hashlib.sha256(path.read_bytes()).hexdigest()
    assert 0.5e6 < sum(p.stat().st_size for p in bundled) < 5e6
    record = json.loads(gzip.open(bundled[0], "rt").readline())
    assert {"text", "source", "license"} <= set(record)
    # Rebuilt with fewer shards, the earlier build's shards go (the configs' train-*.jsonl.gz glob read both sets).
    module.main(["--corpus", str(shared_data / "corpus"), "--out", str(tmp_path), "--train-shards", "1"])
    assert sorted(p.name for p in (tmp_path / "web").glob("*.jsonl.gz")) == [
        "train-00000-of-00001.jsonl.gz", "validation-00000-of-00001.jsonl.gz"]
    with pytest.raises(SystemExit):
        module.main(["--corpus", str(shared_data / "corpus"), "--out", str(tmp_path), "--train-shards", "0"])


def test_packing_joins_documents_with_eos(repo_root, tokenizer):
    config = mix_config(repo_root, weights=(1.0, 0.0001, 0.0001), seq_len=32)
    config.sources = {"web": config.sources["web"]}
    stream = PackedBatchIterator(build_train_stream(config, tokenizer, seed=0), batch_size=6)
    got = stream.next_batch()
    with gzip.open(repo_root / "data/mix/web/train-00000-of-00002.jsonl.gz", "rt") as f:
        first_docs = [json.loads(next(f))["text"] for _ in range(8)]
    expected = []
    for text in first_docs:
        expected += tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    assert got.shape == (6, 32)
    assert got.flatten().tolist() == expected[:6 * 32]
    assert tokenizer.bos_token_id not in got.flatten().tolist()[:200]


def test_mix_weights_are_token_shares(repo_root, tokenizer):
    weights = (0.6, 0.3, 0.1)
    stream = PackedBatchIterator(build_train_stream(mix_config(repo_root, weights), tokenizer, seed=3), 16)
    for _ in range(40):  # 640 sequences of 64 tokens
        stream.next_batch()
    total = sum(stream.domain_tokens.values())
    assert total == 640 * 64
    for domain, weight in zip(DOMAINS, weights):
        assert abs(stream.domain_tokens[domain] / total - weight) < 0.05, stream.domain_tokens


def test_two_ranks_read_disjoint_data(repo_root, tokenizer):
    config = mix_config(repo_root)
    seen = []
    for rank in range(2):
        stream = PackedBatchIterator(build_train_stream(config, tokenizer, seed=0, rank=rank, world_size=2), 8)
        seen.append({tuple(row) for _ in range(20) for row in stream.next_batch().tolist()})
    assert len(seen[0]) == len(seen[1]) == 160
    assert not seen[0] & seen[1]


def test_resume_from_state_dict_gives_same_stream(repo_root, tokenizer):
    config = mix_config(repo_root)
    config.sources["web"].shuffle_buffer = 16  # resume must also hold with a streaming shuffle buffer
    reference = PackedBatchIterator(build_train_stream(config, tokenizer, seed=1), 4)
    expected = [reference.next_batch() for _ in range(30)]
    first = PackedBatchIterator(build_train_stream(config, tokenizer, seed=1), 4)
    for _ in range(13):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = PackedBatchIterator(build_train_stream(config, tokenizer, seed=1), 4)
    resumed.load_state_dict(state)
    assert resumed.sequences_consumed == 52
    for step in range(13, 30):
        assert torch.equal(resumed.next_batch(), expected[step]), step


def test_validation_sets_per_domain(repo_root, tokenizer):
    sets = build_validation_sets(mix_config(repo_root, validation_sequences=5), tokenizer)
    assert list(sets) == list(DOMAINS)
    assert all(v.shape == (5, 64) for v in sets.values())
    assert not torch.equal(sets["web"], sets["arxiv"])


def test_exhausted_stream_raises(tmp_path, repo_root, tokenizer):
    path = tmp_path / "tiny.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.write(json.dumps({"text": "one short document " * 20}) + "\n")
    config = single_source(repo_root, path, seq_len=16)
    stream = PackedBatchIterator(build_train_stream(config, tokenizer, seed=0), 2)
    with pytest.raises(DataExhaustedError, match="exhausted after"):
        for _ in range(100):
            stream.next_batch()


# ----------------------------------------------------------------------------------------------- bad input

def single_source(repo_root, path, seq_len=16, **extra) -> TextDataConfig:
    return parse_config(TextDataConfig, {
        "tokenizer": str(repo_root / "data/tokenizer/llama"), "seq_len": seq_len, "pack_group_docs": 4, **extra,
        "sources": {"only": {"path": "json", "weight": 1, "validation_split": None,
                             "data_files": {"train": str(path)}}}})


def write_yaml(path, repo_root, **changes):
    import yaml

    values = yaml.safe_load((repo_root / "configs/pretrain/tiny-cpu.yaml").read_text())
    values.update(changes)
    path.write_text(yaml.safe_dump(values))
    return path


def test_unknown_config_keys_are_errors(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    path = write_yaml(tmp_path / "c.yaml", repo_root, learning_rate=1e-3)
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key\(s\) \['learning_rate'\]; allowed: \['adam_beta1'"):
        load_pretrain_config(path)
    tiny = repo_root / "configs/pretrain/tiny-cpu.yaml"
    with pytest.raises(ConfigError, match=r"data.sources.web: unknown key\(s\) \['wieght'\] \('wieght' -> did you "
                                          r"mean 'weight'\?\)"):
        load_pretrain_config(tiny, ["data.sources.web.wieght=2"])
    with pytest.raises(ConfigError, match=r"command-line override: unknown key\(s\) \['nosuch'\]"):  # not the file's
        load_pretrain_config(tiny, ["nosuch.x=1"])
    with pytest.raises(ConfigError, match="data.stopping_strategy='sometimes': Input should be 'first_exhausted', "
                                          "'all_exhausted' or 'all_exhausted_without_replacement'"):
        load_pretrain_config(tiny, ["data.stopping_strategy=sometimes"])
    with pytest.raises(ConfigError, match="data.sources.arxiv.weight=0: Input should be greater than 0"):
        load_pretrain_config(tiny, ["data.sources.arxiv.weight=0"])
    with pytest.raises(ConfigError, match="data.on_bad_record='ignore': Input should be 'error' or 'skip'"):
        load_pretrain_config(tiny, ["data.on_bad_record=ignore"])


def test_batch_that_does_not_divide_is_an_error(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    tiny = repo_root / "configs/pretrain/tiny-cpu.yaml"
    with pytest.raises(ConfigError, match=r"global_batch_tokens=5000 is not a multiple of micro_batch_size \(2\) x "
                                          r"data.seq_len \(256\) = 512"):
        load_pretrain_config(tiny, ["global_batch_tokens=5000"])
    config = load_pretrain_config(tiny, ["global_batch_tokens=1536", "micro_batch_size=2"])
    with pytest.raises(ConfigError, match="global_batch_tokens=1536 is not a multiple .* world_size \\(2\\) = 1024"):
        config.grad_accum_steps(world_size=2)
    config = load_pretrain_config(tiny, ["global_batch_tokens=8192", "micro_batch_size=4", "data.seq_len=256"])
    assert config.grad_accum_steps(world_size=2) == 4


def test_missing_data_files_are_errors(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    with pytest.raises(ConfigError, match="data.sources.web: data_files\\['train'\\]: no file matches "
                                          "'data/mix/web/nothing-\\*.jsonl.gz'"):
        load_pretrain_config(repo_root / "configs/pretrain/tiny-cpu.yaml",
                             ["data.sources.web.data_files.train=data/mix/web/nothing-*.jsonl.gz"])


def test_empty_source_and_missing_text_field(tmp_path, repo_root, tokenizer):
    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wt"):
        pass
    other = tmp_path / "other.jsonl.gz"
    with gzip.open(other, "wt") as f:
        f.write(json.dumps({"content": "x" * 500}) + "\n")
    with pytest.raises(DataRecordError, match=f"{empty}: no records \\(an empty shard\\); remove it from data_files"):
        build_train_stream(single_source(repo_root, empty), tokenizer, seed=0)
    with pytest.raises(DataRecordError, match=f"{other}, line 1: no field 'text' \\(fields: \\['content'\\]\\)"):
        build_train_stream(single_source(repo_root, other), tokenizer, seed=0)


def write_shard(path, records) -> None:
    """JSON Lines shard (gzip when the name ends in .gz); a str record is written as that raw line."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for record in records:
            f.write((record if isinstance(record, str) else json.dumps(record)) + "\n")


GOOD = [{"text": f"document number {i} " + "words " * 20} for i in range(100)]
BAD_RECORDS = {  # what lands at line 71 of a shard -> what the error says
    "malformed": ('{"text": "a line cut in the middle', "line 71: not valid JSON"),
    "null": ({"text": None}, "line 71: field 'text' is null"),
    "number": ({"text": 5}, "line 71: field 'text' is int 5, not a string"),
    "missing": ({"body": "x"}, r"line 71: no field 'text' \(fields: \['body'\]\)"),
    "not_object": ('["a", "list"]', "line 71: not a JSON object but list"),
}


@pytest.mark.parametrize("kind", sorted(BAD_RECORDS))
def test_bad_record_is_an_error_naming_file_line_and_field(kind, tmp_path, repo_root, tokenizer):
    """Found when the source is opened, before a single batch: file, line and field in one message (before: a 13-20
    frame pyarrow/tokenizers traceback without a location, sometimes many steps into training)."""
    record, message = BAD_RECORDS[kind]
    shard = tmp_path / "train-00001.jsonl.gz"
    write_shard(tmp_path / "train-00000.jsonl.gz", GOOD)
    write_shard(shard, GOOD[:70] + [record] + GOOD[70:])
    config = single_source(repo_root, tmp_path / "train-*.jsonl.gz")
    with pytest.raises(DataRecordError, match=f"data source 'only' \\(train\\): {shard}, {message}"):
        check_data(config)
    with pytest.raises(DataRecordError, match="data.on_bad_record=skip"):
        build_train_stream(config, tokenizer, seed=0)


def test_bad_records_are_skipped_and_counted(tmp_path, repo_root, tokenizer):
    """on_bad_record: skip gives exactly the stream of the file without its bad lines, and counts them (also across
    a resume from the iterator's state)."""
    bad = [record for record, _ in BAD_RECORDS.values()]
    mixed = GOOD[:30] + bad[:2] + GOOD[30:60] + bad[2:] + GOOD[60:]
    write_shard(tmp_path / "mixed.jsonl", mixed)
    write_shard(tmp_path / "clean.jsonl", GOOD)
    config = single_source(repo_root, tmp_path / "mixed.jsonl", on_bad_record="skip")
    [check] = check_data(config)
    assert (check.records, check.bad, len(check.examples)) == (105, 5, 5)
    assert check.examples[0] == f"{tmp_path / 'mixed.jsonl'}, line 31: not valid JSON (Invalid control character " \
                                "at column 35)"
    clean = PackedBatchIterator(build_train_stream(single_source(repo_root, tmp_path / "clean.jsonl"), tokenizer,
                                                   seed=0), 4)
    skipping = PackedBatchIterator(build_train_stream(config, tokenizer, seed=0), 4)
    for _ in range(5):
        assert torch.equal(skipping.next_batch(), clean.next_batch())
    state = json.loads(json.dumps(skipping.state_dict()))
    resumed = PackedBatchIterator(build_train_stream(config, tokenizer, seed=0), 4)
    resumed.load_state_dict(state)
    with pytest.raises(DataExhaustedError):
        while True:
            resumed.next_batch()
    assert resumed.skipped_records == {"only": 5}


# --------------------------------------------------------------------------------------------- tokenizer export

def test_prepare_tokenizer_for_model(tmp_path, repo_root):
    """The tokenizer saved beside a model pads (batched generation, classifier batches), knows the model's context
    length, and carries no load-time settings."""
    from transformers import AutoTokenizer, LlamaConfig

    from pnet.model_loading import prepare_tokenizer_for_model

    tokenizer = AutoTokenizer.from_pretrained(repo_root / "data/tokenizer/llama", local_files_only=True)
    assert tokenizer.pad_token is None and tokenizer.model_max_length == 2048
    model_config = LlamaConfig(max_position_embeddings=96)
    prepare_tokenizer_for_model(tokenizer, model_config)
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert saved["pad_token"] == "<unk>" and saved["model_max_length"] == 96
    assert not {"local_files_only", "is_local", "cache_dir", "revision"} & set(saved)
    assert model_config.pad_token_id == 0
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    batch = reloaded(["a", "a longer sentence here"], padding=True, return_tensors="pt")
    assert batch.input_ids.shape == (2, 5) and batch.input_ids[0, -1] == reloaded.pad_token_id == 0
    assert reloaded.model_max_length == 96


def test_tokenizer_without_eos_is_an_error(tmp_path, tokenizer):
    tokenizer.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    values = json.loads(config_path.read_text())
    values["eos_token"] = None
    config_path.write_text(json.dumps(values))
    special = tmp_path / "special_tokens_map.json"
    if special.exists():
        special.unlink()
    with pytest.raises(ValueError, match="has no EOS token"):
        load_tokenizer(str(tmp_path))


# ------------------------------------------------------------------------- bad input found up front (issue 20)

def write_lines(path, lines: list[bytes]) -> None:
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


GOOD_LINES = [json.dumps(record).encode() for record in GOOD]
BAD_LINES = {  # a raw line at line 71 -> what the error names (the record is skippable)
    "invalid_utf8": (b'{"text": "caf\xe9 au lait"}', "line 71: invalid UTF-8 byte 0xe9 at character 14"),
    "lone_surrogate": (b'{"text": "half a pair \\ud800 here"}',
                       r"line 71: field 'text' holds a lone surrogate \\ud800 at character 13"),
}


@pytest.mark.parametrize("kind", sorted(BAD_LINES))
def test_undecodable_records_are_named_by_line_or_skipped_like_the_stream_skips_them(kind, tmp_path, repo_root,
                                                                                      tokenizer):
    """An invalid UTF-8 byte (also with skip) and an escaped lone surrogate, which the tokenizer rejects, gave raw
    tracebacks, some after the model was built."""
    line, message = BAD_LINES[kind]
    shard = tmp_path / "bad.jsonl.gz"
    write_lines(shard, GOOD_LINES[:70] + [line] + GOOD_LINES[70:])
    with pytest.raises(DataRecordError, match=f"data source 'only' \\(train\\): {shard}, {message}"):
        check_data(single_source(repo_root, shard))
    config = single_source(repo_root, shard, on_bad_record="skip")
    [check] = check_data(config)
    assert (check.records, check.bad) == (101, 1)
    write_lines(tmp_path / "clean.jsonl.gz", GOOD_LINES)
    clean = PackedBatchIterator(build_train_stream(single_source(repo_root, tmp_path / "clean.jsonl.gz"), tokenizer,
                                                   seed=0), 4)
    skipping = PackedBatchIterator(build_train_stream(config, tokenizer, seed=0), 4)
    for _ in range(5):  # the same stream up to the bad record (after it, packing groups hold one document less)
        assert torch.equal(skipping.next_batch(), clean.next_batch())
    with pytest.raises(DataExhaustedError):  # the stream reads past it: skipped, not a decode error
        while True:
            skipping.next_batch()
    assert skipping.skipped_records == {"only": 1}


def damaged_gzip(path) -> None:
    write_lines(path, GOOD_LINES)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


DAMAGED_FILES = {  # a file -> what the error says; skip cannot help
    "garbage_gz": (lambda p: p.write_bytes(b"this is not gzip data at all\n" * 10), "cannot be read after line 0: "),
    "truncated_gz": (damaged_gzip, "cannot be read after line \\d+: Compressed file ended"),
    "empty_shard": (lambda p: write_lines(p, [b""]), "no records \\(an empty shard\\)"),
}


@pytest.mark.parametrize("kind", sorted(DAMAGED_FILES))
@pytest.mark.parametrize("on_bad_record", ["error", "skip"])
def test_damaged_files_are_named_before_anything_is_built(kind, on_bad_record, tmp_path, repo_root):
    write_lines(tmp_path / "train-0.jsonl.gz", GOOD_LINES)
    make, message = DAMAGED_FILES[kind]
    make(tmp_path / "train-1.jsonl.gz")
    with pytest.raises(DataRecordError, match=f"{tmp_path / 'train-1.jsonl.gz'}: {message}"):
        check_data(single_source(repo_root, tmp_path / "train-*.jsonl.gz", on_bad_record=on_bad_record))


def test_a_csv_empty_cell_is_named_by_line_or_skipped(tmp_path, repo_root, tokenizer):
    rows = [f"{i},document number {i} {'words ' * 20}" for i in range(100)]
    (tmp_path / "bad.csv").write_text("id,text\n" + "\n".join(rows[:40] + ["40,"] + rows[40:]) + "\n")
    (tmp_path / "clean.csv").write_text("id,text\n" + "\n".join(rows) + "\n")

    def csv_source(name, **extra):
        config = single_source(repo_root, tmp_path / name, **extra)
        config.sources["only"].path = "csv"
        return config

    with pytest.raises(DataRecordError, match=f"{tmp_path / 'bad.csv'}, line 42: field 'text' is an empty cell"):
        check_data(csv_source("bad.csv"))
    [check] = check_data(csv_source("bad.csv", on_bad_record="skip"))
    assert (check.records, check.bad) == (101, 1)
    clean = PackedBatchIterator(build_train_stream(csv_source("clean.csv"), tokenizer, seed=0), 4)
    skipping = PackedBatchIterator(build_train_stream(csv_source("bad.csv", on_bad_record="skip"), tokenizer, seed=0), 4)
    for _ in range(5):
        assert torch.equal(skipping.next_batch(), clean.next_batch())
    with pytest.raises(DataExhaustedError):
        while True:
            skipping.next_batch()
    assert skipping.skipped_records == {"only": 1}


def test_a_folder_matching_the_glob_is_a_config_error(tmp_path, repo_root):
    write_lines(tmp_path / "train-0.jsonl.gz", GOOD_LINES)
    (tmp_path / "train-old.jsonl.gz").mkdir()
    with pytest.raises(ConfigError, match=re.escape(f"'{tmp_path / 'train-*.jsonl.gz'}' matches the folder "
                                                    f"'{tmp_path / 'train-old.jsonl.gz'}'; data files must be files")):
        single_source(repo_root, tmp_path / "train-*.jsonl.gz")


# ------------------------------------------------------------------ found by probing the real commands (stop 28)

def test_an_upper_case_gz_is_gzip(tmp_path, repo_root, tokenizer):
    """UP.JSONL.GZ was read as text: a misleading 'invalid UTF-8 byte 0x8b', or with skip every line a bad record."""
    write_lines(tmp_path / "up.jsonl.gz", GOOD_LINES)
    (tmp_path / "up.jsonl.gz").rename(tmp_path / "UP.JSONL.GZ")
    [check] = check_data(single_source(repo_root, tmp_path / "UP.JSONL.GZ"))
    assert (check.records, check.bad) == (len(GOOD_LINES), 0)


def test_an_empty_parquet_shard_is_named_before_anything_is_built(tmp_path, repo_root):
    """As an empty JSON Lines shard; the stream used to fail on it with ArrowInvalid: BatchSize ... 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [f"document {i} " * 30 for i in range(8)]}), tmp_path / "train-0.parquet")
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "train-1.parquet")
    config = single_source(repo_root, tmp_path / "train-*.parquet")
    config.sources["only"].path = "parquet"
    for on_bad_record in ("error", "skip"):
        config.on_bad_record = on_bad_record
        with pytest.raises(DataRecordError, match=f"{tmp_path / 'train-1.parquet'}: no records \\(an empty shard\\)"):
            check_data(config)


def test_a_file_listed_or_matched_twice_is_a_config_error(tmp_path, repo_root):
    """It was read twice, against first_exhausted's promise that no document repeats."""
    write_lines(tmp_path / "low.jsonl.gz", GOOD_LINES)
    with pytest.raises(ConfigError, match=re.escape(f"{str(tmp_path / 'low.jsonl.gz')!r} is listed or matched more "
                                                    "than once")):
        parse_config(TextDataConfig, {
            "tokenizer": str(repo_root / "data/tokenizer/llama"), "seq_len": 16,
            "sources": {"only": {"path": "json", "weight": 1, "validation_split": None, "data_files": {
                "train": [str(tmp_path / "low.jsonl.gz"), str(tmp_path / "low*.gz")]}}}})


def test_a_folder_without_tokenizer_files_is_a_config_error(tmp_path):
    """transformers raises ValueError there (not OSError): it ended in a traceback."""
    with pytest.raises(ConfigError, match=f"data.tokenizer='{tmp_path}': no tokenizer could be loaded from it"):
        load_tokenizer(str(tmp_path))


def test_a_validation_split_too_short_for_one_sequence_is_a_data_error(tmp_path, repo_root, tokenizer):
    """It was a ValueError, a traceback after the model was built."""
    (tmp_path / "val.jsonl").write_text(json.dumps({"text": "short doc"}) + "\n")
    config = single_source(repo_root, tmp_path / "val.jsonl", seq_len=256)
    config.sources["only"].validation_split = "train"
    with pytest.raises(DataRecordError, match="validation split of 'only' has fewer than data.seq_len=256 tokens"):
        build_validation_sets(config, tokenizer)


def test_fewer_validation_sequences_than_processes_is_a_config_error(repo_root, tokenizer):
    """Two processes and validation_sequences=1: one scored nothing, and the run stopped on a NaN validation loss."""
    config = mix_config(repo_root, validation_sequences=1)
    assert {len(rows) for rows in build_validation_sets(config, tokenizer, world_size=1).values()} == {1}
    with pytest.raises(ConfigError, match="validation split of 'web': 1 packed sequence\\(s\\) for 2 processes; "
                                          "allowed: data.validation_sequences >= 2"):
        build_validation_sets(config, tokenizer, world_size=2)


def test_csv_cells_that_pandas_would_read_as_null_are_text(tmp_path, repo_root, tokenizer):
    """NA, null, NaN, N/A: text to the up-front check, and now to the stream too (pandas' defaults made them null:
    the stream stopped on them mid-training, or skipped them uncounted by the check)."""
    words = ["NA", "null", "NaN", "N/A", "None", "#N/A"]
    rows = [f"{i},{word}" for i, word in enumerate(words)]
    (tmp_path / "na.csv").write_text("id,text\n" + "\n".join(rows) + "\n")
    config = single_source(repo_root, tmp_path / "na.csv")
    config.sources["only"].path = "csv"
    [check] = check_data(config)
    assert (check.records, check.bad) == (len(words), 0)
    records = list(open_source("only", config.sources["only"], "train"))
    assert [r["text"] for r in records] == words and not any(r["bad"] for r in records)


def test_a_text_source_is_checked_before_anything_is_built(tmp_path, repo_root):
    """`path: text` was never checked: an invalid byte failed the stream with a bare UnicodeDecodeError."""
    (tmp_path / "good.txt").write_text("hello\nworld\n")
    (tmp_path / "bad.txt").write_bytes(b"hello\nbad \xff byte\n")
    config = single_source(repo_root, tmp_path / "good.txt")
    config.sources["only"].path = "text"
    [check] = check_data(config)
    assert (check.records, check.bad) == (2, 0)
    config.sources["only"].data_files = {"train": str(tmp_path / "bad.txt")}
    for on_bad_record in ("error", "skip"):
        config.on_bad_record = on_bad_record
        with pytest.raises(DataRecordError, match=f"{tmp_path / 'bad.txt'}, line 2: invalid UTF-8 byte 0xff"):
            check_data(config)
