"""Checkpoints and resume, shared by every training command.

A checkpoint ``<output_dir>/checkpoint-N`` holds ``accelerator.save_state`` (model, optimizer, scheduler, RNG
states), ``trainer_state.json`` (step, tokens, settings changed on earlier resumes), ``run_settings.json`` (the
settings that fix the run's math and data, compared on resume) and whatever per-rank files the trainer adds (the
data position). It is written to ``checkpoint-N.tmp`` and published with one rename, and only once the weights it
holds are known to be good: `CheckpointSaver` publishes a checkpoint after the next step's loss and gradient norm
(computed from exactly those weights and data, as a resumed run would) came out finite, so a checkpoint that exists
always resumes and trains. ``--resume`` refuses settings that differ from the checkpoint's unless each is named in
``--allow-change``; `resume_changes` lists them.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import re
import shutil
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import yaml

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE_FILE = "trainer_state.json"
RUN_SETTINGS_FILE = "run_settings.json"
# Every file of a checkpoint with its size, written last: a file missing on resume (a copy that left out the RNG
# states, say) would otherwise be skipped by accelerate, or fail with another file's name, and the resume not be exact.
MANIFEST_FILE = "manifest.json"
WORLD_SIZE = "world_size"  # the pseudo-setting for the number of processes in run_settings.json
DATA_FILES = "data_files"  # the pseudo-setting {local data file: content hash} in run_settings.json
# Model config entries that say how a config was saved or loaded, not what the model computes.
VOLATILE_MODEL_KEYS = ("transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype", "auto_map")


def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Published checkpoints ``checkpoint-N`` sorted by step (``.tmp`` folders of unfinished saves ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted(found)


def checkpoint_tmp_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}.tmp"


# In a folder that a command writes beside its final name (`OUT_DIR.tmp`): the mark that an interrupted run left it,
# so a new run may delete it. Any other `OUT_DIR.tmp` may hold the user's files (or the command's input).
PARTIAL_MARKER = ".pnet-partial"


def check_new_folder(out_dir: Path, overwrite: bool) -> None:
    """Before any work, for a command that writes ``out_dir`` whole (as ``OUT_DIR.tmp``, then renamed): it is a folder
    or absent, empty unless ``overwrite``, and an existing ``OUT_DIR.tmp`` was left by an interrupted pnet run."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} is a file; allowed: a folder to write (absent, empty, or any with --overwrite)")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} exists and is not empty; pass --overwrite to replace it")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists() and not (tmp / PARTIAL_MARKER).is_file():
        raise FileExistsError(f"{tmp} exists and was not left by an interrupted pnet run: {out_dir.name} is written "
                              "there before it is renamed, which would delete it; move it away")


def new_partial_dir(out_dir: Path) -> Path:
    """``OUT_DIR.tmp``, empty and marked (`PARTIAL_MARKER`): the one left by an interrupted run is replaced, any
    other refused (`check_new_folder`)."""
    check_new_folder(out_dir, overwrite=True)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # left by an interrupted run
    tmp.mkdir(parents=True)
    (tmp / PARTIAL_MARKER).touch()
    return tmp


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Replace folder ``final`` by ``tmp``, a finished folder written beside it, with one rename: readers find the
    previous folder or the complete new one, never a half-written one."""
    (Path(tmp) / PARTIAL_MARKER).unlink(missing_ok=True)
    # safetensors writes its files owner-only (0600): give every file the mode the user's umask gives new files, so
    # that a model published for a team or a service account can be read like the config beside it.
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(tmp).rglob("*"):
        if path.is_file():
            path.chmod(0o666 & ~umask)
    final = Path(final)
    if final.exists():  # e.g. a fresh run over an old output_dir; os.replace cannot overwrite a folder
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def write_json_atomic(path: str | os.PathLike, value: Any, **dump_options) -> None:
    """Write to ``path.tmp`` and rename, so a reader never sees a half-written file (``dump_options``: `json.dump`'s,
    e.g. ``default=``)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f, **{"indent": 1, **dump_options})
    os.replace(tmp, path)


