"""scripts/train_vision.py end to end on a slice of Fashion-MNIST: logs, checkpoints, export, exact resume."""

import importlib.util
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file


def load_script(repo_root):
    spec = importlib.util.spec_from_file_location("train_vision", repo_root / "scripts" / "train_vision.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def recipe_args(repo_root, shared_data, tmp_path):
    def make(output_dir, *extra):
        return [
            "--config", str(repo_root / "configs/vision/train-fmnist-cpu.yaml"),
            "--set",
            f"model_config={repo_root / 'configs/vision/fmnist-parameternet.json'}",
            f"data.path={shared_data / 'images' / 'fashion-mnist'}",
            f"output_dir={output_dir}",
            "data.limit=96", "batch_size=16", "eval_batch_size=48", "max_steps=6", "warmup_steps=2",
            "log_every=2", "eval_every=4", "checkpoint_every=3", "train_eval_samples=32", "cpu_threads=1",
            *extra,
        ]

    return make


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the recipe sets 1 thread; leave the session as it was


def test_train_log_checkpoint_export_and_exact_resume(repo_root, recipe_args, tmp_path, restore_threads):
    train_vision = load_script(repo_root)
    run = tmp_path / "run"
    results = train_vision.main(recipe_args(run))

    assert results["steps"] == 6 and results["num_experts"] == 4 and 0.0 <= results["test_accuracy"] <= 1.0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert any("eval_accuracy_ema" in r and r["step"] == 4 for r in records)
    assert (run / "training.png").stat().st_size > 1000
    assert json.loads((run / "results.json").read_text())["flops"] == results["flops"]
    assert sorted(p for p in os.listdir(run) if p.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6"]  # no .tmp
    final = run / "final"
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_parameternet.py"} <= set(os.listdir(final))
    uninterrupted = load_file(run / "checkpoint-6" / "model.safetensors")

    # Kill after step 3: drop the later checkpoint and the export, then resume.
    shutil.rmtree(run / "checkpoint-6")
    shutil.rmtree(final)
    resumed_results = train_vision.main(recipe_args(run) + ["--resume"])
    assert resumed_results["steps"] == 6
    resumed = load_file(run / "checkpoint-6" / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6, msg=key)
    assert resumed_results["test_accuracy"] == pytest.approx(results["test_accuracy"])
    # The log keeps one record per step: the resumed run replaced what the killed one wrote after step 3.
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
