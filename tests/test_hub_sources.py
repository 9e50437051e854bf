"""Every Hub source of every pretraining recipe (configs/pretrain/*.yaml) loads, offline, against a small local
replica of that Hub repository: its file layout and its README ``configs:`` block, read by
``load_dataset(replica_dir, config, split=..., streaming=True)`` exactly as the Hub id is read (pnet/data.py
`open_source`, `build_validation_sets`, `build_train_stream`; only ``path`` is swapped for the replica folder).

A recipe whose config name, split, text field or data_files pattern no longer matches its repository then fails
here, not in the first minute of a GPU job; the negative cases below show each of those failing, and the old
arxiv source (togethercomputer/RedPajama-Data-1T, a loading script) failing as datasets >= 4 refuses it.

Replica facts (file names, README ``configs:`` blocks, columns) follow the repositories' own pages:
- allenai/c4: en/c4-{train,validation}.NNNNN-of-NNNNN.json.gz, fields text/timestamp/url.
- wikimedia/wikipedia: 20231101.en/train-NNNNN-of-NNNNN.parquet, columns id/url/title/text, one split (train).
- allenai/olmo-mix-1124: config arxiv = data/arxiv/**/* (split train), fields id/text/added/created
  (https://huggingface.co/datasets/allenai/olmo-mix-1124/commit/37ed2b1ce689d9d0166b96d6a5354a0849e00074).
"""

from __future__ import annotations

import gzip
import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pnet.config import LOCAL_BUILDERS, SourceConfig, TextDataConfig, load_pretrain_config
from pnet.data import DataRecordError, build_train_stream, build_validation_sets, load_tokenizer, open_source

REPO_ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO_ROOT / "configs/pretrain").glob("*.yaml"))
EXTRA_DOCS = 6  # documents past each recipe's held-out ones (train_skip_docs)


def doc_text(repo: str, config: str, split: str, index: int) -> str:
    return f"{repo} {config} {split} doc {index:05d} ."


def write_readme(root: Path, configs: list[tuple[str, dict[str, str]]]) -> None:
    """README.md whose YAML header has a ``configs:`` block: [(config_name, {split: path pattern})]."""
    lines = ["---", "configs:"]
    for name, splits in configs:
        lines += [f"- config_name: {name}", "  data_files:"]
        for split, pattern in splits.items():
            lines += [f"  - split: {split}", f"    path: {pattern}"]
    root.mkdir(parents=True, exist_ok=True)
    (root / "README.md").write_text("\n".join(lines + ["---", "", "# replica for tests", ""]))


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)


def build_c4(root: Path, docs: int) -> None:
    write_readme(root, [(name, {"train": f"{name}/c4-train.*.json.gz", "validation": f"{name}/c4-validation.*.json.gz"})
                        for name in ("en", "en.noblocklist")])
    for name in ("en", "en.noblocklist"):
        for split, shards in (("train", 1024), ("validation", 8)):
            write_jsonl_gz(root / name / f"c4-{split}.00000-of-{shards:05d}.json.gz",
                           [{"text": doc_text("c4", name, split, i), "timestamp": "2019-04-25T12:57:54Z",
                             "url": f"https://example.org/{i}"} for i in range(docs)])


def build_wikipedia(root: Path, docs: int) -> None:
    write_readme(root, [(name, {"train": f"{name}/train-*"}) for name in ("20231101.en", "20231101.fr")])
    for name in ("20231101.en", "20231101.fr"):
        (root / name).mkdir(parents=True)
        texts = [doc_text("wikipedia", name, "train", i) for i in range(docs)]
        table = pa.table({"id": [str(i) for i in range(docs)], "url": [f"https://en.wikipedia.org/wiki?curid={i}"
                                                                       for i in range(docs)],
                          "title": [f"Article {i}" for i in range(docs)], "text": texts})
        pq.write_table(table, root / name / "train-00000-of-00041.parquet")


def build_olmo_mix(root: Path, docs: int) -> None:
    configs = ["algebraic-stack", "arxiv", "dclm", "open-web-math", "pes2o", "starcoder", "wiki"]
    write_readme(root, [("default", {"train": "data/**/*"})]
                 + [(name, {"train": f"data/{name}/**/*"}) for name in configs])
    for name in ("arxiv", "wiki"):  # two of its subsets are enough to show the config picks the folder
        write_jsonl_gz(root / "data" / name / f"{name}-0000.json.gz",
                       [{"id": str(i), "text": doc_text("olmo-mix", name, "train", i), "added": "2024-11-01",
                         "created": "2023-01-01"} for i in range(docs)])


REPLICAS = {"allenai/c4": build_c4, "wikimedia/wikipedia": build_wikipedia, "allenai/olmo-mix-1124": build_olmo_mix}


def hub_sources() -> list[tuple[str, str]]:
    """(recipe file, source name) of every Hub source in configs/pretrain/ (local builders are not Hub ids)."""
    found = []
    for recipe in RECIPES:
        data = load_pretrain_config(recipe).data
        found += [(recipe.name, name) for name, source in data.sources.items() if source.path not in LOCAL_BUILDERS]
    return found


def distinct_hub_sources() -> list:
    """One test case per distinct source definition (the paper recipes share theirs); its id names the recipes."""
    cases: dict[str, list[tuple[str, str]]] = {}
    for recipe, name in hub_sources():
        source = load_pretrain_config(REPO_ROOT / "configs/pretrain" / recipe).data.sources[name]
        cases.setdefault(json.dumps([name, source.to_dict()], sort_keys=True), []).append((recipe, name))
    return [pytest.param(*uses[0], id=f"{uses[0][1]}:" + ",".join(r.removesuffix(".yaml") for r, _ in uses))
            for uses in cases.values()]


