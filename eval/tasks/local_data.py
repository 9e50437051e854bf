"""Dataset loader for the offline task YAMLs in this folder (lm-eval `custom_dataset` hook).

lm-eval resolves relative `data_files` against the working directory, so a YAML cannot name the bundled
files portably. The YAMLs list their files relative to a data folder, and this loader makes them absolute
before calling the same `datasets.load_dataset("json", ...)` that lm-eval itself would call. The folder is
the task metadata key `pnet_data_dir` (`lm-eval run --metadata '{"pnet_data_dir": "/path"}'`, or
`pnet-eval --data-dir`) and defaults to the data bundled with the package (`eval/data`).
"""

from __future__ import annotations

from pathlib import Path

import datasets

# The upstream HellaSwag preprocessing, imported rather than copied so the prompts cannot drift.
from lm_eval.tasks.hellaswag.utils import process_docs as hellaswag_process_docs  # noqa: F401

BUNDLED_DATA_DIR = Path(__file__).resolve().parent.parent / "data"


def resolve_data_files(data_files: dict[str, str], data_dir: str | Path | None = None) -> dict[str, str]:
    """Map `{split: relative file}` to absolute paths under `data_dir`; raise naming what is missing."""
    root = Path(data_dir).expanduser().resolve() if data_dir else BUNDLED_DATA_DIR
    if not root.is_dir():
        raise FileNotFoundError(f"eval data dir {str(root)!r} does not exist")
    resolved, missing = {}, []
    for split, rel in data_files.items():
        candidates = (
            [root / rel, root / rel.removesuffix(".gz")] if rel.endswith(".gz") else [root / rel, root / f"{rel}.gz"]
        )
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            missing.append(f"{rel} (split {split!r})")
        else:
            resolved[split] = str(found)
    if missing:
        present = sorted(str(p.relative_to(root)) for p in root.rglob("*.jsonl*"))
        raise FileNotFoundError(
            f"eval data dir {str(root)!r} lacks {', '.join(missing)} (.jsonl or .jsonl.gz); "
            f"it holds: {present or 'no .jsonl files'}"
        )
    return resolved


def load_local_dataset(
    data_files: dict[str, str], pnet_data_dir: str | None = None, **_metadata
) -> datasets.DatasetDict:
    """`custom_dataset` for the *_local tasks: JSON Lines with the upstream HF dataset's columns."""
    return datasets.load_dataset("json", data_files=resolve_data_files(data_files, pnet_data_dir))
