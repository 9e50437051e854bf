"""pnet_eval: offline zero-shot evaluation, upstream-identical prompts, the Table 7 report, model cards, SST-2."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from huggingface_hub import ModelCard

from pnet_eval import model_card, perplexity, report, zero_shot
from pnet_eval.tasks.local_data import BUNDLED_DATA_DIR, resolve_data_files

REPO_ROOT = Path(__file__).resolve().parents[1]

FIXTURE_FILES = {  # file -> rows copied into the fixture data dir
    "arc_easy/validation.jsonl": 4,
    "arc_easy/test.jsonl": 8,
    "boolq/validation.jsonl": 8,
    "hellaswag/validation.jsonl": 8,
    "sst2/validation.jsonl": 64,
}
# lm-eval's own task YAMLs (0.4.13) that the *_local tasks mirror.
UPSTREAM_YAMLS = {
    "arc_easy": "arc/arc_easy.yaml",
    "boolq": "super_glue/boolq/default.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "sst2": "glue/sst2/default.yaml",
}
# Keys allowed to differ between an upstream YAML and its local mirror: where the data comes from.
DATASET_KEYS = {"task", "tag", "dataset_path", "dataset_name", "dataset_kwargs", "custom_dataset", "training_split"}


def _bundled_rows(rel: str, n: int | None = None) -> list[dict]:
    with gzip.open(BUNDLED_DATA_DIR / f"{rel}.gz", "rt", encoding="utf-8") as f:
        lines = f.readlines() if n is None else [next(f) for _ in range(n)]
    return [json.loads(line) for line in lines]


@pytest.fixture(scope="module")
def fixture_data_dir(tmp_path_factory) -> Path:
    """The first rows of each bundled file, as plain .jsonl (the other accepted format)."""
    root = tmp_path_factory.mktemp("eval_data")
    for rel, n in FIXTURE_FILES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("".join(json.dumps(r) + "\n" for r in _bundled_rows(rel, n)))
    return root


# --------------------------------------------------------------------------------------------- bundled data


def test_bundled_data_matches_manifest():
    """Row counts and sha256 of the uncompressed bundled files equal the data pack's manifest."""
    manifest = json.loads((BUNDLED_DATA_DIR / "manifest.json").read_text())
    assert set(manifest) == set(FIXTURE_FILES)
    for rel, expected in manifest.items():
        raw = gzip.decompress((BUNDLED_DATA_DIR / f"{rel}.gz").read_bytes())
        assert raw.count(b"\n") == expected["rows"], rel
        assert hashlib.sha256(raw).hexdigest() == expected["sha256"], rel


# --------------------------------------------------------------------------------------------- prompts


@pytest.mark.parametrize("task", sorted(UPSTREAM_YAMLS))
def test_local_tasks_mirror_upstream(task, fixture_data_dir):
    """Same config apart from the dataset lines, and the same (context, continuation) requests and targets
    as lm-eval's own task run on the same documents (the upstream task gets the local docs as its dataset)."""
    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    upstream_yaml = Path(lm_eval.__file__).parent / "tasks" / UPSTREAM_YAMLS[task]
    upstream_cfg = load_yaml(upstream_yaml, resolve_func=False)
    local_cfg = load_yaml(zero_shot.TASKS_DIR / f"{zero_shot.TASKS[task].local_task}.yaml", resolve_func=False)
    differing = {k for k in set(upstream_cfg) | set(local_cfg) if upstream_cfg.get(k) != local_cfg.get(k)}
    # process_docs differs only by module path (hellaswag: the local module re-exports upstream's function).
    assert differing - DATASET_KEYS <= {"process_docs"}, differing
    if "process_docs" in differing:
        from lm_eval.tasks.hellaswag.utils import process_docs

        from pnet_eval.tasks.local_data import hellaswag_process_docs

        assert hellaswag_process_docs is process_docs

    local = TaskManager(
        include_path=str(zero_shot.TASKS_DIR), include_defaults=False, metadata={"pnet_data_dir": str(fixture_data_dir)}
    )
    local_task = local.load([zero_shot.TASKS[task].local_task])["tasks"][zero_shot.TASKS[task].local_task]
    local_dataset = datasets.DatasetDict({split: local_task.dataset[split] for split in local_task.dataset})
    upstream_run_cfg = load_yaml(upstream_yaml, resolve_func=True)
    upstream_run_cfg.pop("tag", None)
    upstream_run_cfg["custom_dataset"] = lambda **_: datasets.DatasetDict(
        {**local_dataset, "train": local_dataset["validation"]}
    )
    upstream_task = ConfigurableTask(config=upstream_run_cfg)

    for t in (local_task, upstream_task):
        t.build_all_requests(limit=4, rank=0, world_size=1)
    local_requests = [i.arguments for i in local_task.instances]
    assert local_requests == [i.arguments for i in upstream_task.instances]
    assert len(local_requests) >= 8  # 4 docs x >= 2 choices
    docs = list(local_task.eval_docs)[:4]
    assert [local_task.doc_to_target(d) for d in docs] == [
        upstream_task.doc_to_target(d) for d in list(upstream_task.eval_docs)[:4]
    ]
    if task == "boolq":  # the exact upstream prompt, spelled out
        first = _bundled_rows("boolq/validation.jsonl", 1)[0]
        assert local_requests[0] == (f"{first['passage']}\nQuestion: {first['question']}?\nAnswer:", " no")


