"""scripts/pretrain.py (pnet.pretrain) end to end on a tiny PNet-LLaMA: loss goes down, export reloads, SIGKILL +
--resume gives the same losses and token stream; a diverged step never becomes a checkpoint and the checkpoint the
error names resumes and trains; bad settings fail before anything is built; --resume refuses changed settings unless
allowed (and records them); bad data records are named by file and line or skipped and counted; a half-written log
line does not break --resume; init_from continues an upcycled dense model with its function preserved; DeepSpeed
ZeRO-2/3 and DDP on 2 CPU processes (the README's command); FSDP2 says why it does not run on CPU."""

import gzip
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pnet import pretrain
from pnet import run_log as L
from pnet.checkpoint import ResumeError, list_checkpoints
from pnet.config import ConfigError, load_pretrain_config, read_yaml
from pnet.data import DataRecordError
from pnet.upcycle import upcycle_llama

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_CONFIG = REPO_ROOT / "configs/pretrain/tiny-cpu.yaml"
TINY_MODEL = {"model_type": "pnet_llama", "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "num_experts": 4, "moe_projections": ["down"]}
TINY_DENSE = {k: v for k, v in TINY_MODEL.items() if k not in ("num_experts", "moe_projections")} | {
    "model_type": "llama"}
# Small, fast settings on top of configs/pretrain/tiny-cpu.yaml (seq 32, 4 sequences per step).
TINY_OVERRIDES = ["data.seq_len=32", "micro_batch_size=4", "global_batch_tokens=128", "max_steps=40",
                  "warmup_steps=4", "lr=3e-3", "log_every=1", "eval_every=20", "save_every=5", "keep_last=2",
                  "data.validation_sequences=4", "tensorboard=false"]


def overrides(model_path: Path, output_dir: Path, *extra: str) -> list[str]:
    return [f"model={model_path}", f"output_dir={output_dir}", *TINY_OVERRIDES, *extra]


def pretrain_command(model_path: Path, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "scripts/pretrain.py"), "--config", str(TINY_CONFIG),
            *overrides(model_path, output_dir, *extra)]


