"""Word-shingle overlap between a held-out text and the whole pretraining corpus.

A shingle is n consecutive words (lower-cased ``\\w+`` tokens, the convention of ``shared/data/corpus/README.md``'s
eval-set check) inside one document. The held-out file's distinct shingles are collected; every document of
every corpus file (train and validation, all domains) is streamed past them. Printed, per n: the fraction of the
held-out shingles that also occur in the corpus, the held-out documents that share any, and the shared shingles
themselves with the corpus source they were found in (so a reader can judge whether they are quotations or
stock phrases). The held-out file may be JSON Lines (``--text-field``, ``.gz`` allowed) or plain text.

Usage::

    python scripts/check_heldout_overlap.py eval/data/heldout/botchan.jsonl.gz --corpus ../shared/data/corpus
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import re
from collections import Counter
from pathlib import Path

from pnet_eval.perplexity import read_documents

WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def shingles(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return {tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("heldout", type=Path, help="held-out file (.jsonl[.gz] or plain text)")
    parser.add_argument("--corpus", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/corpus")
    parser.add_argument("--n", type=int, nargs="+", default=[5, 8, 13], help="shingle sizes (default: 5 8 13)")
    parser.add_argument("--text-field", default="text")
    parser.add_argument("--show", type=int, default=10, help="shared shingles listed per n")
    args = parser.parse_args(argv)
    if min(args.n) < 1 or args.show < 0:
        parser.error(f"--n {args.n} / --show {args.show}: allowed: shingle sizes >= 1, --show >= 0")
    try:  # the file rules of pnet-eval --perplexity, which scores the same files
        texts = read_documents(args.heldout, args.text_field)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))

    docs = [words(t) for t in texts]
    heldout = {n: [shingles(d, n) for d in docs] for n in args.n}
    wanted = {n: set().union(*per_doc) for n, per_doc in heldout.items()}
    found: dict[int, dict[tuple[str, ...], str]] = {n: {} for n in args.n}
    files = sorted(glob.glob(str(args.corpus / "*" / "*.jsonl.gz")))
    if not files:
        raise SystemExit(f"no corpus files under {args.corpus}/*/*.jsonl.gz")
    corpus_docs = corpus_words = 0
    for path in files:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                record = json.loads(line)
                tokens = words(record["text"])
                corpus_docs += 1
                corpus_words += len(tokens)
                for n in args.n:
                    for i in range(len(tokens) - n + 1):
                        gram = tuple(tokens[i : i + n])
                        if gram in wanted[n] and gram not in found[n]:
                            found[n][gram] = record.get("source", Path(path).parent.name)

    print(f"held-out: {args.heldout.name}: {len(docs)} documents, {sum(map(len, docs))} words")
    print(f"corpus: {args.corpus}: {len(files)} files, {corpus_docs} documents, {corpus_words} words")
    print()
    print("| n | held-out shingles (distinct) | found in corpus | overlap fraction | held-out docs sharing any |")
    print("|---:|---:|---:|---:|---:|")
    for n in args.n:
        shared_docs = sum(1 for per_doc in heldout[n] if per_doc & found[n].keys())
        total = len(wanted[n])
        fraction = f"{len(found[n]) / total:.6f}" if total else "- (no document has n words)"
        print(f"| {n} | {total} | {len(found[n])} | {fraction} | {shared_docs} / {len(docs)} |")
    for n in args.n:
        if not found[n]:
            continue
        sources = Counter(found[n].values())
        print(f"\nshared {n}-word shingles: {len(found[n])} from {len(sources)} corpus sources; the top {args.show}:")
        for source, count in sources.most_common(args.show):
            print(f"  {source}: {count}")
        print(f"the first {args.show} shingles found:")
        for gram, source in list(found[n].items())[: args.show]:
            print(f"  - \"{' '.join(gram)}\" ({source})")


if __name__ == "__main__":
    main()
