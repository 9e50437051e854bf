"""The dense-vs-upcycled continued-pretraining runner (experiments/upcycle_smollm2.py) on a tiny local LLaMA: it
upcycles, evaluates both models before, trains both arms on equal tokens in the same order, evaluates after, writes
the report, and a re-run continues a killed run (finished stages skipped, training resumed bit for bit)."""

import gzip
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from experiments.upcycle_smollm2 import (final_validation_lines, heldout_subset, load_study_config, main, plan,
                                         pretrain_config)
from pnet import run_log as L
from pnet.config import ConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs/replicate/upcycle-smollm2.yaml"


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A saved tiny dense LLaMA (random weights) with the LLaMA tokenizer: stands in for SmolLM2."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("models") / "tiny-llama"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(REPO_ROOT / "data/tokenizer/llama").save_pretrained(path)
    return path


def tiny_overrides(tiny_llama_dir: Path, out: Path) -> list[str]:
    return [f"dense_model={tiny_llama_dir}", f"output_root={out / 'runs'}", f"report={out / 'report.md'}",
            "upcycle.num_experts=4",
            "pretrain_overrides.data.seq_len=32", "pretrain_overrides.data.validation_sequences=1",
            "pretrain_overrides.max_steps=4", "pretrain_overrides.global_batch_tokens=128",
            "pretrain_overrides.micro_batch_size=2", "pretrain_overrides.warmup_steps=1",
            "pretrain_overrides.lr=1.0e-3", "pretrain_overrides.cpu_threads=1",
            "pretrain_overrides.log_every=1", "pretrain_overrides.eval_every=2",
            "pretrain_overrides.save_every=2", "pretrain_overrides.keep_last=2",
            "evaluation.heldout_docs=1", "evaluation.perplexity_max_length=64", "evaluation.zero_shot_tasks=[arc_easy]",
            "evaluation.zero_shot_limit=4", "evaluation.batch_size=4", "evaluation.threads=1"]


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # configs name files relative to the repository root


def test_both_arms_share_every_setting_but_the_start(tiny_llama_dir, tmp_path):
    study = load_study_config(CONFIG, tiny_overrides(tiny_llama_dir, tmp_path))
    dense = pretrain_config(study, "dense", 0).to_dict()
    upcycled = pretrain_config(study, "upcycled", 0, init_from=tiny_llama_dir).to_dict()
    assert dense["data"]["tokenizer"] == str(tiny_llama_dir)  # the model's own tokenizer
    assert dense.pop("output_dir").endswith("dense-seed0") and upcycled.pop("output_dir").endswith("upcycled-seed0")
    assert dense == upcycled
    assert plan(load_study_config(CONFIG, ["seeds=[0,1]"])).count("train-upcycled-seed1") == 1