def run_in_process(model_path: Path, output_dir: Path, *extra: str) -> Path:
    """pnet.pretrain.main in this process (no interpreter start-up): for the short runs."""
    settings = [a for a in extra if "=" in a and not a.startswith("-")]
    flags = [a for a in extra if a not in settings]  # --resume, --allow-change KEY
    return pretrain.main(["--config", str(TINY_CONFIG), *overrides(model_path, output_dir, *settings), *flags])


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True, timeout=600,
                          **kwargs)


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the configs' data paths are relative to the repository root


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "pnet-test.json"
    path.write_text(json.dumps(TINY_MODEL))
    return path


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, model_path) -> Path:
    """An uninterrupted 40-step run; other tests compare against its log (and work on copies of it)."""
    output_dir = tmp_path_factory.mktemp("reference")
    result = run(pretrain_command(model_path, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def train_records(output_dir: Path) -> dict[int, dict]:
    return {r[L.STEP]: r for r in L.train_records(L.read_log(output_dir / L.LOG_FILE))}


def assert_export_reproduces_logged_val_loss(output_dir: Path) -> None:
    """``final/`` reloads with trust_remote_code and gives the validation loss logged at the last step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pnet.data import build_validation_sets, load_tokenizer

    final = output_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    assert type(model).__name__ == "PNetLlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(final, trust_remote_code=True)("Hello world").input_ids == [1, 15043, 3186]
    config = load_pretrain_config(TINY_CONFIG, ["data.seq_len=32", "data.validation_sequences=4"])
    batch = build_validation_sets(config.data, load_tokenizer(config.data.tokenizer))["web"]
    logged = L.val_records(L.read_log(output_dir / L.LOG_FILE))[-1]
    with torch.no_grad():
        assert abs(model(input_ids=batch, labels=batch).lm_loss.item() - logged[L.VAL_LOSS]["web"]) < 1e-4


def copy_run(run_dir: Path, destination: Path) -> Path:
    shutil.copytree(run_dir, destination)
    return destination


# ------------------------------------------------------------------------------------------------ training

def test_tiny_run_loss_goes_down_and_export_reloads(reference_run):
    records = train_records(reference_run)
    assert sorted(records) == list(range(1, 41))
    assert [records[s][L.TOKENS] for s in (1, 40)] == [128, 40 * 128]
    first = sum(records[s][L.LM_LOSS] for s in range(1, 6)) / 5
    last = sum(records[s][L.LM_LOSS] for s in range(36, 41)) / 5
    assert first > 10.0 and last < first - 1.0, (first, last)
    assert all(abs(records[s][L.AUX_LOSS] - 1.0) < 0.5 for s in records)  # 1.0 = uniform routing
    loads = torch.tensor(records[40][L.EXPERT_LOAD])
    assert loads.shape == (2, 4) and torch.allclose(loads.sum(-1), torch.ones(2))
    assert records[40][L.ROUTER_NAMES] == ["layers.0.mlp.down", "layers.1.mlp.down"]
    assert [p.name for _, p in list_checkpoints(reference_run)] == ["checkpoint-35", "checkpoint-40"]
    assert (reference_run / "training.png").stat().st_size > 10_000
    assert list((reference_run / "tensorboard").glob("**/events.*")) == []  # tensorboard=false

    final = reference_run / "final"
    assert {"model.safetensors", "config.json", "modeling_pnet_llama.py", "tokenizer.json"} <= {
        p.name for p in final.iterdir()}
    assert not list(final.glob("*.bin")) and not (reference_run / "final.tmp").exists()
    assert json.loads((final / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_pnet_llama.PNetLlamaForCausalLM")
    # The tokenizer pads and knows the model's context length (max_position_embeddings 64), no load-time keys.
    tokenizer_config = json.loads((final / "tokenizer_config.json").read_text())
    assert tokenizer_config["pad_token"] == "<unk>" and tokenizer_config["model_max_length"] == 64
    assert "local_files_only" not in tokenizer_config
    # The resolved run config (overrides applied) travels with the export, for model cards.
    run_config = yaml.safe_load((final / "pretrain_config.yaml").read_text())
    assert run_config["max_steps"] == 40 and run_config["model"].endswith("pnet-test.json")
    assert_export_reproduces_logged_val_loss(reference_run)


def test_sigkill_and_resume_reproduce_losses_and_tokens(tmp_path, model_path, reference_run):
    output_dir = tmp_path / "killed"
    process = subprocess.Popen(pretrain_command(model_path, output_dir), cwd=REPO_ROOT, env=run_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (output_dir / "checkpoint-10").is_dir() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    resumed_from = list_checkpoints(output_dir)[-1][0]
    assert 10 <= resumed_from < 40
    (output_dir / "checkpoint-39.tmp").mkdir()  # what a kill in the middle of a save leaves: ignored

    result = run(pretrain_command(model_path, output_dir, "--resume"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {output_dir / f'checkpoint-{resumed_from}'}" in result.stdout
    reference, resumed = train_records(reference_run), train_records(output_dir)
    assert sorted(resumed) == list(range(1, 41))
    for step in range(resumed_from + 1, 41):
        assert resumed[step][L.BATCH_CRC32] == reference[step][L.BATCH_CRC32], step
        for key in (L.LOSS, L.LM_LOSS, L.AUX_LOSS, L.GRAD_NORM, L.LR, L.TOKENS):
            assert abs(resumed[step][key] - reference[step][key]) <= 1e-6, (step, key)
    assert not (output_dir / "checkpoint-39.tmp").exists()


def test_diverged_step_never_becomes_the_named_checkpoint(tmp_path, model_path):
    """lr 1e9 after 1 warmup step at lr 0: step 2's update explodes the weights and step 3's gradient is NaN. Before,
    checkpoint-3 (NaN weights) was saved and named as the last good one; now a checkpoint is published only after
    the next step from its weights came out finite, so the error names checkpoint-1, which resumes (with a lower lr,
    allowed explicitly) and trains."""
    output_dir = tmp_path / "diverged"
    with pytest.raises(FloatingPointError, match=f"at step 3; stopped before the update. Last good checkpoint: "
                                                 f"{output_dir / 'checkpoint-1'} "):
        run_in_process(model_path, output_dir, "lr=1e9", "warmup_steps=4", "save_every=1", "max_steps=8")
    assert [step for step, _ in list_checkpoints(output_dir)] == [1]
    assert not list(output_dir.glob("*.tmp")) and not (output_dir / "final").exists()

    run_in_process(model_path, output_dir, "lr=3e-3", "warmup_steps=4", "save_every=1", "max_steps=8", "--resume",
                   "--allow-change", "lr")
    records = train_records(output_dir)
    assert sorted(records) == list(range(1, 9))
    assert all(math.isfinite(records[s][L.LOSS]) and records[s][L.LOSS] < 11 for s in range(2, 9))
    assert records[2][L.LR] == pytest.approx(3e-3 * 0.25)  # the new lr at the resumed step (warmup 1/4)

    # The case: the very first update explodes, so no checkpoint is good.
    with pytest.raises(FloatingPointError, match="at step 2; stopped before the update. No checkpoint was published: "
                                                 "start again"):  # not "--resume continues from" none
        run_in_process(model_path, tmp_path / "first", "lr=1e9", "warmup_steps=0", "save_every=1", "max_steps=4")
    assert list_checkpoints(tmp_path / "first") == []


BAD_SETTINGS = [  # override(s) -> what the error says (key, value, what is allowed)
    (["max_grad_norm=-1"], "max_grad_norm=-1: Input should be greater than 0"),
    (["model_overrides.num_expert=4"],
     r"model_overrides: unknown key\(s\) \['num_expert'\] \('num_expert' -> did you mean 'num_experts'\?\); allowed:"),
    (["data.seq_len=128", "global_batch_tokens=512"],
     r"data.seq_len=128 exceeds the model's max_position_embeddings=64; allowed: data.seq_len <= 64"),
    (["warmup_steps=2.5"], "warmup_steps=2.5: Input should be a valid integer"),
    (["save_every=abc"], "save_every='abc': Input should be a valid integer"),
    (["adam_beta1=1.5"], "adam_beta1=1.5: Input should be less than 1"),
    (["max_step=3"], r"unknown key\(s\) \['max_step'\] \('max_step' -> did you mean 'max_steps'\?\)"),
    (["warmup_steps=40"], r"warmup_steps=40 must be < max_steps=40"),
    (["lr=nan"], "lr='nan': Input should be a finite number"),
    (["model=nowhere.json"], "model file 'nowhere.json' not found"),
    (["init_from=runs/nowhere"], "set exactly one of model .* and init_from"),
    (["model_overrides.num_experts=0"], "num_experts must be an integer >= 1, got 0"),
    (["data.on_bad_record=ignore"], "data.on_bad_record='ignore': Input should be 'error' or 'skip'"),
    # Settings that passed validation and failed later (issue 20): in numpy, at the first forward, with a KeyError,
    # as a NaN loss, as a bare StopIteration, as an OSError that did not name the key.
    (["seed=1099511627776"], "command-line override: seed=1099511627776: Input should be less than 4294967296"),
    (["model_overrides.num_key_value_heads=3"],
     r"num_attention_heads=2 is not a multiple of num_key_value_heads=3 .*; allowed: \[1, 2\]"),
    (["model_overrides.hidden_act=foo"], "hidden_act='foo' is not an activation transformers knows"),
    (["data.seq_len=1"], "command-line override: data.seq_len=1: Input should be greater than or equal to 2"),
    (["data.sources.web.train_skip_docs=100000"],
     r"data.sources.web.train_skip_docs=100000 skips every document of its 'train' split \(\d+\); allowed: < \d+"),
    (["data.tokenizer=no-such-tokenizer"], "data.tokenizer='no-such-tokenizer': no tokenizer could be loaded"),
    # A trainer checkpoint is not a saved model (it used to read "model_type must be one of ..., got None").
    (["model=null", "init_from=tests"], "init_from 'tests' has no config.json: not a saved model folder$"),
]


@pytest.mark.parametrize("settings,message", BAD_SETTINGS, ids=[s[0][0].split("=")[0] for s in BAD_SETTINGS])
def test_bad_settings_fail_before_anything_is_built(settings, message, tmp_path, model_path):
    with pytest.raises(ConfigError, match=message):
        run_in_process(model_path, tmp_path / "out", *settings)
    assert not (tmp_path / "out").exists()


def test_a_key_set_twice_in_a_yaml_file_is_refused(tmp_path):
    config = tmp_path / "twice.yaml"
    config.write_text(TINY_CONFIG.read_text() + "\nlr: 0.5\n")
    with pytest.raises(ConfigError, match=f"{config}, line \\d+: key 'lr' is set twice \\(first at line \\d+\\); a "
                                          "YAML file would keep the last value silently"):
        load_pretrain_config(config)
    anchors = tmp_path / "anchors.yaml"  # a merge key is not a repeated key: explicit keys override merged ones
    anchors.write_text("base: &base {x: 1, y: 2}\nrun:\n  <<: *base\n  y: 3\n")
    assert read_yaml(anchors)["run"] == {"x": 1, "y": 3}
    (tmp_path / "broken.yaml").write_text("lr: [1, 2\nseed: 3\n")
    with pytest.raises(ConfigError, match=f"{tmp_path / 'broken.yaml'}: not valid YAML: while parsing"):
        read_yaml(tmp_path / "broken.yaml")


def test_cli_errors_and_help(tmp_path, model_path, capsys):
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        run_in_process(model_path, tmp_path / "out", "--resume")
    with pytest.raises(ConfigError, match="--allow-change only applies with --resume"):
        run_in_process(model_path, tmp_path / "out", "--allow-change", "lr")
    help_text = pretrain.build_parser().format_help()
    for line in ("max_steps (int, required): optimizer steps", "lr_schedule (one of cosine/linear, default \"cosine\")",
                 "data.sources.<name>.weight (float, required)", "max_grad_norm (float | null, default 1.0)",
                 "init_from (str | null, default null)", "data.on_bad_record (one of error/skip, default \"error\")"):
        assert line in help_text, line
    with pytest.raises(SystemExit) as exit_:
        pretrain.cli(["--config", str(TINY_CONFIG), "adam_beta1=1.5"])  # a message, not a traceback
    assert exit_.value.code == 1
    assert capsys.readouterr().err.endswith("adam_beta1=1.5: Input should be less than 1\n")


# ------------------------------------------------------------------------------------------------------ resume

def test_resume_refuses_changed_settings_and_records_allowed_ones(tmp_path, model_path, reference_run):
    """Changing lr, seq_len or the model on --resume is refused, listing every difference, before anything is written
    (before: lr=0.5 kept the checkpoint's schedule but wrote lr 0.5 into the saved config and the export); max_steps
    may grow; --allow-change applies the new value (the optimizer really uses it) and records it."""
    run_dir = copy_run(reference_run, tmp_path / "run")
    saved_config = (run_dir / "pretrain_config.yaml").read_text()
    with pytest.raises(ResumeError, match=r"(?s)checkpoint-40: these settings differ.*  lr: 0.003 in the checkpoint, "
                                          r"0.5 now.*pass --allow-change lr\."):
        run_in_process(model_path, run_dir, "lr=0.5", "--resume")
    with pytest.raises(ResumeError, match=r"(?s)data.seq_len: 32 in the checkpoint, 16 now.*global_batch_tokens: 128 "
                                          r"in the checkpoint, 64 now.*--allow-change data.seq_len "
                                          r"--allow-change global_batch_tokens\."):
        run_in_process(model_path, run_dir, "data.seq_len=16", "global_batch_tokens=64", "--resume")
    with pytest.raises(ResumeError, match="model_config.router_aux_loss_coef: 0.01 in the checkpoint, 0.1 now"):
        run_in_process(model_path, run_dir, "model_overrides.router_aux_loss_coef=0.1", "--resume")
    # A source added on resume, even allowed, is refused before the build (it crashed inside datasets' stream
    # restore with an IndexError).
    extra = ("data.sources.extra={path: json, weight: 0.25, data_files: {train: " + str(REPO_ROOT / "data/mix/web/"
             "train-*.jsonl.gz") + "}, validation_split: null}")
    with pytest.raises(ResumeError, match="data source 'extra' added on resume; the checkpoint's data position"):
        run_in_process(model_path, run_dir, extra, "--resume", "--allow-change", "data.sources", "--allow-change",
                       "data_files")
    with pytest.raises(ResumeError, match=r"max_steps=30 is below the step of .*checkpoint-40 \(40\)"):
        run_in_process(model_path, run_dir, "max_steps=30", "--resume")
    assert (run_dir / "pretrain_config.yaml").read_text() == saved_config
    assert sorted(train_records(run_dir)) == list(range(1, 41))

    # max_steps grows: allowed as is, and recorded (the schedule spans the new length). A half-written last log line
    # (a kill mid-write) is dropped, not a crash.
    with open(run_dir / L.LOG_FILE, "a") as f:
        f.write('{"step": 41, "loss": 10.')
    run_in_process(model_path, run_dir, "max_steps=42", "--resume")
    records = train_records(run_dir)
    assert sorted(records) == list(range(1, 43)) and records[42][L.TOKENS] == 42 * 128
    assert L.event_records(L.read_log(run_dir / L.LOG_FILE), L.EVENT_RESUME)[-1][L.CHANGES] == {"max_steps": [40, 42]}

    # An allowed change takes effect (the lr of the next step is the new schedule's) and is recorded.
    run_in_process(model_path, run_dir, "max_steps=44", "lr=1e-3", "--resume", "--allow-change", "lr")
    records = train_records(run_dir)
    factor = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (42 - 4) / (44 - 4)))  # cosine to 10%, warmup 4
    assert records[43][L.LR] == pytest.approx(1e-3 * factor, rel=1e-6)
    event = L.event_records(L.read_log(run_dir / L.LOG_FILE), L.EVENT_RESUME)[-1]
    assert event[L.STEP] == 42 and event[L.CHANGES] == {"lr": [0.003, 0.001], "max_steps": [42, 44]}
    saved = (run_dir / "pretrain_config.yaml").read_text()
    assert "# --resume at step 42 with --allow-change lr: 0.003 -> 0.001" in saved
    assert yaml.safe_load(saved)["lr"] == 0.001
    assert "--allow-change lr: 0.003 -> 0.001" in (run_dir / "final/pretrain_config.yaml").read_text()


def test_log_reader_drops_only_a_half_written_last_line(tmp_path):
    path = tmp_path / L.LOG_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r[L.STEP] for r in L.read_log(path)] == [1, 2]
    L.JsonlLog(path, resume_step=1)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n'
    path.write_text('{"step": 1, "loss": 2.0}\nnot json\n{"step": 2, "loss": 1.5}\n')
    with pytest.raises(ValueError, match=f"{path}, line 2: not a JSON object"):
        L.read_log(path)


# ------------------------------------------------------------------------------------------------- bad data

def bad_web_shard(tmp_path: Path, line: int, record: str) -> Path:
    """The bundled web training shard with ``record`` as its line ``line``."""
    with gzip.open(REPO_ROOT / "data/mix/web/train-00000-of-00002.jsonl.gz", "rt") as f:
        lines = f.readlines()[:150]
    lines.insert(line - 1, record + "\n")
    path = tmp_path / "web-train.jsonl.gz"
    with gzip.open(path, "wt") as f:
        f.writelines(lines)
    return path


def test_bad_data_record_stops_before_training_or_is_skipped_and_counted(tmp_path, model_path):
    """A null text at document 71 crashed step 18 with a pyarrow traceback; now the run stops before the model is
    built naming file, line and field, and with on_bad_record=skip it trains and logs the count."""
    shard = bad_web_shard(tmp_path, 71, '{"text": null, "source": "web"}')
    with pytest.raises(DataRecordError, match=f"data source 'web' \\(train\\): {shard}, line 71: field 'text' is "
                                              "null; .*data.on_bad_record=skip"):
        run_in_process(model_path, tmp_path / "out", f"data.sources.web.data_files.train={shard}")
    assert not (tmp_path / "out" / L.LOG_FILE).exists()

    shard = bad_web_shard(tmp_path, 2, '{"text": 42}')
    run_in_process(model_path, tmp_path / "skip", f"data.sources.web.data_files.train={shard}",
                   "data.on_bad_record=skip", "max_steps=6", "warmup_steps=1")
    records = L.read_log(tmp_path / "skip" / L.LOG_FILE)
    [check] = L.event_records(records, L.EVENT_DATA_CHECK)
    assert check[L.BAD_RECORDS] == {"web": {"train": 1}}
    assert check[L.BAD_RECORD_EXAMPLES] == [f"{shard}, line 2: field 'text' is int 42, not a string"]
    assert L.train_records(records)[-1][L.BAD_RECORDS_SKIPPED] == {"web": 1, "wikipedia": 0, "arxiv": 0}


# ------------------------------------------------------------------------------------------------- init_from

def test_init_from_continues_an_upcycled_dense_run(tmp_path):
    """Tiny dense run -> upcycled with pnet.upcycle.upcycle_llama -> saved -> continued with init_from: the first
    logged LM loss is the dense model's loss on the same batch (the function is preserved), with a fresh data
    position (the same first batch as the dense run), and training goes on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pnet.data import PackedBatchIterator, build_train_stream, load_tokenizer

    dense_model = tmp_path / "llama-tiny.json"
    dense_model.write_text(json.dumps(TINY_DENSE))
    dense_final = run_in_process(dense_model, tmp_path / "dense", "max_steps=8")
    upcycled = tmp_path / "upcycled"
    upcycle_llama(str(dense_final), num_experts=4, moe_projections=["up"]).save_pretrained(upcycled)
    AutoTokenizer.from_pretrained(dense_final).save_pretrained(upcycled)

    continued = pretrain.main(["--config", str(TINY_CONFIG), *TINY_OVERRIDES, "model=null", f"init_from={upcycled}",
                               f"output_dir={tmp_path / 'continued'}", "max_steps=12", "warmup_steps=0"])
    records = train_records(tmp_path / "continued")
    config = load_pretrain_config(TINY_CONFIG, TINY_OVERRIDES + [f"model={dense_model}"])
    batch = PackedBatchIterator(build_train_stream(config.data, load_tokenizer(config.data.tokenizer), config.seed),
                                config.micro_batch_size).next_batch()
    dense = AutoModelForCausalLM.from_pretrained(dense_final)
    with torch.no_grad():
        dense_loss = dense(input_ids=batch, labels=batch).loss.item()
    assert abs(records[1][L.LM_LOSS] - dense_loss) <= 1e-6, (records[1][L.LM_LOSS], dense_loss)
    assert records[1][L.BATCH_CRC32] == train_records(tmp_path / "dense")[1][L.BATCH_CRC32]
    assert records[1][L.LR] == 3e-3  # a fresh schedule (no warmup here), not the dense run's decayed one
    assert records[12][L.LM_LOSS] < records[1][L.LM_LOSS] - 0.05
    exported = AutoModelForCausalLM.from_pretrained(continued)
    assert type(exported).__name__ == "PNetLlamaForCausalLM" and exported.config.moe_projections == ["up"]


# -------------------------------------------------------------------------------------------- configs, launchers

@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs/pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_pretrain_config_validates(path):
    """All shipped configs parse and validate (Hub configs cannot run here, but their keys and batch math can)."""
    if "corpus" in path.stem and not (REPO_ROOT.parent / "shared/data/corpus").is_dir():
        pytest.skip("offline data pack not present")
    config = load_pretrain_config(path)
    model = json.loads((REPO_ROOT / config.model).read_text())
    assert model["model_type"] in ("llama", "pnet_llama")
    if path.stem.startswith("paper-"):
        assert config.data.seq_len == 2048 and config.global_batch_tokens == 2048 * 2048
        assert config.lr == 3e-4 and config.min_lr_ratio == 0.1
        assert 89e9 < config.max_steps * config.global_batch_tokens < 91e9
        assert config.grad_accum_steps(world_size=8) == 32
        assert set(config.data.sources) == {"c4", "wikipedia", "arxiv"}
        assert abs(sum(config.data.weights().values()) - 1) < 1e-9
        expected = "dense" if model["model_type"] == "llama" else (
            f"{model['moe_projections'][0]}-e{model['num_experts']}")
        assert path.stem == f"paper-llama1b-{expected}"
    else:  # the CPU configs run on 1 and on 2 processes
        assert config.grad_accum_steps(world_size=1) == 2 * config.grad_accum_steps(world_size=2)


def readme_two_process_command() -> list[str]:
    """The README's 2-process pretraining command, as written, without accelerate's -q (quiet launcher errors)."""
    readme = (REPO_ROOT / "README.md").read_text()
    [line] = [line for line in readme.splitlines()
              if line.startswith("accelerate launch -q --config_file configs/accelerate/cpu-2proc.yaml")]
    return [word for word in shlex.split(line.split("#")[0]) if word != "-q"]


@pytest.mark.slow
def test_readme_two_process_example_runs_and_resume_keeps_the_world_size(tmp_path):
    """The README's DDP command runs as written with the tiny config (only shortened here), the startup line says
    world size 2, and resuming its checkpoint with 1 process is refused (rank 1's data position would be lost)."""
    command = readme_two_process_command()
    assert command[:5] == ["accelerate", "launch", "--config_file", "configs/accelerate/cpu-2proc.yaml",
                           "scripts/pretrain.py"]
    config = load_pretrain_config(command[6], command[7:])
    assert config.grad_accum_steps(world_size=2) == 1 and config.warmup_steps < config.max_steps
    output_dir = tmp_path / "ddp"
    shortened = ["data.seq_len=32", "global_batch_tokens=128", "max_steps=3", "warmup_steps=1", "save_every=3",
                 "log_every=1", "eval_every=3", "data.validation_sequences=4", "tensorboard=false",
                 f"output_dir={output_dir}"]
    result = run([sys.executable, "-m", "accelerate.commands.launch", *command[2:3], command[3],
                  "--main_process_port", "29533", *command[4:], *shortened])
    assert result.returncode == 0, result.stderr[-4000:]
    assert "world size 2 (DistributedType.MULTI_CPU)" in result.stdout
    assert sorted(train_records(output_dir)) == [1, 2, 3]
    with pytest.raises(ResumeError, match=r"(?s)world_size: 2 in the checkpoint, 1 now.*Resume with the same number "
                                          "of processes"):
        pretrain.main(["--config", command[6], *command[7:], *shortened, "--resume", "--allow-change", "world_size"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_two_cpu_processes(tmp_path, model_path, stage):
    """ZeRO-2/3 with 2 CPU processes (gloo): trains, checkpoints per rank, exports the gathered weights."""
    pytest.importorskip("deepspeed")
    output_dir = tmp_path / f"zero{stage}"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO_ROOT / f"configs/accelerate/deepspeed-zero{stage}.yaml"), "--main_process_port",
               str(29517 + stage),
               *pretrain_command(model_path, output_dir, "max_steps=3", "warmup_steps=1", "save_every=3",
                                 "eval_every=3", "global_batch_tokens=512")[1:]]
    result = run(command)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "world size 2" in result.stdout and "accum 2" in result.stdout and "DEEPSPEED" in result.stdout
    records = train_records(output_dir)
    assert sorted(records) == [1, 2, 3] and all(r[L.LOSS] > 9 for r in records.values())
    checkpoint = output_dir / "checkpoint-3"
    states = [json.loads((checkpoint / f"data_state_rank{r}.json").read_text()) for r in range(2)]
    assert states[0]["sequences_consumed"] == states[1]["sequences_consumed"] == 3 * 2 * 4
    # Each rank's saved position continues its own, disjoint part of the data.
    from pnet.data import PackedBatchIterator, build_train_stream, load_tokenizer

    config = load_pretrain_config(TINY_CONFIG, overrides(model_path, output_dir))
    tokenizer = load_tokenizer(config.data.tokenizer)
    following = []
    for rank, state in enumerate(states):
        batches = PackedBatchIterator(build_train_stream(config.data, tokenizer, config.seed, rank, 2), 4)
        batches.load_state_dict(state)
        following.append({tuple(row) for row in batches.next_batch().tolist()})
    assert not following[0] & following[1]
    assert_export_reproduces_logged_val_loss(output_dir)


def test_fsdp2_config_is_valid_and_refuses_cpu_with_the_reason(tmp_path, model_path, monkeypatch):
    """configs/accelerate/fsdp2.yaml is an accelerate FSDP2 config; on CPU accelerate never enables FSDP (launched
    processes would train unconnected), so every process stops at once saying why and what to use instead."""
    from accelerate.commands.config.config_args import load_config_from_file

    launch = load_config_from_file(str(REPO_ROOT / "configs/accelerate/fsdp2.yaml"))
    assert launch.distributed_type == "FSDP" and launch.fsdp_config["fsdp_version"] == 2
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # what `accelerate launch` sets in each process for this config
    with pytest.raises(ConfigError, match=r"FSDP needs GPUs .* never for CPU processes"):
        run_in_process(model_path, tmp_path / "fsdp", "max_steps=2", "warmup_steps=0")
    assert not (tmp_path / "fsdp").exists()


# ---------------------------------------------------------------------------------------- run guards (issue 20)

def test_a_second_run_on_a_held_output_folder_refuses_before_anything(tmp_path, model_path, monkeypatch):
    """Two runs in one output folder corrupted each other (two step-1 records, a final/ config from the other seed);
    now the second refuses at once, naming the holder, and writes nothing."""
    from pnet.run_lock import LOCK_FILE, OutputLockedError, exclusive_output

    built = []
    monkeypatch.setattr(pretrain.CausalLMTask, "plan", lambda *a: built.append("plan"))
    output_dir = tmp_path / "out"
    with exclusive_output(output_dir):
        with pytest.raises(OutputLockedError, match=f"output folder {output_dir} is in use by another run \\(pid "
                                                    f"{os.getpid()} on .*\\). Two runs writing one folder"):
            run_in_process(model_path, output_dir)
        assert built == [] and sorted(p.name for p in output_dir.iterdir()) == [LOCK_FILE]
    assert not output_dir.exists()  # released; the folder the lock made, left empty, is gone


def test_a_lock_left_by_a_killed_run_is_named_and_taken_over(tmp_path, model_path, capfd):
    from pnet.run_lock import LOCK_FILE

    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / LOCK_FILE).write_text('{"pid": 999999, "host": "h", "started": "2026-12-01 10:00:00", '
                                        '"command": "scripts/pretrain.py"}\n')
    run_in_process(model_path, output_dir, "max_steps=2", "warmup_steps=0")
    assert "taking over the lock of a run that ended without releasing it (pid 999999 on h, started " \
           "2026-12-01 10:00:00" in capfd.readouterr().err
    assert (output_dir / "final").is_dir() and not (output_dir / LOCK_FILE).exists()


def test_an_output_dir_that_cannot_be_written_is_refused_before_the_plan(tmp_path, model_path):
    from pnet.run_lock import OutputNotWritableError

    (tmp_path / "a-file").write_text("")
    with pytest.raises(OutputNotWritableError, match=f"output folder {tmp_path / 'a-file' / 'out'}: cannot create"):
        run_in_process(model_path, tmp_path / "a-file" / "out")


@pytest.mark.slow
def test_two_processes_cannot_publish_to_one_final(tmp_path, model_path):
    """Two real runs, seeds 0 and 1, started together on one output_dir: one trains and publishes final/, whose
    config carries its seed; the other exits with the lock message; the log has one record per step."""
    output_dir = tmp_path / "shared"
    processes = [subprocess.Popen(pretrain_command(model_path, output_dir, f"seed={seed}", "max_steps=10",
                                                   "warmup_steps=1"),
                                  cwd=REPO_ROOT, env=run_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for seed in (0, 1)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in processes]
    codes = [code for code, _ in results]
    assert sorted(codes) == [0, 1], results
    winner = codes.index(0)
    assert "is in use by another run" in results[1 - winner][1] and "Traceback" not in results[1 - winner][1]
    assert yaml.safe_load((output_dir / "final" / "pretrain_config.yaml").read_text())["seed"] == winner
    assert sorted(train_records(output_dir)) == list(range(1, 11))


def test_a_finite_divergence_stops_like_a_nan_and_names_the_last_good_checkpoint(tmp_path, model_path):
    """lr=5 without clipping took the loss from 10.4 to over 100 and still published checkpoints and final/."""
    output_dir = tmp_path / "spike"
    with pytest.raises(FloatingPointError, match=r"loss spike at step 4: loss 1\d\d(\.\d+)? is above loss_spike_factor="
                                                 r"10.0 times 10.4, the median loss of the last 3 steps .*stopped "
                                                 f"before the update. Last good checkpoint: {output_dir / 'checkpoint-2'} "):
        run_in_process(model_path, output_dir, "lr=5", "max_grad_norm=null", "warmup_steps=2", "save_every=2",
                       "max_steps=12")
    assert [step for step, _ in list_checkpoints(output_dir)] == [2] and not (output_dir / "final").exists()
    # Off, the same run publishes (what it did before): the guard is what stops it.
    run_in_process(model_path, tmp_path / "off", "lr=5", "max_grad_norm=null", "warmup_steps=2", "save_every=2",
                   "max_steps=12", "loss_spike_factor=null")
    assert max(r[L.LOSS] for r in train_records(tmp_path / "off").values()) > 104
    with pytest.raises(ConfigError, match="loss_spike_factor=1: Input should be greater than 1"):
        run_in_process(model_path, tmp_path / "bad", "loss_spike_factor=1")


def test_a_damaged_latest_checkpoint_is_named_with_the_previous_intact_one(tmp_path, model_path, reference_run):
    run_dir = copy_run(reference_run, tmp_path / "run")
    weights = run_dir / "checkpoint-40" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:300_000])  # a copy cut short
    with pytest.raises(ResumeError, match=f"the latest checkpoint {run_dir / 'checkpoint-40'} is damaged: "
                                          "model.safetensors: 300000 bytes where its header describes \\d+\\. The "
                                          f"previous intact checkpoint is {run_dir / 'checkpoint-35'}: to resume from "
                                          f"it, move the damaged one aside \\(mv {run_dir / 'checkpoint-40'} "):
        run_in_process(model_path, run_dir, "--resume")
    (run_dir / "checkpoint-40").rename(run_dir / "checkpoint-40.damaged")
    run_in_process(model_path, run_dir, "--resume")  # from checkpoint-35, as the message says
    reference, resumed = train_records(reference_run), train_records(run_dir)
    assert resumed[40][L.LOSS] == pytest.approx(reference[40][L.LOSS], abs=1e-6)


def test_a_data_file_changed_under_a_run_is_reported_on_resume(tmp_path, model_path):
    shard = tmp_path / "web-train.jsonl.gz"
    shutil.copyfile(REPO_ROOT / "data/mix/web/train-00000-of-00002.jsonl.gz", shard)
    settings = [f"data.sources.web.data_files.train={shard}", "max_steps=4", "warmup_steps=1", "save_every=2"]
    run_in_process(model_path, tmp_path / "run", *settings)
    bad_web_shard(tmp_path, 3, '{"text": "an edited document"}')  # rewrites web-train.jsonl.gz
    with pytest.raises(ResumeError, match=f"(?s)data_files.{shard}: '[0-9a-f]{{64}}' in the checkpoint, "
                                          f"'[0-9a-f]{{64}}' now.*--allow-change data_files.{shard}.*local data file "
                                          "whose content \\(sha256\\) changed since the checkpoint"):
        run_in_process(model_path, tmp_path / "run", *settings[:1], "max_steps=6", "warmup_steps=1",
                       "save_every=2", "--resume")
    with pytest.raises(ResumeError, match="--allow-change data_file: no such setting \\(did you mean data_files"):
        run_in_process(model_path, tmp_path / "run", *settings[:1], "max_steps=6", "warmup_steps=1",
                       "save_every=2", "--resume", "--allow-change", "data_file")
    run_in_process(model_path, tmp_path / "run", *settings[:1], "max_steps=6", "warmup_steps=1", "save_every=2",
                   "--resume", "--allow-change", "data_files")
    assert sorted(train_records(tmp_path / "run")) == list(range(1, 7))


def test_a_refused_run_under_accelerate_launch_prints_its_message_alone(tmp_path, model_path):
    command = [str(Path(sys.executable).parent / "accelerate"), "launch", "-q", "--num_processes", "1", "--cpu",
               *pretrain_command(model_path, tmp_path / "none", "--resume")[1:]]
    result = run(command)
    assert result.returncode == 1
    message = f"pretrain: error: --resume: no checkpoint-N folder in {tmp_path / 'none'}"
    assert result.stderr.count(message) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]


