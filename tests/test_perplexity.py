"""pnet_eval.perplexity: lm-eval rolling-window perplexity from Python and `pnet-eval --perplexity`, checked against
a direct computation with the model, plus input checks, the report columns and the bundled held-out text."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pnet_eval import perplexity, report

REPO_ROOT = Path(__file__).resolve().parents[1]
WINDOW = 16  # tokens per rolling window: every fixture document longer than one window
# Short on purpose (2 CPU cores); sentences from the bundled held-out text and from everyday English.
PLAIN_TEXT = (
    "Because of an hereditary recklessness, I have been playing always a losing game since my childhood.\n"
    "During my grammar school days, I was once laid up for about a week by jumping from the second story.\n"
)
JSONL_DOCS = [
    "With a long, sonorous whistle the steamer came to a standstill, and a boat was seen making toward it.",
    "Short one.",
    "My teaching began at last. When I entered the class-room, I felt somewhat strange.",
]
METRIC_KEYS = ("word_perplexity", "byte_perplexity", "bits_per_byte", "token_perplexity")


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("texts")
    (root / "story.txt").write_text(PLAIN_TEXT, encoding="utf-8")
    with gzip.open(root / "chapters.jsonl.gz", "wt", encoding="utf-8") as f:
        for i, text in enumerate(JSONL_DOCS):
            f.write(json.dumps({"id": i, "text": text}) + "\n")
    return {"story": root / "story.txt", "chapters": root / "chapters.jsonl.gz"}


@pytest.fixture(scope="module")
def python_results(tiny_pnet_dir, text_files, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("ppl_python")
    summaries = perplexity.evaluate_perplexity(
        str(tiny_pnet_dir), [text_files["story"], text_files["chapters"]], max_length=WINDOW, device="cpu",
        output_dir=out,
    )
    assert len(summaries) == 1
    written = json.loads((out / tiny_pnet_dir.name / perplexity.PERPLEXITY_RESULTS_FILE).read_text())
    assert written == json.loads(json.dumps(summaries[0]))
    return written


def reference_loglikelihood(model, ids: list[int], prefix: int, window: int) -> float:
    """Direct NLL over lm-eval's rolling windows: the text's tokens are cut into chunks of `window`; each chunk is
    scored by one forward pass over the `window` tokens that end just before its last token, the prefix token
    standing in front of the text (so the first chunk reads [prefix] + chunk[:-1])."""
    sequence = [prefix] + ids
    total = 0.0
    for start in range(0, len(ids), window):
        end = min(start + window, len(ids))
        inputs = sequence[max(0, end - window) : end]  # ends just before ids[end - 1] (= sequence[end])
        targets = ids[start:end]
        with torch.no_grad():
            logits = model(torch.tensor([inputs])).logits[0].double()
        log_probs = logits[-len(targets) :].log_softmax(-1)
        total += log_probs[torch.arange(len(targets)), torch.tensor(targets)].sum().item()
    return total


def test_python_figures_equal_direct_computation(python_results, tiny_pnet_dir):
    """LL, token count and all four metrics equal a computation with the model over the same windows."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_pnet_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_pnet_dir).eval()
    files = python_results["files"]
    assert set(files) == {"story", "chapters"}
    for label, docs, fmt in (("story", [PLAIN_TEXT], "text"), ("chapters", JSONL_DOCS, "jsonl")):
        entry = files[label]
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in docs]
        assert max(map(len, ids)) > WINDOW  # several windows, a partial last one (49 = 3 x 16 + 1; 28 = 16 + 12)
        ll = sum(reference_loglikelihood(model, x, tokenizer.bos_token_id, WINDOW) for x in ids)
        tokens = sum(map(len, ids))
        words = sum(len(text.split()) for text in docs)
        n_bytes = sum(len(text.encode("utf-8")) for text in docs)
        assert (entry["format"], entry["docs"], entry["tokens"], entry["words"], entry["bytes"]) == (
            fmt, len(docs), tokens, words, n_bytes
        )
        assert entry["max_length"] == WINDOW and entry["prefix_token_id"] == tokenizer.bos_token_id
        assert entry["loglikelihood"] == pytest.approx(ll, rel=1e-6)  # fp32 model vs float64 log-softmax: ~1e-8
        assert entry["token_perplexity"] == pytest.approx(math.exp(-ll / tokens), rel=1e-5)
        assert entry["word_perplexity"] == pytest.approx(math.exp(-ll / words), rel=1e-5)
        assert entry["byte_perplexity"] == pytest.approx(math.exp(-ll / n_bytes), rel=1e-5)
        assert entry["bits_per_byte"] == pytest.approx(-ll / n_bytes / math.log(2), rel=1e-5)
        # A random-init model over 32000 tokens: the figures must not be degenerate.
        assert 1e3 < entry["token_perplexity"] < 1e6


