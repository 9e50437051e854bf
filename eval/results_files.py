"""Reading the JSON files that `pnet-report` and `pnet-card` publish from (results, records, configs).

A damaged file (not JSON, not an object, NaN or Infinity, a score out of range or of the wrong type) is refused with
an error naming the file and the field: never shown as "no results", as `nan`, or as an accuracy of 5700%.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def read_json_object(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`; raises ValueError naming the file when it is not one, or holds NaN or Infinity
    (which Python's json accepts and no result can be)."""

    def refuse_constant(name: str):
        raise ValueError(f"{name} is not a finite number")

    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=refuse_constant)
    except ValueError as error:  # JSONDecodeError, a non-finite constant, UnicodeDecodeError
        raise ValueError(f"{str(path)!r} is not a valid JSON file ({error}); write it again (run what made it)") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} holds a JSON {type(value).__name__}, not an object; write it again")
    return value


def check_number(
    path: str | Path, field: str, value: Any, low: float, high: float = math.inf, required: bool = False
) -> None:
    """Refuse `value` (the `field` of the file `path`) unless it is a number in [low, high]; None passes unless
    `required`."""
    if value is None and not required:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(
            f"{str(path)!r}: {field} is {value!r}; allowed: a number in [{low}, {high}]. The file is damaged: "
            "write it again (run what made it)"
        )


def check_object(path: str | Path, field: str, value: Any) -> dict[str, Any]:
    """`value` (the `field` of the file `path`) when it is a JSON object; raises naming both otherwise."""
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r}: {field} is {type(value).__name__} {value!r:.40}, not a JSON object")
    return value


__all__ = ["check_number", "check_object", "read_json_object"]
