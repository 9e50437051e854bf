"""scripts/low_flops_trap.py (experiments.low_flops_trap) at smoke scale: the report, its JSON and plot exist with every
model and share; a re-run skips finished runs, continues an interrupted one and refuses changed settings; the
training share is a fixed, class-balanced draw, the same for every call and every run seed."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
import yaml

from experiments import low_flops_trap as trap
from pnet.config import ConfigError
from pnet.vision_data import read_idx, stratified_subset

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = REPO_ROOT / "configs/replicate/low-flops-trap.yaml"
# The first 200 images of each split, 2 steps of 8 images, 2 of the 3 models, 2 seeds: 8 runs in one process.
SMOKE_TRAIN = {"data.limit": 200, "max_steps": 2, "micro_batch_size": 8, "eval_batch_size": 200, "warmup_steps": 1,
               "eval_every": 2, "save_every": 1, "keep_last": 2, "log_every": 1, "train_eval_samples": 20}


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # the configs' paths are relative to the repository root
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the runs set 1 thread; leave the session as it was


def smoke_config(tmp_path: Path, shared_data: Path) -> Path:
    """The real config with a tiny budget, two models, two seeds, one worker and paths under tmp_path."""
    values = yaml.safe_load(CONFIG.read_text())
    values["train_overrides"].update(SMOKE_TRAIN, **{"data.path": str(shared_data / "images" / "fashion-mnist")})
    values.update(output_root=str(tmp_path / "runs"), report=str(tmp_path / "results" / "trap.md"), seeds=[0, 1],
                  models=values["models"][:2], workers=1, load_sample_s=0.5)
    path = tmp_path / "smoke.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_subset_is_fixed_class_balanced_and_nested(shared_data):
    labels = read_idx(str(shared_data / "images/fashion-mnist/train-labels-idx1-ubyte.gz"))
    data = datasets.Dataset.from_dict({"label": labels.tolist(), "index": list(range(len(labels)))})
    tenth = stratified_subset(data, 0.1, seed=0)
    indices = list(tenth["index"])
    assert len(tenth) == 6000
    assert np.bincount(list(tenth["label"])).tolist() == [600] * 10  # Fashion-MNIST has 6000 per class
    assert list(stratified_subset(data, 0.1, seed=0)["index"]) == indices  # the same images on every call
    assert indices == sorted(indices)  # in the dataset's order
    other = list(stratified_subset(data, 0.1, seed=1)["index"])
    assert len(set(other) & set(indices)) < 1200  # another seed, another draw (~600 shared by chance)
    assert set(indices) < set(stratified_subset(data, 0.2, seed=0)["index"])  # nested shares
    assert stratified_subset(data, 1.0, seed=0) is data
    with pytest.raises(ValueError, match="fraction=0 invalid"):
        stratified_subset(data, 0, seed=0)


def test_runner_report_skip_resume_and_refusal(tmp_path, shared_data, capsys):
    config_path = smoke_config(tmp_path, shared_data)
    numbers = trap.main(["--config", str(config_path)])

    report = tmp_path / "results" / "trap.md"
    text = report.read_text()
    assert [m["name"] for m in numbers["models"]] == ["ghostnet", "parameternet"]
    # limit 200: the 10% share is round(10%) of each class of the first 200 images (at least one each)
    labels = read_idx(str(shared_data / "images/fashion-mnist/train-labels-idx1-ubyte.gz"))[:200]
    tenth = sum(max(1, round(0.1 * n)) for n in np.bincount(labels))
    for m in numbers["models"]:
        assert f"| {m['name']} | " in text
        assert [m["cells"][s]["n"] for s in ("0.1", "1.0")] == [2, 2]
        assert m["cells"]["0.1"]["train_samples"] == tenth and m["cells"]["1.0"]["train_samples"] == 200
        assert m["cells"]["1.0"]["steps"] == 2
    assert numbers["models"][0]["params"] == 315_706 and numbers["models"][1]["params"] == 478_886
    assert (report.with_suffix(".png")).stat().st_size > 10_000
    summary = json.loads(report.with_suffix(".json").read_text())
    assert len(summary["runs"]) == 8 and summary["subsets"]["0.1"]["images"] == tenth
    assert "fixed step budget: every run takes max_steps=2 steps" in text
    assert "trap.png" in text and trap.HANDWRITTEN_BEGIN in text
    sessions = json.loads((tmp_path / "runs" / trap.SESSIONS_FILE).read_text())
    assert len(sessions) == 1 and len(sessions[0]["runs"]) == 8 and sessions[0]["load_1min"]["samples"] >= 2

    # A hand-written reading survives a rewrite; a re-run trains nothing and keeps every result.
    report.write_text(text.replace("(to be written from the numbers above)", "MY READING"))
    run_dir = tmp_path / "runs" / "parameternet-10pct-seed1"
    before = (run_dir / "results.json").read_text()
    capsys.readouterr()
    trap.main(["--config", str(config_path)])
    assert "8 runs: 8 finished earlier (skipped), 0 to continue, 0 to start" in capsys.readouterr().out
    assert (run_dir / "results.json").read_text() == before
    assert "MY READING" in report.read_text()
    assert len(json.loads((tmp_path / "runs" / trap.SESSIONS_FILE).read_text())) == 1  # nothing ran

    # Killed after its checkpoint at step 1: only that run continues, and ends where the uninterrupted one did.
    (run_dir / "results.json").unlink()
    shutil.rmtree(run_dir / "checkpoint-2")
    trap.main(["--config", str(config_path)])
    out = capsys.readouterr().out
    assert "8 runs: 7 finished earlier (skipped), 1 to continue, 0 to start" in out
    assert json.loads((run_dir / "results.json").read_text())["test_accuracy"] == pytest.approx(
        json.loads(before)["test_accuracy"])

    # Other settings for finished runs: refused before anything runs, naming the setting.
    with pytest.raises(ConfigError, match=r"lr: 0.004 there, 0.01 now"):
        trap.main(["--config", str(config_path), "train_overrides.lr=0.01"])
    with pytest.raises(ConfigError, match=r"max_steps: 2 there, 3 now"):  # the step budget counts too
        trap.main(["--config", str(config_path), "train_overrides.max_steps=3"])


@pytest.mark.parametrize("override,message", [
    ("train_overrides.seed=3", "train_overrides must not set 'seed'"),
    ("train_overrides.data.train_subset.fraction=0.5", "must not set 'data.train_subset.fraction'"),
    ("baseline=resnet", "baseline 'resnet' is not a model"),
    ("data_fractions=[0.1,0.1]", r"data_fractions must be unique; repeated: \[0.1\]"),
    ("data_fractions=[0.1,1.5]", "data_fractions.1=1.5: Input should be less than or equal to 1"),
    ("train_overrides.max_stepz=5", r"unknown key\(s\) \['max_stepz'\]"),
    ("workerz=2", r"unknown key\(s\) \['workerz'\]"),
])
def test_config_errors_before_anything_runs(tmp_path, shared_data, override, message):
    with pytest.raises(ConfigError, match=message):
        config = trap.load_trap_config(smoke_config(tmp_path, shared_data), [override])
        config.runs()  # every run's training config is validated up front
    assert not (tmp_path / "runs").exists()
