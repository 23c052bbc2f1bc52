"""`kubetrain render`: the chart's manifests, as `helm template` prints them, because helm prints them.

The values are resolved and checked first (trainer/values.py, checks.py), so a
bad value is one message naming its key and nothing runs; then the user's own
flags go to `helm template`, the one renderer of the chart.
"""

from __future__ import annotations

import yaml

from trainer.controller import helm
from trainer.controller.checks import check_values
from trainer.values import HelmValuesLoader, resolve_values


def checked_values(name: str, flags: helm.ValueFlags) -> dict:
    """The merged values, validated with the schema and the chart's own checks."""
    values = resolve_values(list(flags.files), list(flags.sets), list(flags.strings), list(flags.jsons))
    check_values(name, values)
    return values


def render(name: str, flags: helm.ValueFlags, include_tests: bool = True, namespace: str | None = None) -> str:
    checked_values(name, flags)
    return helm.template(name, flags, include_tests=include_tests, namespace=namespace)


def manifests(stream: str) -> list[dict]:
    """The objects of a `helm template` stream, typed as helm's own YAML reader types them."""
    return [doc for doc in yaml.load_all(stream, Loader=HelmValuesLoader) if doc]
