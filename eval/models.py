"""The models an evaluation scores and how lm-eval runs them, shared by zero-shot (`pnet_eval.zero_shot`) and
perplexity (`pnet_eval.perplexity`): model folder checks, whether a folder's own code may run (after its weights are
checked), device and dtype, lm-eval's model arguments, and lm-eval's `git describe` without git's stderr."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from pathlib import Path
from typing import Any

from pnet.config import hub_is_offline


def lm_eval_model_args(backend: str, **args: Any) -> dict[str, Any]:
    """lm-eval `model_args` for `backend`; the HF backend is told the model is causal, since it cannot tell from a
    model type transformers does not list (it warned "neither marked as CausalLM or Seq2SeqLM" on every run)."""
    return {**args, "backend": "causal"} if backend == "hf" else args


@contextlib.contextmanager
def quiet_git_describe():
    """lm-eval records `git describe` of the working directory in its results; outside a git checkout git prints
    "fatal: not a git repository" to our stderr. Same value (None there), git's own stderr sent to /dev/null."""
    import lm_eval.evaluator

    record_git_hash = lm_eval.evaluator.get_git_commit_hash

    def without_git_stderr():
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
                return record_git_hash()
        finally:
            os.dup2(saved, 2)
            os.close(saved)

    lm_eval.evaluator.get_git_commit_hash = without_git_stderr
    try:
        yield
    finally:
        lm_eval.evaluator.get_git_commit_hash = record_git_hash


def check_model(model: str) -> str:
    """A local folder with a config.json, or (online only) a Hub repo id."""
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            present = sorted(p.name for p in path.iterdir())
            raise FileNotFoundError(f"model folder {str(path)!r} has no config.json; it holds: {present}")
        return str(path.resolve())
    if not hub_is_offline() and re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return model
    raise FileNotFoundError(
        f"model folder {model!r} does not exist"
        + (" (the Hub is offline, so it cannot be a Hub id)" if hub_is_offline() else "")
    )


def checked_models(model_dirs: str | list[str]) -> list[str]:
    """The model folders (or Hub ids), each checked by `check_model`, in order and without repeats."""
    model_dirs = [model_dirs] if isinstance(model_dirs, str) else model_dirs
    return list(dict.fromkeys(check_model(m) for m in model_dirs))


def trust_after_weight_check(models: list[str], trust_remote_code: bool) -> dict[str, bool]:
    """Whether each model folder's own code may run (decided from config.json alone: PNet folders load with the
    installed classes), after checking that its weights are those of its class; all before any model loads."""
    from pnet.model_loading import check_checkpoint_weights, trust_remote_code_for

    trust = {model: trust_remote_code_for(model, trust_remote_code) for model in models}
    for model in models:
        check_checkpoint_weights(model, trust[model])
    return trust


DTYPES = ("float32", "bfloat16", "float16", "auto")  # `--dtype`: what lm-eval's model takes ("auto": the checkpoint's)


def default_dtype(device: str) -> str:
    """bf16 on GPUs; fp32 on CPU, where bf16 matmuls are far slower than fp32."""
    return "bfloat16" if device.startswith("cuda") else "float32"


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, str]:
    """The device (default: cuda if available) and dtype (default: `default_dtype` of that device); a device this
    torch cannot use is refused before any model loads."""
    import torch

    if device is not None:
        try:
            kind = torch.device(device).type
        except RuntimeError as error:
            raise ValueError(f"--device {device!r}: not a device ({str(error).splitlines()[0]})") from None
        if kind == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"--device {device!r}: this torch sees no CUDA device; allowed here: cpu")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or default_dtype(device)
