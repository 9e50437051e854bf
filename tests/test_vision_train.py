"""scripts/train_vision.py end to end on a slice of Fashion-MNIST: logs, checkpoints, export, exact resume; its
config is the shared typed one (same keys as pretraining, typos and bad ranges rejected before anything runs)."""

import gzip
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from pnet import run_log as L
from pnet import vision_train
from pnet.checkpoint import ResumeError
from pnet.config import ConfigError


@pytest.fixture
def recipe_args(repo_root, shared_data, tmp_path):
    def make(output_dir, *extra):
        return [
            "--config", str(repo_root / "configs/vision/train-fmnist-cpu.yaml"),
            f"model={repo_root / 'configs/vision/fmnist-parameternet.json'}",
            f"data.path={shared_data / 'images' / 'fashion-mnist'}",
            f"output_dir={output_dir}",
            "data.limit=96", "micro_batch_size=16", "eval_batch_size=48", "max_steps=6", "warmup_steps=2",
            "log_every=2", "eval_every=4", "save_every=3", "train_eval_samples=32", "cpu_threads=1",
            *extra,
        ]

    return make


@pytest.fixture
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)  # the recipe sets 1 thread; leave the session as it was


def test_train_log_checkpoint_export_and_exact_resume(repo_root, recipe_args, tmp_path, restore_threads):
    run = tmp_path / "run"
    results = vision_train.main(recipe_args(run))

    assert results["steps"] == 6 and results["num_experts"] == 4 and 0.0 <= results["test_accuracy"] <= 1.0
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert any("eval_accuracy_ema" in r and r["step"] == 4 for r in records)
    assert (run / "training.png").stat().st_size > 1000
    assert json.loads((run / "results.json").read_text())["flops"] == results["flops"]
    assert sorted(p for p in os.listdir(run) if p.startswith("checkpoint")) == ["checkpoint-3", "checkpoint-6"]  # no .tmp
    final = run / "final"
    assert {"model.safetensors", "config.json", "preprocessor_config.json", "modeling_parameternet.py"} <= set(os.listdir(final))
    umask = os.umask(0)
    os.umask(umask)
    # readable as the config beside it (safetensors writes 0600): a model published for a team or a service account
    assert {oct((final / name).stat().st_mode & 0o777) for name in os.listdir(final)} == {oct(0o666 & ~umask)}
    uninterrupted = load_file(run / "checkpoint-6" / "model.safetensors")

    # Kill after step 3: drop the later checkpoint and the export, then resume.
    shutil.rmtree(run / "checkpoint-6")
    shutil.rmtree(final)
    resumed_results = vision_train.main(recipe_args(run) + ["--resume"])
    assert resumed_results["steps"] == 6
    resumed = load_file(run / "checkpoint-6" / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for key in uninterrupted:
        torch.testing.assert_close(resumed[key], uninterrupted[key], rtol=1e-5, atol=1e-6, msg=key)
    assert resumed_results["test_accuracy"] == pytest.approx(results["test_accuracy"])
    # The log keeps one record per step: the resumed run replaced what the killed one wrote after step 3.
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    # Killed after the last checkpoint, before the export: --resume trains nothing, evaluates and exports.
    shutil.rmtree(final)
    (run / "results.json").unlink()
    finished = vision_train.main(recipe_args(run) + ["--resume"])
    assert finished["test_accuracy"] == resumed_results["test_accuracy"] and (final / "model.safetensors").is_file()
    # Resuming with another learning rate is refused, naming it (the shared pnet.checkpoint resume check).
    with pytest.raises(ResumeError, match="lr: 0.004 in the checkpoint, 0.01 now"):
        vision_train.main(recipe_args(run) + ["lr=0.01", "--resume"])


def test_evaluation_cadence_does_not_change_training(recipe_args, tmp_path, restore_threads):
    """eval_every may change on resume: it must not move the losses. Before, every evaluation loader drew its seed
    from the global RNG that dropout uses, and the losses parted from the first evaluation on."""

    def losses(run, *extra):
        vision_train.main(recipe_args(run, "log_every=1", "save_every=0", *extra))
        return [(r["step"], r["loss"]) for r in map(json.loads, (run / "log.jsonl").read_text().splitlines())
                if "loss" in r]

    rarely, often = losses(tmp_path / "rarely", "eval_every=6"), losses(tmp_path / "often", "eval_every=1")
    assert [step for step, _ in often] == [1, 2, 3, 4, 5, 6]
    assert often == rarely


def test_a_checkpoint_missing_a_file_is_damaged_not_resumed_inexactly(recipe_args, tmp_path, restore_threads):
    """Before, a checkpoint without its RNG states resumed without a word, and every loss after it differed; a
    missing optimizer file failed after the model was built, naming pytorch_model.bin."""
    run = tmp_path / "run"
    vision_train.main(recipe_args(run, "ema_decay=0"))
    shutil.rmtree(run / "final")

    def append_bytes(path):
        with open(path, "ab") as file:
            file.write(b"\0" * 16)

    for damage, name, message in (
        (os.remove, "random_states_0.pkl", "missing \\(manifest.json lists it\\)"),
        (append_bytes, "optimizer.bin", "\\d+ bytes where manifest.json says \\d+"),
    ):
        copy = shutil.copytree(run, tmp_path / f"copy-{name}")
        damage(copy / "checkpoint-6" / name)
        with pytest.raises(ResumeError, match=f"the latest checkpoint {copy / 'checkpoint-6'} is damaged: {name}: "
                                              f"{message}.*previous intact checkpoint is {copy / 'checkpoint-3'}"):
            vision_train.main(recipe_args(copy) + ["ema_decay=0", "--resume"])


def test_a_changed_data_file_or_an_ema_switched_off_is_refused_on_resume(recipe_args, shared_data, tmp_path,
                                                                       restore_threads):
    """Before: a label file rewritten under a run resumed without a word (only pretraining hashed its files), and
    --allow-change ema_decay to 0 was accepted, then crashed inside accelerate's load_state."""
    data = shutil.copytree(shared_data / "images" / "fashion-mnist", tmp_path / "fmnist")
    run = tmp_path / "run"
    vision_train.main(recipe_args(run, f"data.path={data}"))
    shutil.rmtree(run / "final")
    with pytest.raises(ResumeError, match="--allow-change ema_decay: 0.998 in the checkpoint, 0.0 now; a checkpoint "
                                          "with an EMA of the weights cannot resume without one"):
        vision_train.main(recipe_args(run, f"data.path={data}", "ema_decay=0", "--resume", "--allow-change",
                                      "ema_decay"))
    labels = data / "train-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(labels.read_bytes()))
    raw[8:] = bytes((label + 1) % 10 for label in raw[8:])  # every label shifted by one
    labels.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(ResumeError, match=f"(?s)data_files.{labels}: '[0-9a-f]{{64}}' in the checkpoint"):
        vision_train.main(recipe_args(run, f"data.path={data}", "--resume"))


def test_a_longer_run_on_resume_is_recorded(recipe_args, tmp_path, restore_threads):
    """max_steps may grow on resume; the schedule then spans the new length (its lr rises again), so the resume
    event says so (before: "changes": {})."""
    run = tmp_path / "run"
    vision_train.main(recipe_args(run))
    vision_train.main(recipe_args(run, "max_steps=8", "--resume"))
    [event] = L.event_records(L.read_log(run / L.LOG_FILE), L.EVENT_RESUME)
    assert event[L.CHANGES] == {"max_steps": [6, 8]}


@pytest.mark.parametrize("override,message", [
    ("ema_decy=0.9", r"unknown key\(s\) \['ema_decy'\] \('ema_decy' -> did you mean 'ema_decay'\?\)"),
    ("learning_rate=0.1", r"unknown key\(s\) \['learning_rate'\]"),
    ("augment.horizontal_flip=1.5", r"augment: horizontal_flip=1.5 is a probability: allowed \[0, 1\]"),
    ("image_processor.do_resizee=true", r"image_processor: unknown key\(s\) \['do_resizee'\]"),
    ("model_overrides.num_expert=2", r"model_overrides: unknown key\(s\) \['num_expert'\]"),
    ("micro_batch_size=0", "micro_batch_size=0: Input should be greater than 0"),
    ("epochs=3", "set exactly one of max_steps and epochs"),
    # processor settings the model cannot take (each used to fail at the first step, or to train on nan)
    ("model_overrides.num_channels=3", "do_convert_grayscale=True gives 1-channel images, the model takes "
                                       "num_channels=3; allowed: do_convert_grayscale=False"),
    ("image_processor.image_mean=[0.1,0.2,0.3]", r"image_mean=\[0.1, 0.2, 0.3\]: 3 values for 1-channel images"),
    ("image_processor.image_std=[0]", r"image_std=\[0\]; allowed: values > 0"),
    ("image_processor.size={height: 0, width: 0}", r"size \[0, 0\] makes images the model cannot take; allowed: "
                                                   r"sides >= 16"),
    ("image_processor.do_normalize=notabool", "image_processor.do_normalize='notabool'; allowed: true or false"),
    ("model_overrides.id2label={0: a}", r"model_overrides: \['id2label'\] come from the dataset"),  # was ignored
])
def test_bad_settings_fail_before_any_data_is_read(override, message, recipe_args, tmp_path):
    with pytest.raises(ConfigError, match=message):
        vision_train.main(recipe_args(tmp_path / "never") + [override])
    assert not (tmp_path / "never").exists()


def test_a_rule_across_keys_names_the_command_line_overrides(repo_root, tmp_path):
    """warmup_steps (the file's 50) against max_steps=4 (the command line's): the error used to name the file alone."""
    recipe = repo_root / "configs/vision/train-fmnist-cpu.yaml"
    with pytest.raises(ConfigError, match=f"^{recipe} with the command-line overrides of \\['max_steps', 'output_dir'\\]: "
                                          "warmup_steps=50 must be < max_steps=4"):
        vision_train.main(["--config", str(recipe), "max_steps=4", f"output_dir={tmp_path / 'never'}"])


def fashion_imagefolder(shared_data, folder, per_class=12, classes=("shirt", "bag")):
    """An imagefolder (train/ and validation/, a folder per class) of Fashion-MNIST PNGs."""
    from PIL import Image

    from pnet.vision_data import load_idx_dataset

    images = load_idx_dataset(str(shared_data / "images" / "fashion-mnist"), limit=4 * per_class)["train"]["image"]
    for split, start in (("train", 0), ("validation", 2 * per_class)):
        for c, name in enumerate(classes):
            (folder / split / name).mkdir(parents=True)
            for i in range(per_class // 2 if split == "validation" else per_class):
                image = images[start + c * per_class + i]
                assert isinstance(image, Image.Image)
                image.save(folder / split / name / f"{i}.png")
    return folder


def test_a_corrupt_image_is_named_before_training_or_left_out_and_counted(repo_root, shared_data, recipe_args,
                                                                          tmp_path, restore_threads, monkeypatch):
    """A corrupt image crashed training in epoch 2, and a short run that never reached it reported success."""
    from pnet import run_log as L
    from pnet.data import DataRecordError

    folder = fashion_imagefolder(shared_data, tmp_path / "images")
    corrupt = folder / "train" / "bag" / "broken.png"
    corrupt.write_bytes((folder / "train" / "bag" / "0.png").read_bytes()[:60])  # a PNG cut short
    args = [f"data.path={folder}", "data.eval_split=validation", "data.limit=null", "max_steps=2", "warmup_steps=1",
            "save_every=0", "eval_every=2", "train_eval_samples=8"]
    with monkeypatch.context() as patch:
        patch.setattr(vision_train.ImageClassificationTask, "build_model", lambda *a: pytest.fail("model built"))
        with pytest.raises(DataRecordError, match=f"\\(train\\): {corrupt}: not a readable image .*data.on_bad_record"
                                                  "=skip"):
            vision_train.main(recipe_args(tmp_path / "error") + args)
    vision_train.main(recipe_args(tmp_path / "skip") + args + ["data.on_bad_record=skip"])
    [check] = L.event_records(L.read_log(tmp_path / "skip" / L.LOG_FILE), L.EVENT_DATA_CHECK)
    assert check[L.BAD_RECORDS] == {str(folder): {"train": 1}}
    assert check[L.BAD_RECORD_EXAMPLES][0].startswith(f"{corrupt}: not a readable image")
