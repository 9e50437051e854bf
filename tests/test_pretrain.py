"""scripts/pretrain.py end to end on a tiny PNet-LLaMA: loss goes down, export reloads, SIGKILL + --resume
gives the same losses and token stream, non-finite loss stops without saving, DeepSpeed ZeRO-2 on 2 CPU
processes, config errors before training."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from pnet.train_utils import list_checkpoints, read_jsonl

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = {"model_type": "pnet_llama", "vocab_size": 32000, "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2, "num_experts": 4, "moe_projections": ["down"]}
# Small, fast settings on top of configs/pretrain/tiny-cpu.yaml (seq 32, 4 sequences per step).
TINY_OVERRIDES = ["data.seq_len=32", "micro_batch_size=4", "global_batch_tokens=128", "max_steps=40",
                  "warmup_steps=4", "lr=3e-3", "log_every=1", "eval_every=20", "save_every=5", "keep_last=2",
                  "data.validation_sequences=4", "tensorboard=false"]


def pretrain_command(model_path: Path, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "scripts/pretrain.py"), "--config",
            str(REPO_ROOT / "configs/pretrain/tiny-cpu.yaml"), f"model={model_path}", f"output_dir={output_dir}",
            *TINY_OVERRIDES, *extra]


def run_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO_ROOT, env=run_env(), capture_output=True, text=True, timeout=600,
                          **kwargs)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "pnet-test.json"
    path.write_text(json.dumps(TINY_MODEL))
    return path


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, model_path) -> Path:
    """An uninterrupted 40-step run; other tests compare against its log."""
    output_dir = tmp_path_factory.mktemp("reference")
    result = run(pretrain_command(model_path, output_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    return output_dir


def train_records(output_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(output_dir / "log.jsonl") if "loss" in r}


def assert_export_reproduces_logged_val_loss(output_dir: Path) -> None:
    """``final/`` reloads with trust_remote_code and gives the validation loss logged at the last step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pnet.data import build_validation_sets, load_tokenizer
    from pnet.train_utils import load_config

    final = output_dir / "final"
    model = AutoModelForCausalLM.from_pretrained(final, trust_remote_code=True)
    assert type(model).__name__ == "PNetLlamaForCausalLM"
    assert AutoTokenizer.from_pretrained(final, trust_remote_code=True)("Hello world").input_ids == [1, 15043, 3186]
    config = load_config(REPO_ROOT / "configs/pretrain/tiny-cpu.yaml",
                         ["data.seq_len=32", "data.validation_sequences=4"])
    batch = build_validation_sets(config.data, load_tokenizer(config.data.tokenizer))["web"]
    logged = [r for r in read_jsonl(output_dir / "log.jsonl") if "val_loss" in r][-1]
    with torch.no_grad():
        assert abs(model(input_ids=batch, labels=batch).lm_loss.item() - logged["val_loss"]["web"]) < 1e-4


def test_tiny_run_loss_goes_down_and_export_reloads(reference_run):
    records = train_records(reference_run)
    assert sorted(records) == list(range(1, 41))
    first = sum(records[s]["lm_loss"] for s in range(1, 6)) / 5
    last = sum(records[s]["lm_loss"] for s in range(36, 41)) / 5
    assert first > 10.0 and last < first - 1.0, (first, last)
    assert all(abs(records[s]["aux_loss"] - 1.0) < 0.5 for s in records)  # 1.0 = uniform routing
    loads = torch.tensor(records[40]["expert_load"])
    assert loads.shape == (2, 4) and torch.allclose(loads.sum(-1), torch.ones(2))
    assert records[40]["router_names"] == ["layers.0.mlp.down", "layers.1.mlp.down"]
    assert [p.name for _, p in list_checkpoints(reference_run)] == ["checkpoint-35", "checkpoint-40"]
    assert (reference_run / "training.png").stat().st_size > 10_000
    assert list((reference_run / "tensorboard").glob("**/events.*")) == []  # tensorboard=false

    final = reference_run / "final"
    assert {"model.safetensors", "config.json", "modeling_pnet_llama.py", "tokenizer.json"} <= {
        p.name for p in final.iterdir()}
    assert not list(final.glob("*.bin")) and not (reference_run / "final.tmp").exists()
    assert json.loads((final / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_pnet_llama.PNetLlamaForCausalLM")
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
        assert resumed[step]["batch_crc32"] == reference[step]["batch_crc32"], step
        for key in ("loss", "lm_loss", "aux_loss", "grad_norm", "lr"):
            assert abs(resumed[step][key] - reference[step][key]) <= 1e-6, (step, key)


def test_non_finite_loss_stops_without_saving(tmp_path, model_path):
    output_dir = tmp_path / "diverged"
    result = run(pretrain_command(model_path, output_dir, "lr=1e30", "warmup_steps=0", "save_every=1",
                                  "max_grad_norm=1e30"))
    assert result.returncode != 0
    message = [line for line in result.stderr.splitlines() if "non-finite loss" in line]
    assert message, result.stderr[-2000:]
    bad_step = int(message[-1].split(" at step ")[1].split(";")[0])
    assert bad_step >= 2
    assert [step for step, _ in list_checkpoints(output_dir)][-1] == bad_step - 1
    assert not list(output_dir.glob("*.tmp")) and not (output_dir / "final").exists()


def test_config_errors_stop_before_training(tmp_path, model_path):
    spec = importlib.util.spec_from_file_location("pretrain", REPO_ROOT / "scripts/pretrain.py")
    pretrain = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pretrain)
    base = ["--config", str(REPO_ROOT / "configs/pretrain/tiny-cpu.yaml"), f"model={model_path}",
            f"output_dir={tmp_path / 'out'}"]
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['max_step'\]"):
        pretrain.main(base + ["max_step=3"])
    with pytest.raises(FileNotFoundError, match="model config file 'nowhere.json' not found"):
        pretrain.main(base + ["model=nowhere.json"])
    with pytest.raises(FileNotFoundError, match="no checkpoint-N folder"):
        pretrain.main(base + ["--resume"])
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


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
    assert "2 process(es)" in result.stdout and "accum 2" in result.stdout and "DEEPSPEED" in result.stdout
    records = train_records(output_dir)
    assert sorted(records) == [1, 2, 3] and all(r["loss"] > 9 for r in records.values())
    checkpoint = output_dir / "checkpoint-3"
    states = [json.loads((checkpoint / f"data_state_rank{r}.json").read_text()) for r in range(2)]
    assert states[0]["sequences_consumed"] == states[1]["sequences_consumed"] == 3 * 2 * 4
    assert states[0]["dataset"] != states[1]["dataset"]  # the two ranks read different documents
    assert_export_reproduces_logged_val_loss(output_dir)


@pytest.mark.parametrize("path", sorted((REPO_ROOT / "configs/pretrain").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_pretrain_config_validates(path, monkeypatch):
    """All shipped configs parse and validate (Hub configs cannot run here, but their keys and batch math can)."""
    from pnet.train_utils import load_config

    monkeypatch.chdir(REPO_ROOT)
    if "corpus" in path.stem and not (REPO_ROOT.parent / "shared/data/corpus").is_dir():
        pytest.skip("offline data pack not present")
    config = load_config(path)
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
    else:
        assert config.grad_accum_steps(world_size=1) >= 1