def write_yaml_atomic(path: str | os.PathLike, value: Any, header: str = "") -> None:
    """YAML twin of `write_json_atomic` (for configs a person reads); ``header`` lines are written as comments."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("".join(f"# {line}\n" for line in header.splitlines()))
        yaml.safe_dump(value, f, sort_keys=False)
    os.replace(tmp, path)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class CheckpointSaver:
    """Saves ``checkpoint-N.tmp`` and publishes it only once its weights are known to give a finite training step.

    ``save(step)`` writes the checkpoint beside its final name and keeps it pending. The trainer calls
    ``publish()`` when the loss and gradient norm of the next step, which are computed from exactly the saved weights
    and the saved data position, are finite (after the last step: when the final validation loss is finite), and
    ``discard()`` when they are not: a diverged update never becomes a checkpoint, and the checkpoint the error names
    resumes and trains.
    """

    def __init__(self, accelerator, output_dir: str | os.PathLike, keep_last: int) -> None:
        self.accelerator = accelerator
        self.output_dir = Path(output_dir)
        self.keep_last = keep_last
        self.pending: int | None = None

    def save(self, step: int, trainer_state: dict[str, Any], run_settings: dict[str, Any],
             rank_files: dict[str, Any]) -> None:
        """Write ``checkpoint-<step>.tmp``: save_state, the two JSON files (main process) and ``rank_files``
        ({file name: JSON value}) of this process. Every process must call it."""
        accelerator = self.accelerator
        tmp = checkpoint_tmp_dir(self.output_dir, step)
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)  # left by a save that was killed
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        for name, value in rank_files.items():
            write_json_atomic(tmp / name, value)
        if accelerator.is_main_process:
            write_json_atomic(tmp / TRAINER_STATE_FILE, trainer_state)
            write_json_atomic(tmp / RUN_SETTINGS_FILE, run_settings)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            write_json_atomic(tmp / MANIFEST_FILE, {str(path.relative_to(tmp)): path.stat().st_size
                                                    for path in sorted(tmp.rglob("*")) if path.is_file()})
        accelerator.wait_for_everyone()
        self.pending = step

    def publish(self) -> Path | None:
        """Publish the pending checkpoint (one rename), then prune to ``keep_last``. Every process calls it."""
        if self.pending is None:
            return None
        step, self.pending = self.pending, None
        final = self.output_dir / f"checkpoint-{step}"
        if self.accelerator.is_main_process:
            publish_dir(checkpoint_tmp_dir(self.output_dir, step), final)
            for _, old in list_checkpoints(self.output_dir)[:-self.keep_last]:
                shutil.rmtree(old)
        self.accelerator.wait_for_everyone()
        return final

    def discard(self) -> None:
        """Delete the pending checkpoint: its weights gave a non-finite loss."""
        if self.pending is not None and self.accelerator.is_main_process:
            shutil.rmtree(checkpoint_tmp_dir(self.output_dir, self.pending), ignore_errors=True)
        self.pending = None

    def last_published(self) -> Path | None:
        found = list_checkpoints(self.output_dir)
        return found[-1][1] if found else None


# ------------------------------------------------------------------------------------------------------ resume

def file_damage(path: Path) -> str | None:
    """Why ``path``, a checkpoint file, cannot be read, from its structure alone (no tensor is loaded): a truncated or
    garbled safetensors file (its header must parse and its data end where the file ends), torch zip file (its
    central directory, at the end, must parse) or JSON file; None when it looks whole."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if path.suffix == ".safetensors":
            if len(head) < 8:
                return f"{size} bytes, shorter than a safetensors header"
            header_size = struct.unpack("<Q", head)[0]
            if header_size > size - 8:
                return f"{size} bytes, cut inside its {header_size}-byte header"
            try:
                header = json.loads(f.read(header_size))
                end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                return "its safetensors header does not parse"
            if 8 + header_size + end != size:
                return f"{size} bytes where its header describes {8 + header_size + end}"
            return None
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path):
                return None
        except zipfile.BadZipFile as error:
            return f"a damaged torch file ({error})"
    if path.suffix == ".json":
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            return f"not JSON ({error})"
    return "empty" if size == 0 else None


