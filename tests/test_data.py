"""Streaming data pipeline (pnet/data.py) and the bundled offline mix: packing, mix shares, rank split,
exact resume, and the errors raised before training."""

import gzip
import hashlib
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pnet.data import (
    DataConfig,
    DataExhaustedError,
    PackedBatchIterator,
    build_train_stream,
    build_validation_sets,
    load_tokenizer,
)
from pnet.train_utils import load_config

DOMAINS = ("web", "wikipedia", "arxiv")


def mix_config(repo_root, weights=(0.5, 0.3, 0.2), seq_len=64, **extra) -> DataConfig:
    sources = {
        domain: {"path": "json", "weight": weight,
                 "data_files": {"train": str(repo_root / f"data/mix/{domain}/train-*.jsonl.gz"),
                                "validation": str(repo_root / f"data/mix/{domain}/validation-*.jsonl.gz")}}
        for domain, weight in zip(DOMAINS, weights)}
    config = DataConfig.from_dict({"tokenizer": str(repo_root / "data/tokenizer/llama"), "seq_len": seq_len,
                                   "pack_group_docs": 8, "sources": sources, **extra})
    config.check()
    return config


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
    config = DataConfig.from_dict({"tokenizer": str(repo_root / "data/tokenizer/llama"), "seq_len": 16,
                                   "sources": {"only": {"path": "json", "weight": 1, "validation_split": None,
                                                        "data_files": {"train": str(path)}}}})
    stream = PackedBatchIterator(build_train_stream(config, tokenizer, seed=0), 2)
    with pytest.raises(DataExhaustedError, match="exhausted after"):
        for _ in range(100):
            stream.next_batch()


# ----------------------------------------------------------------------------------------------- bad input

def write_yaml(path, repo_root, **changes):
    import yaml

    values = yaml.safe_load((repo_root / "configs/pretrain/tiny-cpu.yaml").read_text())
    values.update(changes)
    path.write_text(yaml.safe_dump(values))
    return path


def test_unknown_config_keys_are_errors(tmp_path, repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    path = write_yaml(tmp_path / "c.yaml", repo_root, learning_rate=1e-3)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['learning_rate'\]"):
        load_config(path)
    with pytest.raises(ValueError, match=r"data.sources.web: unknown key\(s\) \['wieght'\]"):
        load_config(repo_root / "configs/pretrain/tiny-cpu.yaml", ["data.sources.web.wieght=2"])
    with pytest.raises(ValueError, match="'nosuch' is not a section"):
        load_config(repo_root / "configs/pretrain/tiny-cpu.yaml", ["nosuch.x=1"])
    with pytest.raises(ValueError, match="stopping_strategy 'sometimes'"):
        load_config(repo_root / "configs/pretrain/tiny-cpu.yaml", ["data.stopping_strategy=sometimes"])
    with pytest.raises(ValueError, match="weight must be a positive number"):
        load_config(repo_root / "configs/pretrain/tiny-cpu.yaml", ["data.sources.arxiv.weight=0"])


def test_batch_that_does_not_divide_is_an_error(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    config = load_config(repo_root / "configs/pretrain/tiny-cpu.yaml", ["global_batch_tokens=5000"])
    with pytest.raises(ValueError, match="global_batch_tokens=5000 is not a multiple"):
        config.grad_accum_steps(world_size=1)
    config = load_config(repo_root / "configs/pretrain/tiny-cpu.yaml",
                         ["global_batch_tokens=8192", "micro_batch_size=4", "data.seq_len=256"])
    assert config.grad_accum_steps(world_size=2) == 4


def test_missing_data_files_are_errors(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    with pytest.raises(FileNotFoundError, match="no file matches 'data/mix/web/nothing-\\*.jsonl.gz'"):
        load_config(repo_root / "configs/pretrain/tiny-cpu.yaml",
                    ["data.sources.web.data_files.train=data/mix/web/nothing-*.jsonl.gz"])


def test_empty_source_and_missing_text_field(tmp_path, repo_root, tokenizer):
    empty = tmp_path / "empty.jsonl.gz"
    with gzip.open(empty, "wt"):
        pass
    other = tmp_path / "other.jsonl.gz"
    with gzip.open(other, "wt") as f:
        f.write(json.dumps({"content": "x" * 500}) + "\n")
    for path, error, message in ((empty, ValueError, "'bad' .* is empty"), (other, KeyError, "text_field 'text'")):
        config = DataConfig.from_dict({"tokenizer": "unused", "seq_len": 16, "sources": {
            "bad": {"path": "json", "weight": 1, "validation_split": None, "data_files": {"train": str(path)}}}})
        config.check()
        with pytest.raises(error, match=message):
            build_train_stream(config, tokenizer, seed=0)


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
