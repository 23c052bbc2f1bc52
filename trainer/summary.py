"""The run's JSON summary: one line the trainer prints last (in a pod's log and its termination
message) and `kubetrain run` reads from master-0 and prints once, as its own last line.

Both sides import this module (no torch), so the line's marker and its encoding have one owner.
"""

from __future__ import annotations

import json
import math
from typing import Any

MARKER = '{"event": "summary"'  # how a summary line starts: json.dumps keeps the first key first


def _plain(value: Any) -> Any:
    """`value` with every non-finite float as None: NaN and Infinity are not JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def to_json(summary: dict) -> str:
    """One line of strict JSON (allow_nan=False: a non-finite number that escaped _plain raises
    here rather than print `NaN`, which no JSON reader takes)."""
    return json.dumps(_plain(summary), allow_nan=False)


def locate(line: str) -> tuple[dict, int, int] | None:
    """(the summary, where it starts, where it ends) in a line of output, even with other text around
    it; None if absent or cut short."""
    start = line.find(MARKER)
    if start < 0:
        return None
    try:
        summary, length = json.JSONDecoder().raw_decode(line[start:])
    except json.JSONDecodeError:
        return None
    return (summary, start, start + length) if isinstance(summary, dict) else None


def find(line: str) -> dict | None:
    found = locate(line)
    return found[0] if found else None