def recipe_source(recipe: str, name: str) -> tuple[TextDataConfig, SourceConfig]:
    data = load_pretrain_config(REPO_ROOT / "configs/pretrain" / recipe).data
    return data, data.sources[name]


def replica(tmp_path: Path, source: SourceConfig) -> SourceConfig:
    """The source with its Hub id replaced by a local replica folder of that repository."""
    if source.path not in REPLICAS:
        raise AssertionError(f"no replica for Hub source {source.path!r}: add one to REPLICAS in this file")
    root = tmp_path / source.path
    REPLICAS[source.path](root, docs=max(source.train_skip_docs, source.validation_take_docs or 0) + EXTRA_DOCS)
    return source.model_copy(update={"path": str(root)})


def doc_numbers(text: str) -> list[int]:
    return [int(n) for n in re.findall(r"doc (\d{5})", text)]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # recipes name files relative to the repository root


def test_every_recipe_hub_source_has_a_replica():
    sources = hub_sources()
    recipes_with_hub = {recipe for recipe, _ in sources}
    assert len(recipes_with_hub) == 8  # paper-llama1b-{dense, {up,gate,down}-e{4,8}} and tiny-hub
    assert {load_pretrain_config(REPO_ROOT / "configs/pretrain" / r).data.sources[n].path for r, n in sources} == set(
        REPLICAS)
    assert len(sources) == 8 * 3  # c4, wikipedia, arxiv in each


@pytest.mark.parametrize(("recipe", "name"), distinct_hub_sources())
def test_recipe_hub_source_streams_from_replica(tmp_path, recipe, name):
    data, source = recipe_source(recipe, name)
    local = replica(tmp_path, source)
    expected_config = local.config
    for split in dict.fromkeys([local.train_split, local.validation_split]):
        records = list(open_source(name, local, split))
        assert all(not r["bad"] for r in records)
        texts = [r["text"] for r in records]
        assert len(texts) == max(source.train_skip_docs, source.validation_take_docs or 0) + EXTRA_DOCS
        assert all(f" {expected_config} {split} doc " in t for t in texts), texts[:2]  # the recipe's config

    # The whole pipeline on that one source: held-out documents in validation only, train after them.
    small = data.model_copy(update={"sources": {name: local}, "seq_len": 48, "pack_group_docs": 4,
                                    "validation_sequences": 1})
    tokenizer = load_tokenizer(small.tokenizer)
    validation = build_validation_sets(small, tokenizer)[name]
    assert validation.shape == (1, 48)
    held_out = source.validation_take_docs
    seen_validation = doc_numbers(tokenizer.decode(validation[0]))
    assert seen_validation and (held_out is None or max(seen_validation) < held_out)
    first = next(iter(build_train_stream(small, tokenizer, seed=0)))
    assert first["domain"] == name and len(first["input_ids"]) == 48
    seen_train = doc_numbers(tokenizer.decode(first["input_ids"]))
    assert seen_train and min(seen_train) >= source.train_skip_docs


# ---------------------------------------------------------------- a recipe that drifts from its repo fails

def arxiv_source(tmp_path: Path) -> SourceConfig:
    return replica(tmp_path, recipe_source("paper-llama1b-up-e8.yaml", "arxiv")[1])


def c4_source(tmp_path: Path) -> SourceConfig:
    return replica(tmp_path, recipe_source("paper-llama1b-up-e8.yaml", "c4")[1])


def test_renamed_config_fails(tmp_path):
    source = arxiv_source(tmp_path).model_copy(update={"config": "arxiv-latex"})
    with pytest.raises(ValueError, match="arxiv-latex"):
        open_source("arxiv", source, "train")


def test_renamed_split_fails(tmp_path):
    source = c4_source(tmp_path).model_copy(update={"validation_split": "valid"})
    with pytest.raises(ValueError, match="valid"):
        open_source("c4", source, source.validation_split)


def test_renamed_text_field_fails(tmp_path):
    source = arxiv_source(tmp_path).model_copy(update={"text_field": "content"})
    with pytest.raises(DataRecordError, match="text_field 'content' is not one of its columns"):
        open_source("arxiv", source, "train")


def test_data_files_pattern_that_matches_nothing_fails(tmp_path):
    source = c4_source(tmp_path).model_copy(update={"data_files": {"train": "en/c4-train.*.parquet"}})
    with pytest.raises(FileNotFoundError):
        open_source("c4", source, "train")


def test_repository_that_renames_its_files_fails(tmp_path):
    source = arxiv_source(tmp_path)
    folder = Path(source.path) / "data" / "arxiv"
    folder.rename(folder.with_name("arxiv-v2"))
    with pytest.raises(ValueError, match="is empty"):  # its config's data/arxiv/**/* pattern matches nothing
        open_source("arxiv", source, "train")


def test_loading_script_repository_is_refused(tmp_path):
    """The recipes' old arxiv source: RedPajama-Data-1T is a loading script, which datasets >= 4 refuses."""
    root = tmp_path / "togethercomputer" / "RedPajama-Data-1T"
    root.mkdir(parents=True)
    (root / "RedPajama-Data-1T.py").write_text("import datasets\n")
    (root / "README.md").write_text("---\npretty_name: Red Pajama 1T\n---\n")
    source = SourceConfig(path=str(root), config="arxiv", weight=0.114, validation_split="train")
    with pytest.raises(RuntimeError, match="Dataset scripts are no longer supported"):
        open_source("arxiv", source, "train")
