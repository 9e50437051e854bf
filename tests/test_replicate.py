"""scripts/replicate_table7.py (experiments.table7) end to end at smoke scale (dense + one MoE row, a few steps, eval limit
4, SST-2 on a few sentences): the report, its JSON and both PNGs exist with the right rows and finite numbers; a re-run
skips finished stages; a run is not continued with other settings; config errors (also in the settings every stage
will get) are raised before anything runs."""

import json
import math
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from experiments import table7 as runner
from pnet.checkpoint import ResumeError
from pnet.config import ConfigError
from pnet.run_lock import OutputNotWritableError

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs/replicate/table7-cpu.yaml"
TINY_DENSE = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 32000, "hidden_size": 32,
              "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "max_position_embeddings": 64, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}
# Bundled data/mix (no data pack needed), 6 steps of 2 x 32 tokens, one process.
SMOKE_PRETRAIN = {"seed": 0, "data.seq_len": 32, "data.validation_sequences": 2, "max_steps": 6,
                  "global_batch_tokens": 64, "micro_batch_size": 2, "lr": 3.0e-3, "warmup_steps": 1,
                  "log_every": 2, "eval_every": 3, "save_every": 3, "keep_last": 1, "tensorboard": False}


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the configs' paths are relative to the repository root


def smoke_config(tmp_path: Path) -> Path:
    """The real table7-cpu config with a tiny model, few steps and paths under tmp_path."""
    values = yaml.safe_load(CONFIG.read_text())
    (tmp_path / "tiny-llama.json").write_text(json.dumps(TINY_DENSE))
    values.update(output_root=str(tmp_path / "runs"), report=str(tmp_path / "results/table7-smoke.md"),
                  launcher=None,  # in the runner's process; the accelerate launchers: tests/test_pretrain.py
                  base_config="configs/pretrain/tiny-cpu.yaml", base_model=str(tmp_path / "tiny-llama.json"),
                  pretrain_overrides=SMOKE_PRETRAIN)
    values["sst2"]["overrides"].update({"epochs": 1, "data.max_train_samples": 16, "data.max_eval_samples": 16,
                                        "data.seq_len": 64})
    values["zero_shot"].update(limit=4, batch_size=4)
    (tmp_path / "heldout.txt").write_text("A small held-out text, scored in rolling windows of 32 tokens. " * 8)
    values["perplexity"].update(files=[f"smoke={tmp_path / 'heldout.txt'}"], max_length=32)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def run_runner(config: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run([sys.executable, "scripts/replicate_table7.py", "--config", str(config),
                           "--rows", "dense,up-e8", *extra], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
def test_runner_end_to_end_and_rerun_skips(tmp_path):
    config = smoke_config(tmp_path)
    result = run_runner(config)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "$ python -m pnet.pretrain --config configs/pretrain/tiny-cpu.yaml model=" in result.stdout

    report = tmp_path / "results/table7-smoke.md"
    summary = json.loads(report.with_suffix(".json").read_text())
    rows = {r["row"]: r for r in summary["rows"]}
    assert list(rows) == ["dense", "up-e8"]
    dense, moe = rows["dense"], rows["up-e8"]
    assert dense["num_experts"] is None and moe["num_experts"] == 8 and moe["moe_projections"] == ["up"]
    # Equal active FLOPs, more parameters: 7 extra up experts of 32 x 64 per layer, plus a 32 -> 8 router per layer.
    assert moe["flops"] == dense["flops"]
    assert moe["total_params"] - dense["total_params"] == 2 * (7 * 32 * 64 + 32 * 8)
    assert moe["active_params"] - dense["active_params"] == 2 * 32 * 8
    assert moe["router_flops"] == 2 * 512 * 2 * 32 * 8
    for r in rows.values():
        assert r["steps"] == 6 and r["tokens"] == 6 * 64
        assert set(r["val_loss"]) == {"web", "wikipedia", "arxiv"}
        assert [p["tokens"] for p in r["val_curve"]] == [3 * 64, 6 * 64]
        numbers = [r["training_loss"], r["final_lm_loss_window"], r["val_loss_mean"], *r["val_loss"].values(),
                   r["arc_easy"], r["boolq"], r["hellaswag"], r["sst2"]]
        assert all(math.isfinite(x) for x in numbers), numbers
        assert 0.0 < r["val_loss_mean"] < 2 * math.log(32000)
        assert r["docs"] == {"arc_easy": 4, "boolq": 4, "hellaswag": 4}
    assert summary["data_order"].startswith("identical")
    assert summary["pretrain_settings"].startswith("identical") and "max_steps=6" in summary["pretrain_settings"]
    assert dense["batch_crc32"] == moe["batch_crc32"] and len(dense["batch_crc32"]) == 3
    # Expert load: 3 windows x 2 routers (layers.0.mlp.up, layers.1.mlp.up) x 8 experts, shares summing to 1.
    assert moe["router_names"] == ["layers.0.mlp.up", "layers.1.mlp.up"]
    assert len(moe["expert_load"]) == 3
    assert all(abs(sum(shares) - 1) < 1e-5 for w in moe["expert_load"] for shares in w["load"])

    markdown = report.read_text()
    assert "| dense | - |" in markdown and "| up-e8 | 8 (up) |" in markdown
    assert "smoke word PPL" in markdown  # the held-out perplexity columns
    for row in ("dense", "up-e8"):
        ppl = json.loads((tmp_path / "runs" / row / "final" / "pnet_perplexity_results.json").read_text())
        assert ppl["files"]["smoke"]["max_length"] == 32 and ppl["files"]["smoke"]["prefix_token_id"] == 2
        assert 1.0 < ppl["files"]["smoke"]["token_perplexity"] < 2 * 32000
    for png in ("table7-smoke-val-loss.png", "table7-smoke-expert-load.png"):
        path = report.with_name(png)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        assert f"]({png})" in markdown

    # A second run skips every finished stage. up-e8 is marked as killed after its last checkpoint but before the
    # runner recorded it: the runner continues it with --resume (which only exports) and skips its evaluations.
    state_path = tmp_path / "runs/up-e8/replicate_state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "done": ["zero_shot", "perplexity", "sst2"]}))
    rerun = run_runner(config)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert rerun.stdout.count("finished earlier: skipped") == 7
    assert "[up-e8] continuing pretraining from checkpoint-6" in rerun.stdout
    resumed = [line for line in rerun.stdout.splitlines() if line.startswith("$ python -m pnet.pretrain")]
    assert len(resumed) == 1 and "output_dir=" + str(tmp_path / "runs/up-e8") in resumed[0]
    assert resumed[0].endswith(" --resume")
    assert json.loads(report.with_suffix(".json").read_text())["rows"][1]["val_loss"] == moe["val_loss"]

    # Checkpoints of a run are not continued with other settings: pnet.pretrain --resume refuses, listing them.
    state_path.write_text(json.dumps({**state, "done": []}))
    loaded = runner.load_replicate_config(config, ["pretrain_overrides.lr=0.01"])
    with pytest.raises(ResumeError, match="lr: 0.003 in the checkpoint, 0.01 now"):
        runner.run_row(loaded, loaded.rows[4])

    # Nor are finished stages skipped under other settings (the report stated the new ones beside the old figures).
    dense_row = next(row for row in loaded.rows if row.name == "dense")
    for override, message in (("pretrain_overrides.max_steps=8", "its pretraining finished earlier with other "
                                                                   "settings:\n  pretrain.max_steps: 6 there, 8 now"),
                              ("zero_shot.limit=8", "its zero_shot finished earlier with other settings:\n  command: ")):
        changed = runner.load_replicate_config(config, [override])
        with pytest.raises(ConfigError, match=re.escape(message)):
            runner.run_row(changed, dense_row)


def test_config_errors_name_the_bad_value(tmp_path, shared_data):  # the config reads ../shared/data
    base = yaml.safe_load(CONFIG.read_text())
    config = runner.load_replicate_config(CONFIG)
    assert [r.name for r in config.rows] == ["dense", "gate-e4", "gate-e8", "up-e4", "up-e8", "down-e4", "down-e8"]
    cases = [
        ("rows", [{"name": "a", "num_experts": 1, "moe_projections": ["up"]}], "num_experts must be 0"),
        ("rows", [{"name": "a", "num_experts": 4, "moe_projections": ["ffn"]}], "not in ['gate', 'up', 'down']"),
        ("rows", [{"name": "a", "num_experts": 0}, {"name": "a", "num_experts": 0}], "repeated: ['a']"),
        ("rows", [{"name": "a", "num_expert": 4}], "rows.0: unknown key(s) ['num_expert']"),
        ("pretrain_overrides", {"output_dir": "x"}, "must not set 'output_dir'"),
        ("plots", {"expert_load_row": "dense"}, "is not an MoE row"),
        ("base_model", "configs/models/nope.json", "not found"),
        ("moe", {"router_aux_los_coef": 0.1}, "moe: unknown key(s) ['router_aux_los_coef']"),
        ("zero_shot", {"tasks": []}, "zero_shot.tasks=[]: List should have at least 1 item"),
        ("sst2", {"enabled": True, "overrides": {"epoch": 3}}, "sst2.overrides: unknown key(s) ['epoch']"),
    ]
    for key, value, message in cases:
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump({**base, key: value}))
        with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")
                           .replace(")", r"\)")):
            runner.load_replicate_config(path)
    with pytest.raises(ConfigError, match="unknown row"):
        runner.select_rows(config, "dense,up-e16")
    # The pretraining config every row gets is checked by pnet.pretrain's own validation, up front.
    with pytest.raises(ConfigError, match=r"warmup_steps=250 must be < max_steps=250"):
        runner.load_replicate_config(CONFIG, ["pretrain_overrides.warmup_steps=250"])
    # A report path that cannot be written is refused before any row runs (it used to fail after all of them).
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputNotWritableError, match=f"report {tmp_path / 'afile' / 'r.md'}: {tmp_path / 'afile'} "
                                                     "is not a writable folder"):
        runner.main(["--config", str(CONFIG), f"report={tmp_path / 'afile' / 'r.md'}",
                     f"output_root={tmp_path / 'runs'}"])
    assert not (tmp_path / "runs").exists()