# --------------------------------------------------------------------------------------------- zero-shot


def test_zero_shot_tiny_pnet_offline(tiny_pnet_dir, fixture_data_dir, tmp_path, capfd, caplog):
    summaries = zero_shot.evaluate(
        str(tiny_pnet_dir), data_dir=fixture_data_dir, limit=8, batch_size=4, device="cpu", output_dir=tmp_path
    )
    printed = "".join(capfd.readouterr()) + caplog.text
    assert "neither marked as CausalLM" not in printed  # lm-eval is told the backend type
    out = tmp_path / tiny_pnet_dir.name
    written = json.loads((out / zero_shot.RESULTS_FILE).read_text())
    lm_eval_json = json.loads((out / zero_shot.LM_EVAL_RESULTS_FILE).read_text())
    assert written == summaries[0]
    assert written["data_source"] == f"local:{fixture_data_dir.resolve()}" and written["num_fewshot"] == 0
    assert set(written["tasks"]) == {"arc_easy", "boolq", "hellaswag"}
    for task, entry in written["tasks"].items():
        assert entry["docs"] == 8
        metrics = zero_shot.TASKS[task].metrics
        for metric in metrics:
            assert 0.0 <= entry[metric] <= 1.0 and (entry[metric] * 8).is_integer()
            assert entry[f"{metric}_stderr"] is not None
            assert entry[metric] == lm_eval_json["results"][entry["lm_eval_task"]][f"{metric},none"]
        assert ("acc_norm" in entry) == ("acc_norm" in metrics)


def test_zero_shot_errors(tiny_pnet_dir, fixture_data_dir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zero_shot.evaluate(str(tmp_path / "missing-model"), data_dir=fixture_data_dir)
    with pytest.raises(ValueError, match=r"unknown task\(s\) \['arc_challenge'\]; allowed: \['arc_easy', 'boolq'"):
        zero_shot.evaluate(str(tiny_pnet_dir), tasks="arc_easy,arc_challenge", data_dir=fixture_data_dir)
    partial = tmp_path / "partial"
    shutil.copytree(fixture_data_dir / "boolq", partial / "boolq")
    with pytest.raises(FileNotFoundError) as error:
        zero_shot.evaluate(str(tiny_pnet_dir), tasks=["boolq", "hellaswag"], data_dir=partial)
    assert "hellaswag/validation.jsonl.gz" in str(error.value) and "boolq/validation.jsonl" in str(error.value)
    assert "boolq:" not in str(error.value)  # boolq's file is there
    with pytest.raises(SystemExit) as exit_info:
        zero_shot.main([str(tmp_path / "missing-model")])
    assert exit_info.value.code == 2 and "pnet-eval: error: model folder" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "-3"], "argument --batch-size: '-3': allowed: an integer >= 1, 'auto' or 'auto:N'"),
        (["--batch-size", "0"], "argument --batch-size: '0'"),
        (["--batch-size", "abc"], "argument --batch-size: 'abc'"),
        (["--batch-size", "auto:0"], "argument --batch-size: 'auto:0'"),
        (["--limit", "0"], "argument --limit: '0': allowed: a number of documents per task (an integer >= 1)"),
        (["--limit", "-1"], "argument --limit: '-1'"),
        (["--limit", "1.5"], "argument --limit: '1.5'"),
        (["--limit", "nan"], "argument --limit: 'nan'"),
        (["--dtype", "float64x"], "argument --dtype: invalid choice: 'float64x'"),
    ],
)
def test_pnet_eval_refuses_bad_arguments_before_any_work(argv, message, tmp_path, capsys):
    """Before: --batch-size -3 scored no tokens and saved perplexity 1.0; 0, 'abc', --limit 0/-1 and a bad --dtype
    failed after the model loaded, with lm-eval's or torch's internals as the message."""
    for mode in (["--tasks", "boolq"], ["--perplexity", "heldout"]):
        with pytest.raises(SystemExit) as exit_info:
            zero_shot.main([str(tmp_path / "not-even-a-model"), *mode, *argv])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("good", [["--batch-size", "4"], ["--batch-size", "auto"], ["--batch-size", "auto:2"],
                                  ["--limit", "10"], ["--limit", "0.25"], ["--dtype", "bfloat16"]])