def test_cli_gives_the_python_numbers(python_results, tiny_pnet_dir, text_files, tmp_path):
    """`pnet-eval DIR --perplexity ...` in a fresh process writes the same numbers (and no zero-shot results)."""
    # The in-process run's thread count: fp32 matmuls split across another number of threads sum in another order.
    threads = str(torch.get_num_threads())
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "pnet_eval.zero_shot", str(tiny_pnet_dir), "--perplexity", str(text_files["story"]),
        str(text_files["chapters"]), "--max-length", str(WINDOW), "--device", "cpu", "--output-dir", str(tmp_path),
    ]
    run = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)  # no checkout
    assert run.returncode == 0, run.stderr[-3000:]
    assert "not a git repository" not in run.stderr  # lm-eval's `git describe`, silenced
    assert "neither marked as CausalLM" not in run.stderr  # the backend type is passed
    out = tmp_path / tiny_pnet_dir.name
    assert not (out / "pnet_eval_results.json").exists()
    cli = json.loads((out / perplexity.PERPLEXITY_RESULTS_FILE).read_text())
    for label, entry in python_results["files"].items():
        for key in ("docs", "tokens", "words", "bytes", "sha256"):
            assert cli["files"][label][key] == entry[key]
        for key in ("loglikelihood", *METRIC_KEYS):
            assert cli["files"][label][key] == pytest.approx(entry[key], rel=1e-9, abs=1e-9), (label, key)
    assert "token_perplexity" in run.stdout


def test_results_merge_per_file(tiny_pnet_dir, text_files, tmp_path):
    """A second run on another file adds its entry and keeps the first one."""
    for name in ("story", "chapters"):
        perplexity.evaluate_perplexity(
            str(tiny_pnet_dir), text_files[name], max_length=WINDOW, device="cpu", output_dir=tmp_path
        )
    written = json.loads((tmp_path / tiny_pnet_dir.name / perplexity.PERPLEXITY_RESULTS_FILE).read_text())
    assert set(written["files"]) == {"story", "chapters"}


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("missing.txt", None, "missing.txt' does not exist"),
        ("empty.txt", "  \n\n", "empty.txt: empty file"),
        ("empty.jsonl", "\n", "empty.jsonl: no documents"),
        ("rows.jsonl", '{"text": "fine"}\n{"body": "x"}\n', "rows.jsonl:2: no 'text' field (fields: ['body'])"),
        ("rows.jsonl", '{"text": "fine"}\n\n{"text": ""}\n', "rows.jsonl:3: 'text' is empty"),
        ("rows.jsonl", '{"text": 3}\n', "rows.jsonl:1: 'text' is int, not a string"),
        ("rows.jsonl", '{"text": "a"}\n{"text": \n', "rows.jsonl:2: not valid JSON"),
        ("rows.jsonl", '["text"]\n', "rows.jsonl:1: expected a JSON object, got list"),
        ("latin1.txt", b"caf\xe9\n", "latin1.txt: not UTF-8 text"),
        # a JSON escape decodes to a lone surrogate, which no tokenizer takes (before: refused after the model loaded)
        ("rows.jsonl", '{"text": "\\ud800 x"}\n', "rows.jsonl:1: 'text' holds a lone surrogate \\ud800"),
    ],
)
def test_bad_files_fail_before_any_model_work(name, content, message, tiny_pnet_dir, tmp_path, monkeypatch):
    import lm_eval.api.registry

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the files were checked")

    monkeypatch.setattr(lm_eval.api.registry, "get_model", no_model)
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    good = tmp_path / "good.txt"
    good.write_text("Some text.", encoding="utf-8")
    with pytest.raises((FileNotFoundError, ValueError)) as error:
        perplexity.evaluate_perplexity(str(tiny_pnet_dir), [good, path], device="cpu", output_dir=tmp_path)
    assert message in str(error.value)
    assert not (tmp_path / tiny_pnet_dir.name).exists()


def test_cli_errors(tiny_pnet_dir, tmp_path, capsys):
    from pnet_eval import zero_shot

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    with pytest.raises(SystemExit) as exit_info:
        zero_shot.main([str(tiny_pnet_dir), "--perplexity", str(bad), "--text-field", "body"])
    assert exit_info.value.code == 2
    assert f"pnet-eval: error: {bad}:1: no 'body' field (fields: ['content'])" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a bad zero-shot task name fails before the perplexity run
        zero_shot.main([str(tiny_pnet_dir), "--perplexity", "heldout", "--tasks", "arc_challenge"])
    assert "unknown task(s) ['arc_challenge']" in capsys.readouterr().err


