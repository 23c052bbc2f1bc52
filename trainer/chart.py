"""Where the Helm chart lives: inside the wheel, or in the source checkout."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import yaml

# libyaml's parser where PyYAML has it: the same documents, ten times faster (the CLI's start-up).
SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

_PACKAGED = Path(__file__).resolve().parent / "chart"
_SOURCE = Path(__file__).resolve().parent.parent / "helm" / "kubetrain"


@functools.cache
def chart_dir() -> Path:
    for candidate in (_PACKAGED, _SOURCE):
        if (candidate / "Chart.yaml").is_file() or (candidate / "values.yaml").is_file():
            return candidate
    raise FileNotFoundError("the kubetrain Helm chart is missing from this installation")


@functools.cache
def default_values() -> dict:
    with open(chart_dir() / "values.yaml", encoding="utf-8") as f:
        return yaml.load(f, Loader=SafeLoader)


@functools.cache
def values_schema() -> dict:
    with open(chart_dir() / "values.schema.json", encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def _messages() -> dict:
    return yaml.load(chart_text("files/messages.yaml"), Loader=SafeLoader)


def chart_message(key: str, *args) -> str:
    """One of the chart's refusals (files/messages.yaml), its printf verbs filled in: %q a quoted
    name (plain text: DNS labels, keys), %d an integer, %s text."""
    values = iter(args)
    fill = {"q": lambda v: json.dumps(str(v), ensure_ascii=False), "d": lambda v: str(int(v)), "s": str}
    return re.sub(r"%([qds])", lambda match: fill[match.group(1)](next(values)), _messages()[key])


def chart_text(relative: str) -> str:
    """A file the chart ships (`.Files.Get`)."""
    return (chart_dir() / relative).read_text(encoding="utf-8")