def test_gpu_script_dry_run_parses(tiny_llama_dir):
    """The H200 recipe (bf16, 2 seeds) goes through the same runner; --dry-run checks every run config."""
    result = subprocess.run(["bash", "scripts/gpu/upcycle_smollm2_h200.sh", "--dry-run", f"dense_model={tiny_llama_dir}"],
                            capture_output=True, text=True, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr
    assert "precision bf16" in result.stdout and "upcycled-seed1" in result.stdout


@pytest.mark.slow
def test_runner_upcycles_trains_both_arms_and_resumes(tiny_llama_dir, tmp_path):
    overrides = tiny_overrides(tiny_llama_dir, tmp_path)
    summary = main(["--config", str(CONFIG), *overrides])
    runs = tmp_path / "runs"

    upcycled = json.loads((runs / "upcycled" / "config.json").read_text())
    assert upcycled["model_type"] == "pnet_llama" and upcycled["num_experts"] == 4
    assert upcycled["moe_projections"] == ["up"]
    assert summary["upcycle"]["max_logit_difference"] < 1e-3
    # Equal tokens, same order; active FLOPs equal up to the routers.
    assert summary["equal_tokens"] and summary["same_data_order"]
    assert {run["tokens"] for run in summary["runs"].values()} == {4 * 128}
    flops = summary["flops"]
    assert 1 < flops["upcycled"]["forward_flops_per_token"] / flops["dense"]["forward_flops_per_token"] < 1.01
    assert flops["upcycled"]["active_params"] < flops["upcycled"]["total_params"]
    # Before training, the upcycled model scores exactly as the dense one (it computes the same function).
    before_dense, before_upcycled = summary["evaluations"]["before-dense"], summary["evaluations"]["before-upcycled"]
    assert before_dense.keys() == before_upcycled.keys() and "arc_easy acc" in before_dense
    for metric, value in before_dense.items():
        assert before_upcycled[metric] == pytest.approx(value, rel=1e-4), metric
    assert set(summary["evaluations"]) == {"before-dense", "before-upcycled", "after-dense-seed0",
                                           "after-upcycled-seed0"}
    assert all(stage["peak_rss_mib"] > 0 for stage in summary["stages"].values())
    report = (tmp_path / "report.md").read_text()
    assert "## Before and after" in report and "| train-upcycled-seed0 |" in report
    assert "## Validation loss at step 4 (nats/token)" in report and "| mean |" in report
    assert (tmp_path / "report.png").stat().st_size > 10_000 and (tmp_path / "report.json").is_file()

    # A run killed after its checkpoint at step 2: the re-run resumes it; finished stages are not run again.
    dense_run = runs / "dense-seed0"
    val_before = [r[L.VAL_LOSS] for r in L.val_records(L.read_log(dense_run / L.LOG_FILE))]
    upcycled_stage = runs / "stages" / "train-upcycled-seed0" / "stage.json"
    untouched = upcycled_stage.stat().st_mtime_ns
    shutil.rmtree(dense_run / "final")
    shutil.rmtree(dense_run / "checkpoint-4")
    (runs / "stages" / "train-dense-seed0" / "stage.json").unlink()
    (runs / "eval" / "after-dense-seed0" / "stage.json").unlink()
    summary = main(["--config", str(CONFIG), *overrides])
    records = L.read_log(dense_run / L.LOG_FILE)
    assert [r[L.STEP] for r in L.event_records(records, L.EVENT_RESUME)] == [2]
    assert [r[L.VAL_LOSS] for r in L.val_records(records)] == val_before  # bit for bit
    assert upcycled_stage.stat().st_mtime_ns == untouched
    assert summary["stages"]["train-dense-seed0"]["result"]["resumed"] is True


def test_heldout_subset_takes_first_documents_cut_at_a_space(tmp_path):
    study = load_study_config(CONFIG, [f"output_root={tmp_path}", "evaluation.heldout_docs=2",
                                       "evaluation.heldout_chars=300"])
    subset = heldout_subset(study)
    texts = [json.loads(line)["text"] for line in subset.read_text().splitlines()]
    with gzip.open(REPO_ROOT / study.evaluation.heldout, "rt") as f:
        first = json.loads(f.readline())["text"]
    assert len(texts) == 1 and 290 < len(texts[0]) <= 300 and first.startswith(texts[0] + " ")
    whole = load_study_config(CONFIG, [f"output_root={tmp_path / 'b'}", "evaluation.heldout_docs=2",
                                       "evaluation.heldout_chars=null"])
    assert len(heldout_subset(whole).read_text().splitlines()) == 2


def test_final_validation_table_gives_each_domain_and_the_upcycled_minus_dense_difference():
    def run(web: float, arxiv: float) -> dict:
        return {"val_curve": [{"step": 2, "val_loss": {"web": 9.0, "arxiv": 9.0}},
                              {"step": 32, "val_loss": {"web": web, "arxiv": arxiv}}]}

    runs = {"dense-seed0": run(2.75, 2.10), "upcycled-seed0": run(2.74, 2.08),
            "dense-seed1": run(2.70, 2.20), "upcycled-seed1": run(2.72, 2.20)}
    lines = final_validation_lines(runs, [0, 1])
    assert lines[1] == "## Validation loss at step 32 (nats/token)"
    assert lines[3] == ("| domain | dense-seed0 | upcycled-seed0 | dense-seed1 | upcycled-seed1 | "
                        "upcycled - dense, seed 0 | upcycled - dense, seed 1 |")
    assert lines[5] == "| web | 2.7500 | 2.7400 | 2.7000 | 2.7200 | -0.0100 | +0.0200 |"
    assert lines[6] == "| arxiv | 2.1000 | 2.0800 | 2.2000 | 2.2000 | -0.0200 | +0.0000 |"
    assert lines[7] == "| mean | 2.4250 | 2.4100 | 2.4500 | 2.4600 | -0.0150 | +0.0100 |"
    runs["dense-seed1"]["val_curve"] = []  # a run without validation: no table rather than a partial one
    assert final_validation_lines(runs, [0, 1]) == []


@pytest.mark.parametrize("override,message", [
    # each passed --dry-run ("check every run config") and failed in a stage, or planned every stage twice
    ("upcycle.projections=[foo]", r"command-line override: upcycle: projections must be distinct names from "
                                  r"\['gate', 'up', 'down'\], got \['foo'\]"),
    ("seeds=[0,0]", r"seeds \[0, 0\]: allowed: distinct seeds"),
    ("evaluation.heldout=/nonexistent/held.jsonl.gz", "heldout '/nonexistent/held.jsonl.gz': no such file"),
    ("evaluation.zero_shot_tasks=[nope]", r"zero_shot_tasks: unknown \['nope'\]; allowed: \['arc_easy'"),
])
def test_study_settings_that_cannot_run_are_refused_with_the_config(override, message):
    with pytest.raises(ConfigError, match=message):
        load_study_config(CONFIG, [override])


def test_an_upcycled_folder_is_not_a_dense_model(tiny_llama_dir, tmp_path):
    routed = tmp_path / "routed"
    shutil.copytree(tiny_llama_dir, routed)
    config = json.loads((routed / "config.json").read_text())
    (routed / "config.json").write_text(json.dumps({**config, "model_type": "pnet_llama"}))
    with pytest.raises(ConfigError, match=f"dense_model '{routed}' is a 'pnet_llama' model; allowed: a dense LLaMA"):
        load_study_config(CONFIG, [f"dense_model={routed}"])


def test_smollm2_study_script_names_a_folder_it_cannot_use(repo_root, tiny_llama_dir, tmp_path, capsys):
    """A dense folder for `lora` raised AttributeError ('moe_projections'), --steps -1 a shape error, a missing folder
    the Hub's 'Repo id must be in the form ...'."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("smollm2_study", repo_root / "scripts/smollm2_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    for argv, message in ((["lora", str(tiny_llama_dir)], "model_type 'llama'; allowed: an upcycled PNet-LLaMA"),
                          (["lora", str(tmp_path / "nowhere")], "nowhere: not a saved model folder (no config.json)"),
                          (["perturbation", str(tiny_llama_dir), str(tiny_llama_dir)], "model_type 'llama'")):
        with pytest.raises(SystemExit):
            study.main(argv)
        assert message in capsys.readouterr().err