def test_file_labels_are_unique(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "notes.txt").write_text("text")
    loaded = perplexity.load_text_files(
        [tmp_path / "a" / "notes.txt", tmp_path / "b" / "notes.txt", "heldout", f"b_notes={tmp_path / 'b/notes.txt'}"]
    )
    assert [f.label for f in loaded] == ["notes", "notes-2", "botchan", "b_notes"]
    assert loaded[1].path == loaded[3].path == (tmp_path / "b" / "notes.txt").resolve()
    with pytest.raises(ValueError, match="label 'my notes'"):
        perplexity.load_text_files(f"my notes={tmp_path / 'a' / 'notes.txt'}")


def test_report_shows_perplexity_columns(python_results, tiny_pnet_dir, tmp_path):
    """pnet-report adds word PPL / BPB / token PPL columns per file, '-' for a model without them."""
    with_ppl, without = tmp_path / "with-ppl", tmp_path / "without"
    for folder in (with_ppl, without):
        folder.mkdir()
        (folder / "config.json").write_text((tiny_pnet_dir / "config.json").read_text())
    (with_ppl / perplexity.PERPLEXITY_RESULTS_FILE).write_text(json.dumps(python_results))
    table = report.build_table([report.load_model_results(with_ppl), report.load_model_results(without)])
    markdown = report.render_markdown(table)
    header = markdown.splitlines()[0]
    for title in ("story word PPL", "story BPB", "story token PPL", "chapters word PPL", "chapters token PPL"):
        assert f"| {title} " in header
    story = python_results["files"]["story"]
    rows = markdown.splitlines()[2:4]
    assert f"| {story['bits_per_byte']:.3f} | {story['token_perplexity']:.2f} |" in rows[0]
    assert rows[1].rstrip(" |").endswith("- | - | - | - | - | -")
    assert "story: lm-eval `loglikelihood_rolling` perplexity (1 docs" in markdown
    assert table["rows"][0]["perplexity"]["story"]["token_perplexity"] == story["token_perplexity"]
    # No perplexity results anywhere: the table keeps the paper's columns only.
    plain = report.render_markdown(report.build_table([report.load_model_results(without)]))
    assert "PPL" not in plain.splitlines()[0]


def test_model_card_shows_perplexity(python_results, tiny_pnet_dir, tmp_path):
    """pnet-card lists each scored file with the report's metrics and note; perplexity alone is a result."""
    from pnet_eval import model_card

    folder = tmp_path / "scored"
    folder.mkdir()
    (folder / "config.json").write_text((tiny_pnet_dir / "config.json").read_text())
    assert "No results yet" in model_card.build_card(folder).text
    (folder / perplexity.PERPLEXITY_RESULTS_FILE).write_text(json.dumps(python_results))
    card = model_card.build_card(folder).text
    assert "No results yet" not in card
    assert "| text | docs | tokens | window | word PPL | BPB | token PPL |" in card
    for label, entry in python_results["files"].items():
        assert (f"| {label} | {entry['docs']} | {entry['tokens']} | {entry['max_length']} | "
                f"{entry['word_perplexity']:.2f} | {entry['bits_per_byte']:.3f} | {entry['token_perplexity']:.2f} |") in card
    assert "story: lm-eval `loglikelihood_rolling` perplexity (1 docs" in card


def test_bundled_heldout_text():
    """The bundled file is what scripts/make_heldout_text.py writes (sha256 of the uncompressed JSON Lines, as in
    eval/data/heldout/README.md): 11 chapters of Botchan, read like any user file."""
    raw = gzip.decompress(perplexity.HELDOUT_FILE.read_bytes())
    readme = (perplexity.HELDOUT_FILE.parent / "README.md").read_text()
    assert hashlib.sha256(raw).hexdigest() in readme
    (loaded,) = perplexity.load_text_files("heldout")
    assert loaded.label == "botchan" and loaded.format == "jsonl" and len(loaded.texts) == 11
    assert sum(len(t.split()) for t in loaded.texts) == 46277
    rows = [json.loads(line) for line in raw.decode().splitlines()]
    assert [r["title"].rsplit(" ", 1)[1] for r in rows] == "I II III IV V VI VII VIII IX X XI".split()
    assert all("[" not in r["text"] and "Gutenberg" not in r["text"] for r in rows)