def test_only_the_first_process_prints_a_user_error(monkeypatch, capsys):
    from pnet.training import run_command

    def refuse(argv):
        raise ConfigError("lr=-1: Input should be greater than 0")

    for rank, printed in (("0", "train: error: lr=-1: Input should be greater than 0\n"), ("1", "")):
        monkeypatch.setenv("RANK", rank)
        with pytest.raises(SystemExit) as exit_:
            run_command("train", refuse, [])
        assert exit_.value.code == 1 and capsys.readouterr().err == printed


def test_init_from_a_folder_missing_a_weight_is_refused_before_the_model_is_built(tmp_path, model_path,
                                                                                  tiny_pnet_dir, monkeypatch):
    from safetensors.torch import load_file, save_file

    from pnet.model_loading import CheckpointKeysError

    folder = tmp_path / "damaged"
    shutil.copytree(tiny_pnet_dir, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.q_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(pretrain.CausalLMTask, "build_model", lambda *a: pytest.fail("the model was built"))
    with pytest.raises(CheckpointKeysError, match=f"{folder}: its weights do not match its config: missing 1: "
                                                  "model.layers.1.self_attn.q_proj.weight"):
        run_in_process(model_path, tmp_path / "out", "model=null", f"init_from={folder}")


def test_init_from_a_trainer_checkpoint_says_what_to_use_instead(tmp_path, model_path, reference_run):
    with pytest.raises(ConfigError, match=re.escape(f"init_from '{reference_run / 'checkpoint-40'}' has no config.json: "
                                                    "not a saved model folder (a checkpoint-N folder is a trainer "
                                                    "checkpoint: continue its run with --resume, or start from the "
                                                    "run's final/)")):
        run_in_process(model_path, tmp_path / "out", "model=null", f"init_from={reference_run / 'checkpoint-40'}")
