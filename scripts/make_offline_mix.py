"""Build the small offline pretraining mix bundled in ``data/mix`` from the shared corpus.

For every domain (web, wikipedia, arxiv) and split (train, validation) of ``../shared/data/corpus`` the
documents are ranked by ``sha256(text)`` (a content-addressed, reproducible random order) and taken in that
order, skipping documents longer than ``--max-doc-chars``, until the split's text budget is reached. The
records are written unchanged (all fields kept) as gzip JSON lines with gzip mtime 0, so running the script
twice gives byte-identical files. Train documents are dealt round-robin into ``--train-shards`` shards so
that ``datasets.distributed.split_dataset_by_node`` can hand whole shards to two ranks.

Usage::

    python scripts/make_offline_mix.py --corpus ../shared/data/corpus --out data/mix
"""

from __future__ import annotations

import argparse
import glob
import gzip
import hashlib
import io
import json
import os
from pathlib import Path

DOMAINS = ("web", "wikipedia", "arxiv")


def read_records(pattern: str) -> list[dict]:
    """All JSON records of the gzip JSONL files matching ``pattern`` (sorted file order)."""
    files = sorted(glob.glob(pattern))
    if not files:
        raise FileNotFoundError(f"no files match {pattern!r}")
    records = []
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records.extend(json.loads(line) for line in f if line.strip())
    return records


def sample(records: list[dict], budget_chars: int, max_doc_chars: int) -> list[dict]:
    """Documents in sha256(text) order, skipping long ones, until ``budget_chars`` characters are taken."""
    ranked = sorted(records, key=lambda r: hashlib.sha256(r["text"].encode("utf-8")).hexdigest())
    taken, total = [], 0
    for record in ranked:
        if len(record["text"]) > max_doc_chars:
            continue
        taken.append(record)
        total += len(record["text"])
        if total >= budget_chars:
            break
    return taken


def write_jsonl_gz(path: Path, records: list[dict]) -> None:
    """Write gzip JSON lines deterministically (mtime 0, no file name in the gzip header)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
    path.write_bytes(buffer.getvalue())


def main(argv: list[str] | None = None) -> None:
    repo_root = Path(__file__).resolve().parents[1]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=repo_root.parent / "shared" / "data" / "corpus")
    parser.add_argument("--out", type=Path, default=repo_root / "data" / "mix")
    parser.add_argument("--train-chars", type=int, default=1_500_000, help="text budget per domain (train)")
    parser.add_argument("--validation-chars", type=int, default=120_000, help="text budget per domain (val)")
    parser.add_argument("--max-doc-chars", type=int, default=30_000, help="skip longer documents")
    parser.add_argument("--train-shards", type=int, default=2)
    args = parser.parse_args(argv)
    for name in ("train_chars", "validation_chars", "max_doc_chars", "train_shards"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} {getattr(args, name)}: allowed: an integer >= 1")

    summary = {}
    for domain in DOMAINS:
        summary[domain] = {}
        for split, budget in (("train", args.train_chars), ("validation", args.validation_chars)):
            records = sample(read_records(str(args.corpus / domain / f"{split}-*.jsonl.gz")), budget,
                             args.max_doc_chars)
            shards = args.train_shards if split == "train" else 1
            for stale in (args.out / domain).glob(f"{split}-*-of-*.jsonl.gz"):  # an earlier build's shards: the
                stale.unlink()  # configs' train-*.jsonl.gz glob would read them too (every document twice)
            for shard in range(shards):
                path = args.out / domain / f"{split}-{shard:05d}-of-{shards:05d}.jsonl.gz"
                write_jsonl_gz(path, records[shard::shards])
            licences: dict[str, int] = {}
            for record in records:
                licences[record["license"]] = licences.get(record["license"], 0) + 1
            summary[domain][split] = {
                "docs": len(records),
                "text_chars": sum(len(r["text"]) for r in records),
                "licenses": dict(sorted(licences.items(), key=lambda kv: -kv[1])),
            }
    with open(args.out / "stats.json", "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=1, ensure_ascii=False)
        f.write("\n")
    for domain, splits in summary.items():
        for split, s in splits.items():
            print(f"{domain:10s} {split:10s} {s['docs']:5d} docs {s['text_chars'] / 1e6:6.2f} M chars")
    total = sum(os.path.getsize(p) for p in glob.glob(str(args.out / "*" / "*.jsonl.gz")))
    print(f"total on disk: {total / 1e6:.2f} MB -> {args.out}")


if __name__ == "__main__":
    main()
