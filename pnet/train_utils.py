"""Helpers for ``scripts/pretrain.py``: the validated run config, atomic checkpoints, JSONL logs, plots.

The training loop itself stays in the script; this module only holds the pieces that are not the loop.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from pnet.data import DataConfig, dataclass_from_dict

PRECISIONS = ("auto", "fp32", "bf16")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")


@dataclass
class PretrainConfig:
    """Every hyper-parameter of a pretraining run (one YAML file; unknown keys are errors)."""

    model: str  # config.json-style model file (configs/models/*.json); its model_type picks dense or PNet
    output_dir: str
    data: DataConfig
    max_steps: int  # optimizer steps
    global_batch_tokens: int  # = micro_batch_size * seq_len * grad_accum * world_size (checked)
    micro_batch_size: int  # sequences per forward pass per process
    lr: float
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 0
    weight_decay: float = 0.1  # on >= 2-D weights only (not norms)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    max_grad_norm: float = 1.0
    precision: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100  # also evaluated after the last step
    save_every: int = 100  # checkpoint interval in steps (0: only at the end)
    keep_last: int = 2  # checkpoints kept
    tensorboard: bool = True
    model_overrides: dict[str, Any] = field(default_factory=dict)  # applied on top of the model file

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "PretrainConfig":
        values = dict(values)
        if "data" not in values:
            raise ValueError("config has no 'data' section")
        values["data"] = DataConfig.from_dict(values["data"])
        return dataclass_from_dict(cls, values, "config")

    def check(self) -> None:
        """Validate values and data files; raise naming the bad value and what is allowed."""
        if not os.path.isfile(self.model):
            raise FileNotFoundError(f"model config file {self.model!r} not found (relative to {os.getcwd()})")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r} not in {PRECISIONS}")
        for key in ("max_steps", "global_batch_tokens", "micro_batch_size", "log_every", "eval_every",
                    "keep_last"):
            if not (isinstance(getattr(self, key), int) and getattr(self, key) > 0):
                raise ValueError(f"{key} must be a positive integer, got {getattr(self, key)!r}")
        if not (isinstance(self.lr, (int, float)) and self.lr > 0):
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        if not 0 <= self.warmup_steps < self.max_steps:
            raise ValueError(f"warmup_steps must be in [0, max_steps={self.max_steps}), got {self.warmup_steps}")
        if self.save_every < 0:
            raise ValueError(f"save_every must be >= 0, got {self.save_every}")
        self.data.check()

    def grad_accum_steps(self, world_size: int) -> int:
        """Accumulation steps that reach ``global_batch_tokens``; error if the batch does not divide."""
        tokens_per_pass = self.micro_batch_size * self.data.seq_len * world_size
        if self.global_batch_tokens % tokens_per_pass:
            raise ValueError(
                f"global_batch_tokens={self.global_batch_tokens} is not a multiple of micro_batch_size "
                f"({self.micro_batch_size}) x seq_len ({self.data.seq_len}) x world_size ({world_size}) = "
                f"{tokens_per_pass}; allowed: k * {tokens_per_pass}")
        return self.global_batch_tokens // tokens_per_pass

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def set_dotted(values: dict[str, Any], dotted_key: str, value: Any) -> None:
    """``set_dotted(d, "data.sources.web.weight", 0.5)``; creates no new sections (typos stay errors later)."""
    *parents, last = dotted_key.split(".")
    node = values
    for i, key in enumerate(parents):
        if not isinstance(node.get(key), dict):
            raise ValueError(f"override {dotted_key!r}: {'.'.join(parents[:i + 1])!r} is not a section")
        node = node[key]
    node[last] = value


def read_yaml_with_overrides(
    path: str | os.PathLike, overrides: list[str] = (), literal_sections: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Read a YAML mapping and apply ``key=value`` overrides (dotted keys, YAML values). Under a section named in
    ``literal_sections`` the rest of the key is taken whole (that section's keys are themselves dotted keys)."""
    with open(path, encoding="utf-8") as f:
        values = yaml.safe_load(f)
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a YAML mapping at the top level")
    for override in overrides:
        if "=" not in override:
            raise ValueError(f"override {override!r} must look like key=value (dotted keys allowed)")
        key, raw = override.split("=", 1)
        section, _, rest = key.partition(".")
        if section in literal_sections and rest:
            values.setdefault(section, {})[rest] = yaml.safe_load(raw)
        else:
            set_dotted(values, key, yaml.safe_load(raw))
    return values