def test_rows_differ_only_in_experts(shared_data):  # the config reads ../shared/data
    """Derived model files: dense is the base unchanged; MoE rows add only the routing fields."""
    config = runner.load_replicate_config(CONFIG, ["pretrain_overrides.max_steps=40"])
    assert config.pretrain_overrides["max_steps"] == 40
    base = json.loads(Path(config.base_model).read_text())
    dense, up8 = (runner.derive_model(base, row, config.moe) for row in (config.rows[0], config.rows[4]))
    assert dense == base
    added = {k: v for k, v in up8.items() if k not in base or base[k] != v}
    assert added == {"model_type": "pnet_llama", "architectures": ["PNetLlamaForCausalLM"], "num_experts": 8,
                     "moe_projections": ["up"], **config.moe}
    command = runner.pretrain_command(config, Path("runs/m.json"), Path("runs/r"))
    assert command[:7] == ["accelerate", "launch", "--config_file", "configs/accelerate/cpu-2proc.yaml", "-m",
                           "pnet.pretrain", "--config"]
    assert command[7:10] == ["configs/pretrain/corpus-cpu.yaml", "model=runs/m.json", "output_dir=runs/r"]
    # Every pretraining override is on the command line and reads back (as pnet.pretrain parses it) unchanged.
    parsed = dict(part.split("=", 1) for part in command[10:])
    assert {key: yaml.safe_load(value) for key, value in parsed.items()} == config.pretrain_overrides
    assert parsed["max_steps"] == "40" and parsed["data.seq_len"] == "512"
    row_config = config.pretrain_config(config.base_model, "runs/r")
    assert (row_config.max_steps, row_config.data.seq_len, row_config.output_dir) == (40, 512, "runs/r")
