"""SST-2 fine-tuning through the shared trainer (`pnet.training`): a checkpoint every epoch, an exact resume, the log
of the shared loop, and the refusal to overwrite or to continue with other settings."""

import gzip
import json
import shutil

import pytest
from safetensors.torch import load_file

from pnet import finetune
from pnet import run_log as L
from pnet.checkpoint import ResumeError, list_checkpoints


def test_checkpoint_every_epoch_and_exact_resume(tiny_pnet_dir, tmp_path):
    run = tmp_path / "ft"
    args = [str(tiny_pnet_dir), "data.data_dir=bundled", "data.max_train_samples=16", "data.max_eval_samples=16",
            "data.seq_len=32", "epochs=2", "micro_batch_size=8", "eval_batch_size=16", "lr=3e-3", "log_every=1",
            f"output_dir={run}", "save_model=true", "cpu_threads=1"]
    result = finetune.main(args)
    assert result["steps"] == 4 and result["finetune_examples"] == 16 and result["eval_examples"] == 16
    assert [step for step, _ in list_checkpoints(run)] == [2, 4]  # keep_last 2, one per epoch (2 steps each)
    records = L.read_log(run / L.LOG_FILE)
    assert [r[L.STEP] for r in L.train_records(records)] == [1, 2, 3, 4]
    assert [r[L.STEP] for r in L.eval_records(records)] == [2, 4]  # evaluated at the end of every epoch
    assert [r[L.EPOCH] for r in L.train_records(records)] == [0.5, 1.0, 1.5, 2.0]
    assert json.loads((run / "final" / "config.json").read_text())["id2label"] == {"0": "negative", "1": "positive"}
    uninterrupted = load_file(run / "checkpoint-4" / "model.safetensors")

    # Killed after epoch 1: the last checkpoint and the outputs are gone; --resume trains epoch 2 again, exactly.
    for folder in ("checkpoint-4", "final"):
        shutil.rmtree(run / folder)
    resumed = finetune.main(args + ["--resume"])
    again = load_file(run / "checkpoint-4" / "model.safetensors")
    assert again.keys() == uninterrupted.keys()
    assert all((again[key] == uninterrupted[key]).all() for key in again)
    assert resumed["accuracy"] == result["accuracy"]
    assert [r[L.STEP] for r in L.train_records(L.read_log(run / L.LOG_FILE))] == [1, 2, 3, 4]

    # Killed after the last checkpoint, before the export: --resume trains nothing, evaluates and exports.
    shutil.rmtree(run / "final")
    finished = finetune.main(args + ["--resume"])
    assert finished["accuracy"] == result["accuracy"] and (run / "final" / "model.safetensors").is_file()
    assert [r[L.STEP] for r in L.eval_records(L.read_log(run / L.LOG_FILE))] == [2, 4]

    with pytest.raises(FileExistsError, match="already has checkpoint-4; pass --resume"):
        finetune.main(args)
    with pytest.raises(ResumeError, match="lr: 0.003 in the checkpoint, 0.01 now"):
        finetune.main(args + ["lr=0.01", "--resume"])


def test_a_data_file_changed_under_a_run_is_reported_on_resume(tiny_pnet_dir, tmp_path, repo_root):
    """As pretraining: --resume compares the content hash of every local data file (before, SST-2 resumed on flipped
    labels without a word)."""
    data_dir = tmp_path / "data"
    shutil.copytree(repo_root / "eval" / "data" / "sst2", data_dir / "sst2")
    run = tmp_path / "ft"
    args = [str(tiny_pnet_dir), f"data.data_dir={data_dir}", "data.max_train_samples=8", "data.max_eval_samples=8",
            "data.seq_len=32", "epochs=1", "micro_batch_size=8", "eval_batch_size=8", f"output_dir={run}",
            "cpu_threads=1"]
    finetune.main(args)
    validation = data_dir / "sst2" / "validation.jsonl.gz"
    rows = [json.loads(line) for line in gzip.decompress(validation.read_bytes()).splitlines()]
    flipped = "".join(json.dumps({**row, "label": 1 - int(row["label"])}) + "\n" for row in rows)
    validation.write_bytes(gzip.compress(flipped.encode()))  # every label flipped
    with pytest.raises(ResumeError, match=f"(?s)data_files.{validation}: '[0-9a-f]{{64}}' in the checkpoint.*"
                                          "--allow-change data_files"):
        finetune.main(args + ["epochs=2", "--resume"])