def test_pnet_eval_takes_good_arguments(good):
    args = zero_shot.build_parser().parse_args(["model", *good])
    assert {"4": 4, "auto": "auto", "auto:2": "auto:2", "10": 10, "0.25": 0.25, "bfloat16": "bfloat16"}[good[1]] in (
        args.batch_size, args.limit, args.dtype
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_pnet_eval_refuses_a_device_this_torch_cannot_use(tiny_pnet_dir, tmp_path, capsys):
    for device, message in (("cuda", "this torch sees no CUDA device; allowed here: cpu"), ("gpu0", "not a device")):
        for mode in (["--tasks", "boolq"], ["--perplexity", "heldout"]):
            with pytest.raises(SystemExit) as exit_info:
                zero_shot.main([str(tiny_pnet_dir), *mode, "--device", device, "--output-dir", str(tmp_path / "o")])
            assert exit_info.value.code == 2
            assert f"pnet-eval: error: --device {device!r}: {message}" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # refused before any results folder


def test_bundled_files_resolve_for_every_task():
    """What plain `lm-eval run --include_path eval/tasks` reads by default: the bundled files, absolute paths."""
    from lm_eval.tasks._yaml_loader import load_yaml

    for task in zero_shot.TASKS.values():
        files = load_yaml(zero_shot.TASKS_DIR / f"{task.local_task}.yaml", resolve_func=False)["dataset_kwargs"][
            "data_files"
        ]
        for path in resolve_data_files(files).values():
            assert Path(path).is_absolute() and Path(path).is_file()


# --------------------------------------------------------------------------------------------- report


def _write_model(folder: Path, config_file: str, scores: dict, sst2: float, losses: list[float]) -> Path:
    """A pretraining run folder: log.jsonl, final/config.json, zero-shot and SST-2 results (paper's numbers)."""
    model_dir = folder / "final"
    model_dir.mkdir(parents=True)
    shutil.copy(REPO_ROOT / "configs" / "models" / config_file, model_dir / "config.json")
    rows = [{"step": 10 * (i + 1), "loss": loss + 0.01, "lm_loss": loss} for i, loss in enumerate(losses)]
    rows.insert(1, {"step": 10, "val_loss": {"web": 9.0}})
    (folder / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks = {t: {"lm_eval_task": t, "docs": 100, "acc": a, "acc_stderr": 0.01} for t, a in scores.items()}
    (model_dir / zero_shot.RESULTS_FILE).write_text(
        json.dumps({"model": "final", "model_dir": str(model_dir), "data_source": "hub", "limit": None, "tasks": tasks})
    )
    (model_dir / report.SST2_RESULTS_FILE).write_text(
        json.dumps({"label": "SST-2 (validation)", "accuracy": sst2, "eval_examples": 872})
    )
    return model_dir


@pytest.fixture
def two_models(tmp_path) -> tuple[Path, Path]:
    dense = _write_model(
        tmp_path / "llama-1b",
        "llama-1b.json",
        {"arc_easy": 0.4799, "boolq": 0.5731, "hellaswag": 0.3892},
        0.8853,
        [2.5] * 5 + [1.86] * 10,
    )
    routed = _write_model(
        tmp_path / "pnet-1b-up-e8",
        "pnet-1b-up-e8.json",
        {"arc_easy": 0.4958, "boolq": 0.5839, "hellaswag": 0.4421},
        0.9005,
        [1.61] * 10,
    )
    return dense, routed


def test_report_table7(two_models, tmp_path, capsys):
    dense, routed = two_models
    report.main([str(dense), str(routed / zero_shot.RESULTS_FILE), "--out", str(tmp_path / "table7.md")])
    markdown = (tmp_path / "table7.md").read_text()
    table = json.loads((tmp_path / "table7.json").read_text())
    assert "| Model | #Expert | Params | FLOPs | Training loss | ARC-e | BoolQ | SST-2 | HellaSwag | Avg |" in markdown
    assert "| llama-1b | - | 936.43M | 917.51G | 1.86 | 47.99 | 57.31 | 88.53 | 38.92 | 58.19 |" in markdown
    assert "| pnet-1b-up-e8 | 8 (up) | 2.35B | 917.51G | 1.61 | 49.58 | 58.39 | 90.05 | 44.21 | 60.56 |" in markdown
    dense_row, routed_row = table["rows"]
    assert (dense_row["total_params"], routed_row["total_params"]) == (936_429_568, 2_345_912_320)
    assert dense_row["flops"] == routed_row["flops"] == 917_512_388_608
    assert routed_row["avg"] == pytest.approx((49.58 + 58.39 + 90.05 + 44.21) / 4)
    assert dense_row["training_loss"] == pytest.approx(1.86) and dense_row["training_loss_source"].endswith("log.jsonl")


def test_report_marks_offline_sst2_and_missing_parts(two_models, tmp_path):
    dense, _ = two_models
    (dense / report.SST2_RESULTS_FILE).write_text(
        json.dumps({"label": "SST-2 (held-out half of validation, offline)", "accuracy": 0.5, "eval_examples": 436})
    )
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(REPO_ROOT / "configs" / "models" / "llama-tiny.json", bare / "config.json")
    table = report.build_table([report.load_model_results(dense), report.load_model_results(bare)])
    markdown = report.render_markdown(table)
    assert (
        "| 50.00<sup>1</sup> |" in markdown and "<sup>1</sup> SST-2 (held-out half of validation, offline)" in markdown
    )
    assert "| bare | - | 9.24M | 5.80G | - | - | - | - | - | - |" in markdown  # counts only
    with pytest.raises(FileNotFoundError, match="neither a model folder nor"):
        report.load_model_results(tmp_path / "nothing-here")


DAMAGED_RESULTS = [
    # (file, content, what the error names): a damaged file is refused, naming the file and the field, by both tools
    ("zero_shot", '{"model": "x", "tasks": ', "is not a valid JSON file"),
    ("zero_shot", "", "is not a valid JSON file"),
    ("zero_shot", "[]", "holds a JSON list, not an object"),
    ("zero_shot", '{"tasks": {"arc_easy": {"acc": NaN}}}', "NaN is not a finite number"),
    ("zero_shot", '{"tasks": {"arc_easy": {"acc": Infinity}}}', "Infinity is not a finite number"),
    ("zero_shot", '{"tasks": {"arc_easy": {"acc": 57.0}}}', "tasks.arc_easy.acc is 57.0; allowed: a number in [0, 1]"),
    ("zero_shot", '{"tasks": {"arc_easy": {"acc": "0.5"}}}', "tasks.arc_easy.acc is '0.5'"),
    ("zero_shot", '{"tasks": {"arc_easy": {"acc": true}}}', "tasks.arc_easy.acc is True"),
    ("zero_shot", '{"tasks": {"arc_easy": {"acc_norm_stderr": -0.1}}}', "tasks.arc_easy.acc_norm_stderr is -0.1"),
    ("zero_shot", '{"tasks": {"arc_easy": [0.5]}}', "tasks.arc_easy is list"),
    ("zero_shot", '{"tasks": {"mmlu": {"acc": 0.5}}}', "task 'mmlu' is not one pnet-eval runs"),
    ("zero_shot", '{"results": {}}', "(no 'tasks' key)"),
    ("sst2", '{"accuracy": null}', "accuracy is None"),
    ("sst2", '{"accuracy": 0.9, "label": "SST-2", "eval_examples": 0}', "eval_examples is 0"),
    ("sst2", '{"accuracy": 0.9, "eval_examples": 872}', "label is None, not a string"),
    ("perplexity", '{"files": {"x": {"word_perplexity": "abc"}}}', "files.x.word_perplexity is 'abc'"),
    ("perplexity", '{"files": {"x": {"token_perplexity": 0.5}}}', "files.x.token_perplexity is 0.5"),
    ("perplexity", '{"files": {"x": {"bits_per_byte": -1}}}', "files.x.bits_per_byte is -1"),
    ("perplexity", '{"files": []}', "files is list"),
    ("perplexity", '{"model": "x"}', "files is NoneType"),
]


@pytest.mark.parametrize(("kind", "content", "message"), DAMAGED_RESULTS)
def test_report_and_card_refuse_a_damaged_results_file_naming_it(two_models, tmp_path, kind, content, message):
    """Before: tracebacks (a str score), "No results yet" (a list), 'nan' and '5700.00' published as scores, and
    JSON errors without the file's name."""
    _, routed = two_models
    name = {"zero_shot": zero_shot.RESULTS_FILE, "sst2": report.SST2_RESULTS_FILE,
            "perplexity": perplexity.PERPLEXITY_RESULTS_FILE}[kind]
    damaged = routed / name
    damaged.write_text(content, encoding="utf-8")
    for tool, argv in (
        (report.main, [str(routed), "--out", str(tmp_path / "t.md")]),
        (model_card.main, [str(routed), "--train-config", str(REPO_ROOT / "configs" / "pretrain" / "tiny-cpu.yaml")]),
    ):
        with pytest.raises(SystemExit) as exit_info, contextlib.redirect_stderr(io.StringIO()) as stderr:
            tool(argv)
        assert exit_info.value.code == 2
        assert str(damaged) in stderr.getvalue() and message in stderr.getvalue(), stderr.getvalue()
    assert not (tmp_path / "t.md").exists() and not (routed / "README.md").exists()


def test_report_acc_norm_falls_back_to_acc_for_boolq_only(two_models, tmp_path):
    """A task that has acc_norm in lm-eval but not in this file shows '-', not its acc under the acc_norm label."""
    dense, _ = two_models
    table = report.build_table([report.load_model_results(dense)], metric="acc_norm")
    row = table["rows"][0]
    assert row["boolq"] == pytest.approx(57.31)  # BoolQ has acc only: it stands in
    assert row["arc_easy"] is None and row["hellaswag"] is None


# --------------------------------------------------------------------------------------------- model cards


def test_model_card_roundtrip(two_models, tmp_path, monkeypatch):
    _, routed = two_models
    monkeypatch.chdir(REPO_ROOT)
    model_card.main([str(routed), "--train-config", str(REPO_ROOT / "configs" / "pretrain" / "tiny-cpu.yaml")])
    card = ModelCard.load(routed / "README.md")
    # Paths of this machine stay out of a card meant for the Hub: the config relative to the checkout, the log by name.
    assert str(REPO_ROOT) not in card.text and str(routed.parent) not in card.text
    assert "Recipe (from `configs/pretrain/tiny-cpu.yaml`)" in card.text
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.license == "apache-2.0" and "mixture-of-experts" in card.data.tags
    values = {(r.dataset_type, r.metric_type): r.metric_value for r in card.data.eval_results}
    assert values == {
        ("allenai/ai2_arc", "acc"): 49.58,
        ("aps/super_glue", "acc"): 58.39,
        ("Rowan/hellaswag", "acc"): 44.21,
        ("nyu-mll/glue", "accuracy"): 90.05,
    }
    assert card.data.eval_results[0].dataset_split == "test"
    for text in (
        "2,345,912,320 (2.35B)",
        "trust_remote_code=True",
        "| num_experts | 8 |",
        "| web | 0.5 | json |",
        "Final training LM loss: **1.610**",
        "| seq_len | 512 |",  # a number that short_number leaves alone is not repeated: not "512 (512)"
    ):
        assert text in card.text, text


@pytest.mark.parametrize(
    "config_name,description,tag",
    [("fmnist-parameternet", "GhostNet whose convolutions are dynamic", "dynamic-convolution"),
     ("parameternet-swin-300m", "in the blocks [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11] is 10 experts", "swin")],
)
def test_vision_model_card(tmp_path, config_name, description, tag):
    run = tmp_path / config_name
    (run / "final").mkdir(parents=True)
    config = json.loads((REPO_ROOT / "configs" / "vision" / f"{config_name}.json").read_text())
    (run / "final" / "config.json").write_text(json.dumps(config))
    (run / "results.json").write_text(
        json.dumps({"test_accuracy": 0.8712, "dataset": "zalando-datasets/fashion_mnist"})
    )
    card = model_card.build_card(run / "final")
    card.save(run / "final" / "README.md")
    loaded = ModelCard.load(run / "final" / "README.md")
    assert loaded.data.pipeline_tag == "image-classification"
    assert [(r.dataset_type, r.metric_value) for r in loaded.data.eval_results] == [
        ("zalando-datasets/fashion_mnist", 87.12)
    ]
    from pnet.counting import count_config

    assert f"{count_config(str(run / 'final')).total_params:,}" in loaded.text
    assert description in loaded.text and tag in loaded.data.tags


def test_model_card_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        model_card.main([str(tmp_path / "missing")])
    assert exit_info.value.code == 2 and "has no config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert' has no card; allowed"):
        model_card.build_card(tmp_path)


# --------------------------------------------------------------------------------------------- SST-2


def test_finetune_sst2_offline_heldout(tiny_pnet_dir, fixture_data_dir, tmp_path):
    """Offline: 64 validation sentences split 32/32; fitting its own 32 sentences beats chance by far."""
    from pnet import finetune

    result = finetune.main([str(tiny_pnet_dir), f"data.data_dir={fixture_data_dir}", "epochs=8", "lr=3e-3",
                            "micro_batch_size=8", "warmup_ratio=0", "report_train_accuracy=true",
                            f"output_dir={tmp_path / 'ft'}", "save_model=true"])
    assert result["label"] == "SST-2 (held-out half of validation, offline)" and result["offline_heldout"]
    assert result["finetune_examples"] == result["eval_examples"] == 32
    assert result["train_accuracy"] >= 0.9
    assert result["config"]["lr"] == 3e-3 and result["config"]["micro_batch_size"] == 8
    assert json.loads((tiny_pnet_dir / "sst2_results.json").read_text()) == result
    log = [json.loads(line) for line in (tmp_path / "ft" / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert losses[-1] < losses[0] - 0.1
    # The saved classifier's tokenizer pads (a pad token, the model's context length) and carries no load-time keys.
    saved = json.loads((tmp_path / "ft" / "final" / "tokenizer_config.json").read_text())
    assert saved["pad_token"] == "<unk>" and saved["model_max_length"] == 512 and "local_files_only" not in saved
    assert json.loads((tmp_path / "ft" / "final" / "config.json").read_text())["pad_token_id"] == 0
    with pytest.raises(FileNotFoundError, match=r"no sst2/validation.jsonl\[.gz\] under .* it holds"):
        finetune.main([str(tiny_pnet_dir), f"data.data_dir={tmp_path / 'ft'}"])


def test_finetune_settings_are_validated_before_loading(tiny_pnet_dir, tmp_path):
    from pnet import finetune
    from pnet.config import ConfigError

    cases = [("micro_batch_size=0", "micro_batch_size=0: Input should be greater than 0"),
             ("epoch=3", r"unknown key\(s\) \['epoch'\] \('epoch' -> did you mean 'epochs'\?\)"),
             ("data.heldout_fraction=1.5", "data.heldout_fraction=1.5: Input should be less than 1"),
             ("data.seq_len=1024", "data.seq_len=1024 exceeds the model's max_position_embeddings=512")]
    for override, message in cases:
        with pytest.raises(ConfigError, match=message):
            finetune.main([str(tiny_pnet_dir), override, f"output_dir={tmp_path / 'never'}"])
    assert not (tmp_path / "never").exists()


# --------------------------------------------------------------------------------------------- no folder code


PLANTED = "import pathlib; pathlib.Path({marker!r}).write_text('the folder code ran')\n"


def _planted_copy(model_dir: Path, tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A copy of a saved folder whose own modeling code would write a marker file when executed."""
    folder, marker = tmp_path / name, tmp_path / f"{name}.ran"
    shutil.copytree(model_dir, folder)
    for code in ("modeling_pnet_llama.py", "configuration_pnet_llama.py"):
        path = folder / code
        path.write_text(PLANTED.format(marker=str(marker)) + path.read_text())
    return folder, marker


def test_evaluation_and_finetuning_run_no_code_from_the_folder(tiny_pnet_dir, fixture_data_dir, tmp_path):
    """`pnet-eval DIR` and `finetune_sst2.py DIR` of a pnet_llama folder, each in a fresh process as a user runs them,
    load the installed classes: a line planted in the folder's modeling files never runs (with trust_remote_code=True
    hard-coded it ran in both), and the log says so."""
    folder, marker = _planted_copy(tiny_pnet_dir, tmp_path, "planted")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    evaluation = subprocess.run(
        [sys.executable, "-m", "pnet_eval.zero_shot", str(folder), "--tasks", "boolq", "--data-dir",
         str(fixture_data_dir), "--limit", "2", "--batch-size", "2", "--device", "cpu", "--output-dir",
         str(tmp_path / "out")], env=env, capture_output=True, text=True, timeout=600)
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert "loading its registered classes; the folder's code files are not executed" in evaluation.stdout
    assert json.loads((tmp_path / "out/planted" / zero_shot.RESULTS_FILE).read_text())["tasks"]["boolq"]["docs"] == 2
    finetuning = subprocess.run(
        [sys.executable, str(REPO_ROOT / "scripts/finetune_sst2.py"), str(folder), f"data.data_dir={fixture_data_dir}",
         "epochs=1", "data.max_train_samples=8", "data.max_eval_samples=8", f"output_dir={tmp_path / 'ft'}"],
        env=env, capture_output=True, text=True, timeout=600)
    assert finetuning.returncode == 0, finetuning.stderr[-3000:]
    assert "the folder's code files are not executed" in finetuning.stdout
    assert not marker.exists()


def test_folder_code_of_an_unknown_model_type_needs_consent(tiny_pnet_dir, fixture_data_dir, tmp_path, capsys):
    """A folder whose model_type only its own code provides is refused before anything loads, naming the flag."""
    folder, marker = _planted_copy(tiny_pnet_dir, tmp_path, "foreign")
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = "someone_elses_model"
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="someone_elses_model.*Pass --trust-remote-code if you trust that code"):
        zero_shot.evaluate(str(folder), tasks="boolq", data_dir=fixture_data_dir, limit=2)
    with pytest.raises(SystemExit) as exit_info:
        zero_shot.main([str(folder), "--tasks", "boolq", "--data-dir", str(fixture_data_dir), "--limit", "2"])
    assert exit_info.value.code == 2 and "--trust-remote-code" in capsys.readouterr().err
    from pnet import finetune

    with pytest.raises(ValueError, match="--trust-remote-code"):
        finetune.main([str(folder), f"data.data_dir={fixture_data_dir}"])
    assert not marker.exists()


def test_report_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        report.main(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "HellaSwag (default: acc)" in help_text and "training loss (default: 10)" in help_text


# ------------------------------------------------------------------------------- results never lost (issue 20)

def test_results_folders_are_distinct_and_name_a_run_not_its_final(tmp_path):
    from pnet_eval.perplexity import results_dirs

    folders = [tmp_path / "runs/a/final", tmp_path / "runs/b/final", tmp_path / "p/x/m", tmp_path / "q/x/m"]
    for folder in folders:
        folder.mkdir(parents=True)
    dirs = results_dirs([str(f) for f in folders], tmp_path / "O")
    assert [dirs[str(f)].name for f in folders] == ["a-final", "b-final", "p-x-m", "q-x-m"]
    assert results_dirs([str(folders[0])], None) == {str(folders[0]): folders[0]}  # no --output-dir: the folder


def _no_evaluation(monkeypatch):
    import lm_eval

    def refuse(*args, **kwargs):
        raise AssertionError("evaluated although the results could not be written")

    monkeypatch.setattr(lm_eval, "simple_evaluate", refuse)


def test_two_runs_final_folders_keep_both_results(tiny_pnet_dir, fixture_data_dir, tmp_path):
    """`pnet-eval a/final b/final --output-dir O` wrote both to O/final: the second overwrote the first."""
    finals = [tmp_path / run / "final" for run in ("a", "b")]
    for final in finals:
        shutil.copytree(tiny_pnet_dir, final)
    zero_shot.evaluate([str(f) for f in finals], tasks="boolq", data_dir=fixture_data_dir, limit=2, batch_size=2,
                       device="cpu", output_dir=tmp_path / "O")
    for run, final in zip("ab", finals):
        written = json.loads((tmp_path / "O" / f"{run}-final" / zero_shot.RESULTS_FILE).read_text())
        assert written["model_dir"] == str(final.resolve())


def test_an_unwritable_results_folder_fails_before_evaluating(tiny_pnet_dir, fixture_data_dir, tmp_path,
                                                             monkeypatch):
    from pnet_eval import perplexity

    _no_evaluation(monkeypatch)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ValueError, match=f"go to {tmp_path / 'a-file' / tiny_pnet_dir.name}, which cannot be "
                                         "written .*; pass --output-dir DIR"):
        zero_shot.evaluate(str(tiny_pnet_dir), tasks="boolq", data_dir=fixture_data_dir, output_dir=tmp_path / "a-file")
    text = tmp_path / "t.txt"
    text.write_text("some text to score\n")
    with pytest.raises(ValueError, match="which cannot be written"):
        perplexity.evaluate_perplexity(str(tiny_pnet_dir), text, output_dir=tmp_path / "a-file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_model_folder_fails_before_evaluating(tiny_pnet_dir, fixture_data_dir, tmp_path, monkeypatch):
    _no_evaluation(monkeypatch)
    folder = tmp_path / "model"
    shutil.copytree(tiny_pnet_dir, folder)
    folder.chmod(0o555)
    try:
        with pytest.raises(ValueError, match=f"go to {folder}, which cannot be written"):
            zero_shot.evaluate(str(folder), tasks="boolq", data_dir=fixture_data_dir)
    finally:
        folder.chmod(0o755)


def test_an_earlier_result_is_replaced_only_with_overwrite(tiny_pnet_dir, fixture_data_dir, tmp_path, capsys):
    arguments = dict(tasks="boolq", data_dir=fixture_data_dir, limit=2, batch_size=2, device="cpu",
                     output_dir=tmp_path / "O")
    zero_shot.evaluate(str(tiny_pnet_dir), **arguments)
    result = tmp_path / "O" / tiny_pnet_dir.name / zero_shot.RESULTS_FILE
    first = result.read_text()
    with pytest.raises(FileExistsError, match=f"{result} holds the results of an earlier evaluation; pass "
                                              "--overwrite to replace them"):
        zero_shot.evaluate(str(tiny_pnet_dir), **{**arguments, "limit": 4})
    assert result.read_text() == first
    with pytest.raises(SystemExit) as exit_info:
        zero_shot.main([str(tiny_pnet_dir), "--tasks", "boolq", "--data-dir", str(fixture_data_dir), "--output-dir",
                        str(tmp_path / "O")])
    assert exit_info.value.code == 2 and "pass --overwrite" in capsys.readouterr().err
    zero_shot.evaluate(str(tiny_pnet_dir), **{**arguments, "limit": 4}, overwrite=True)
    assert json.loads(result.read_text())["tasks"]["boolq"]["docs"] == 4


def _without_weight(model_dir: Path, folder: Path, name: str, extra: str | None = None) -> Path:
    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, folder)
    weights = load_file(folder / "model.safetensors")
    del weights[name]
    if extra:
        weights[extra] = torch.zeros(2)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def test_a_checkpoint_missing_a_weight_is_refused_before_evaluating(tiny_pnet_dir, fixture_data_dir, tmp_path,
                                                                   monkeypatch):
    """Deleting q_proj from a saved model evaluated a random matrix, with one line in transformers' load report."""
    from pnet.model_loading import CheckpointKeysError, check_checkpoint_weights
    from pnet_eval import perplexity

    _no_evaluation(monkeypatch)
    folder = _without_weight(tiny_pnet_dir, tmp_path / "damaged", "model.layers.0.self_attn.q_proj.weight",
                             extra="model.layers.9.mlp.up_proj.weight")
    message = (f"{folder.resolve()}: its weights do not match its config: missing 1: "
               "model.layers.0.self_attn.q_proj.weight; unexpected 1: model.layers.9.mlp.up_proj.weight")
    with pytest.raises(CheckpointKeysError, match=message):
        zero_shot.evaluate(str(folder), tasks="boolq", data_dir=fixture_data_dir)
    text = tmp_path / "t.txt"
    text.write_text("some text to score\n")
    with pytest.raises(CheckpointKeysError, match=message):
        perplexity.evaluate_perplexity(str(folder), text)
    check_checkpoint_weights(str(tiny_pnet_dir))  # the intact folder passes


def test_tied_embeddings_are_not_missing_weights(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from pnet.model_loading import check_checkpoint_weights, saved_weight_names

    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, tie_word_embeddings=True)).save_pretrained(tmp_path / "tied")
    assert "lm_head.weight" not in saved_weight_names(tmp_path / "tied")
    check_checkpoint_weights(str(tmp_path / "tied"))