def load_config(path: str | os.PathLike, overrides: list[str] = ()) -> PretrainConfig:
    """Read a YAML run config, apply ``key=value`` overrides (dotted keys, YAML values) and validate."""
    config = PretrainConfig.from_dict(read_yaml_with_overrides(path, overrides))
    config.check()
    return config


# ----------------------------------------------------------------------------------------------- checkpoints

def list_checkpoints(output_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """Finished checkpoints ``checkpoint-N`` sorted by step (``.tmp`` folders of interrupted saves ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted(found)


def checkpoint_tmp_dir(output_dir: str | os.PathLike, step: int) -> Path:
    return Path(output_dir) / f"checkpoint-{step}.tmp"


def publish_dir(tmp: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Replace folder ``final`` by ``tmp``, a finished folder written beside it, with one rename: readers find the
    previous folder or the complete new one, never a half-written one."""
    final = Path(final)
    if final.exists():  # e.g. a fresh run over an old output_dir; os.replace cannot overwrite a folder
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def finish_checkpoint(output_dir: str | os.PathLike, step: int, keep_last: int) -> Path:
    """Publish ``checkpoint-N.tmp`` as ``checkpoint-N`` with one atomic rename, then prune old checkpoints.

    Called by the main process once every rank has written its part into the ``.tmp`` folder: a kill before
    the rename leaves only a ``.tmp`` folder, which resume ignores, so the previous checkpoint stays the latest.
    """
    final = publish_dir(checkpoint_tmp_dir(output_dir, step), Path(output_dir) / f"checkpoint-{step}")
    for _, old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    """Write to ``path.tmp`` and rename, so a reader never sees a half-written file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(value, f)
    os.replace(tmp, path)


def write_yaml_atomic(path: str | os.PathLike, value: Any) -> None:
    """YAML twin of `write_json_atomic` (for configs a person reads)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        yaml.safe_dump(value, f, sort_keys=False)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------- logs

class JsonlLog:
    """Append-only JSONL training log; on resume, records after the resumed step are dropped first."""

    def __init__(self, path: str | os.PathLike, resume_step: int | None = None) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def expert_token_counts(router_logits: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(num_routers, num_experts) count of tokens whose top-1 choice is each expert."""
    return torch.stack([torch.bincount(logits.argmax(dim=-1), minlength=logits.shape[-1])
                        for logits in router_logits]).float()


def plot_training(log_path: str | os.PathLike, png_path: str | os.PathLike) -> None:
    """PNG with training/validation loss curves and, for routed models, the final expert-load heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_jsonl(log_path)
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    loads = [r for r in records if "expert_load" in r]
    panels = 2 if loads else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    steps = [r["step"] for r in train]
    ax.plot(steps, [r["loss"] for r in train], label="train loss (total)", lw=1)
    if train and "lm_loss" in train[0]:
        ax.plot(steps, [r["lm_loss"] for r in train], label="train LM loss", lw=1)
    for domain in (evals[0]["val_loss"] if evals else {}):
        ax.plot([r["step"] for r in evals], [r["val_loss"][domain] for r in evals], "o-", ms=3,
                label=f"val LM loss: {domain}")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if loads:
        last = loads[-1]
        matrix = torch.tensor(last["expert_load"]).numpy()
        ax = axes[0][1]
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0)
        ax.set_yticks(range(len(last["router_names"])), last["router_names"], fontsize=7)
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_xlabel("expert")
        ax.set_title(f"Expert load (fraction of tokens), steps {last['load_window']} (uniform = "
                     f"{1 / matrix.shape[1]:.3f})", fontsize=9)
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