def checkpoint_damage(checkpoint: Path) -> list[str]:
    """``file: reason`` for every damaged file of a checkpoint (a disk that filled up, a copy cut short), and for
    every file its manifest lists that is missing or has another size (checkpoints written before the manifest are
    checked by their files alone)."""
    damage = [f"{path.relative_to(checkpoint)}: {reason}" for path in sorted(checkpoint.rglob("*"))
              if path.is_file() and (reason := file_damage(path))]
    manifest = checkpoint / MANIFEST_FILE
    if damage or not manifest.is_file():
        return damage
    for name, size in read_json(manifest).items():
        path = checkpoint / name
        if not path.is_file():
            damage.append(f"{name}: missing ({MANIFEST_FILE} lists it)")
        elif path.stat().st_size != size:
            damage.append(f"{name}: {path.stat().st_size} bytes where {MANIFEST_FILE} says {size}")
    return damage


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"data": {"seq_len": 8}} -> {"data.seq_len": 8}; lists stay values, empty mappings vanish."""
    flat = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def setting_differences(saved: dict[str, Any], now: dict[str, Any], free: Iterable[str] = ()) -> dict[str, list[Any]]:
    """``{dotted key: [saved, now]}`` of the settings that differ (nested dicts compared flattened), apart from the
    keys in ``free`` and those below them."""
    old, new = flatten(saved), flatten(now)
    return {key: [old.get(key), new.get(key)] for key in sorted(set(old) | set(new))
            if old.get(key) != new.get(key) and not any(key == f or key.startswith(f"{f}.") for f in free)}


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def run_settings(config: dict[str, Any], free_on_resume: Iterable[str], model_config: dict[str, Any],
                 world_size: int, data_files: Iterable[str] = ()) -> dict[str, Any]:
    """What fixes a run's math and data, saved in each checkpoint and compared by ``--resume``: the config without
    the keys that are free on resume, the resolved model config (without how it was saved), the number of
    processes and the content hash of each local data file (a file changed under a run is reported on resume)."""
    values = json.loads(json.dumps(config))
    for key in free_on_resume:
        *parents, last = key.split(".")
        node = values
        for parent in parents:
            node = node.get(parent, {})
        node.pop(last, None)
    values["model_config"] = {k: v for k, v in model_config.items() if k not in VOLATILE_MODEL_KEYS}
    values[WORLD_SIZE] = world_size
    if data_files:
        values[DATA_FILES] = {path: file_sha256(path) for path in data_files}
    return values


def change_history_header(history: list[dict[str, Any]]) -> str:
    """Comment lines for the saved config: the settings changed with --allow-change, when, from what."""
    lines = [f"--resume at step {c['step']} with --allow-change {c['setting']}: {c['checkpoint']!r} -> {c['now']!r}"
             for c in history]
    return ("Settings changed during this run (the values below are the current ones):\n" + "\n".join(lines)
            if lines else "")


class ResumeError(ValueError):
    """Resuming with these settings would silently change the run; the message lists what differs."""


def resume_changes(saved: dict[str, Any], current: dict[str, Any], allowed: Iterable[str],
                   checkpoint: str | os.PathLike, fixed: Iterable[str] = ()) -> dict[str, list[Any]]:
    """The settings that differ between a checkpoint and the current run, ``{key: [saved, current]}``.

    ``saved``/``current`` are run settings (nested dicts, compared flattened to dotted keys). A difference is
    accepted when its key, or a dotted prefix of it (``data`` covers ``data.seq_len``), is in ``allowed``;
    otherwise `ResumeError` lists every difference and the flag that would accept it. Keys in ``fixed`` can never
    change (the error says so even when they are allowed).
    """
    old, new = flatten(saved), flatten(current)
    allowed = list(allowed)
    names = {".".join(key.split(".")[:n]) for key in {*old, *new} for n in range(1, key.count(".") + 2)}
    for key in allowed:  # a misspelt --allow-change would allow nothing and hide the typo
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=3)
            raise ResumeError(f"--allow-change {key}: no such setting"
                              + (f" (did you mean {' or '.join(close)}?)" if close else "")
                              + "; it names a config key (dotted, e.g. lr or data.seq_len) or a section (data)")
    differences = {key: [old.get(key), new.get(key)] for key in sorted(set(old) | set(new))
                   if old.get(key) != new.get(key)}

    def is_allowed(key: str) -> bool:
        return any(key == a or key.startswith(f"{a}.") for a in allowed)

    fixed_changes = [key for key in differences if any(key == f or key.startswith(f"{f}.") for f in fixed)]
    refused = [key for key in differences if not is_allowed(key) or key in fixed_changes]
    if refused:
        lines = [f"  {key}: {differences[key][0]!r} in the checkpoint, {differences[key][1]!r} now" for key in refused]
        hint = ""
        flaggable = [key for key in refused if key not in fixed_changes]
        if flaggable:
            hint += ("\nTo resume anyway with the new values (recorded in the config and the log), pass "
                     + " ".join(f"--allow-change {key}" for key in flaggable) + ".")
        if any(key.startswith(f"{DATA_FILES}.") for key in refused):
            hint += (f"\nA {DATA_FILES} entry is a local data file whose content (sha256) changed since the checkpoint: "
                     "the saved data position may now point at other documents. --allow-change data_files accepts "
                     "every changed file.")
        if fixed_changes:
            hint += (f"\n{', '.join(fixed_changes)} cannot change on resume: each process's data position is saved "
                     "for its own rank. Resume with the same number of processes.")
        raise ResumeError(f"--resume from {checkpoint}: these settings differ from the checkpoint's:\n"
                          + "\n".join(lines) + hint)
    return differences


@dataclass
class ResumePoint:
    """Where a run starts: step 0 of a fresh run, or a checkpoint with the settings changed on resuming it."""

    step: int = 0
    checkpoint: Path | None = None
    tokens: int = 0  # training tokens before this point (pretraining)
    changes: dict[str, list[Any]] = field(default_factory=dict)  # {setting: [checkpoint's, now]} of this resume
    history: list[dict[str, Any]] = field(default_factory=list)  # every change of the run, earlier resumes first
    recent_losses: list[float] = field(default_factory=list)  # the loss-spike guard's history at the checkpoint


def find_resume_point(output_dir: str | os.PathLike, resume: bool, settings: dict[str, Any],
                      allow_changes: Iterable[str], max_steps: int | None) -> ResumePoint:
    """Decide, before anything is built, where the run starts.

    Without ``resume`` an output_dir that holds checkpoints is an error (nothing is overwritten). With it, the
    latest checkpoint's settings must equal ``settings`` apart from the keys in ``allow_changes`` (`resume_changes`;
    the number of processes never), and ``max_steps`` may grow but not fall below the checkpoint's step (a new
    ``max_steps`` is recorded among the changes: the schedule then spans the new length).
    """
    checkpoints = list_checkpoints(output_dir)
    if checkpoints and not resume:
        raise FileExistsError(f"{output_dir} already has {checkpoints[-1][1].name}; pass --resume to continue it "
                              "or choose another output_dir")
    if not resume:
        return ResumePoint()
    if not checkpoints:
        raise FileNotFoundError(f"--resume: no checkpoint-N folder in {output_dir}")
    step, checkpoint = checkpoints[-1]
    damage = checkpoint_damage(checkpoint)
    if damage:
        intact = next((c for _, c in reversed(checkpoints[:-1]) if not checkpoint_damage(c)), None)
        advice = (f"The previous intact checkpoint is {intact}: to resume from it, move the damaged one aside "
                  f"(mv {checkpoint} {checkpoint}.damaged) and run --resume again." if intact else
                  "No earlier checkpoint is intact: start the run again in a new output_dir.")
        raise ResumeError(f"--resume: the latest checkpoint {checkpoint} is damaged: " + "; ".join(damage[:5])
                          + f". {advice}")
    if max_steps is not None and max_steps < step:
        raise ResumeError(f"max_steps={max_steps} is below the step of {checkpoint} ({step}); max_steps may only "
                          f"grow on resume (allowed: >= {step})")
    if not (checkpoint / RUN_SETTINGS_FILE).is_file():
        raise ResumeError(f"{checkpoint} has no {RUN_SETTINGS_FILE} (written by an older version): its settings "
                          "cannot be compared with these")
    changes = resume_changes(read_json(checkpoint / RUN_SETTINGS_FILE), settings, allow_changes, checkpoint,
                             fixed=[WORLD_SIZE])
    state = read_json(checkpoint / TRAINER_STATE_FILE)
    history = state.get("config_changes", []) + [
        {"step": step, "setting": key, "checkpoint": old, "now": new} for key, (old, new) in changes.items()]
    if max_steps is not None and state.get("max_steps", max_steps) != max_steps:
        # free to grow, but not silently (the resume event): the schedule spans the new length, a cosine's lr rises
        changes["max_steps"] = [state["max_steps"], max_steps]
    return ResumePoint(step, checkpoint, state.get("tokens", 0), changes, history, state.get("recent_losses", []))