def test_json_file_of_json_lines_is_read_as_json_lines(tmp_path):
    """A `.json` file is read as JSON Lines, one document per line (as datasets' json loader reads it), not scored
    as one plain-text document; one multi-line JSON value is refused with that rule in the message."""
    rows = tmp_path / "rows.json"
    rows.write_text("".join(json.dumps({"text": text}) + "\n" for text in JSONL_DOCS), encoding="utf-8")
    [loaded] = perplexity.load_text_files(rows)
    assert loaded.format == "jsonl"
    assert loaded.texts == tuple(JSONL_DOCS)
    assert loaded.label == "rows"
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps([{"text": t} for t in JSONL_DOCS], indent=2), encoding="utf-8")
    with pytest.raises(ValueError, match=r"pretty.json:1: not valid JSON .*\.json files are read as JSON Lines"):
        perplexity.load_text_files(pretty)


@pytest.mark.parametrize("name", ["ROWS.JSONL", "rows.Json", "rows.NDJSON.GZ"])
def test_json_lines_extensions_in_any_case_are_json_lines(name, tmp_path):
    """Before, `ROWS.JSONL` was scored as one plain-text document of braces and keys."""
    path = tmp_path / name
    lines = "".join(json.dumps({"text": text}) + "\n" for text in JSONL_DOCS).encode()
    path.write_bytes(gzip.compress(lines) if name.lower().endswith(".gz") else lines)
    [loaded] = perplexity.load_text_files(path)
    assert (loaded.format, loaded.texts, loaded.label) == ("jsonl", tuple(JSONL_DOCS), "ROWS" if "ROWS" in name else "rows")


@pytest.mark.parametrize("prefix_token_id", [32000, -1])
def test_prefix_token_outside_the_vocabulary_fails_before_the_model_loads(prefix_token_id, tiny_pnet_dir, tmp_path,
                                                                           monkeypatch):
    import lm_eval.api.registry

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before --prefix-token-id was checked")

    monkeypatch.setattr(lm_eval.api.registry, "get_model", no_model)
    with pytest.raises(ValueError, match=rf"prefix_token_id={prefix_token_id} is outside the vocabulary of .*"
                                         r"allowed: 0 <= id < 32000"):
        perplexity.evaluate_perplexity(str(tiny_pnet_dir), "heldout", prefix_token_id=prefix_token_id,
                                       device="cpu", output_dir=tmp_path)


def test_heldout_overlap_script_reads_files_as_pnet_eval_does(repo_root, tmp_path, capsys):
    """scripts/check_heldout_overlap.py checks the files pnet-eval --perplexity scores: the same reader. Before, a
    .ndjson counted its JSON keys as words, a short text divided by zero, --n 0 printed nonsense rows, and a missing
    file was a traceback."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("overlap", repo_root / "scripts/check_heldout_overlap.py")
    overlap = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(overlap)
    corpus = tmp_path / "corpus" / "web"
    corpus.mkdir(parents=True)
    with gzip.open(corpus / "train-0.jsonl.gz", "wt") as f:
        f.write(json.dumps({"text": "the quick brown fox jumps over the lazy dog", "source": "web"}) + "\n")
    heldout = tmp_path / "h.ndjson"
    heldout.write_text(json.dumps({"text": "a quick brown fox jumps high"}) + "\n")
    overlap.main([str(heldout), "--corpus", str(tmp_path / "corpus"), "--n", "3", "50"])
    out = capsys.readouterr().out
    assert "h.ndjson: 1 documents, 6 words" in out  # not the keys' words
    assert "| 3 | 4 | 2 | 0.500000 | 1 / 1 |" in out and "| 50 | 0 | 0 | - (no document has n words) | 0 / 1 |" in out
    for argv, message in (([str(tmp_path / "nope.txt")], "nope.txt' does not exist"),
                          ([str(heldout), "--n", "0"], "allowed: shingle sizes >= 1")):
        with pytest.raises(SystemExit):
            overlap.main([*argv, "--corpus", str(tmp_path / "corpus")])
        assert message in capsys.readouterr().err


def test_make_heldout_text_names_a_bad_sdist(repo_root, tmp_path):
    """A missing file, a file that is not a .tar.gz, or another package's sdist: one line, no traceback."""
    import importlib.util
    import tarfile

    spec = importlib.util.spec_from_file_location("make_heldout", repo_root / "scripts/make_heldout_text.py")
    make_heldout = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_heldout)
    (tmp_path / "plain.txt").write_text("not an archive")
    with tarfile.open(tmp_path / "other-1.0.tar.gz", "w:gz") as tar:
        tar.add(tmp_path / "plain.txt", arcname="other-1.0/README")
    for name in ("missing.tar.gz", "plain.txt", "other-1.0.tar.gz"):
        with pytest.raises(SystemExit, match=f"--sdist {tmp_path / name}: cannot read "
                                             "sentencepiece-0.2.3/test/botchan.txt from it"):
            make_heldout.main(["--sdist", str(tmp_path / name), "--out", str(tmp_path / "out.jsonl.gz")])
    assert not (tmp_path / "out.jsonl.gz").exists()
