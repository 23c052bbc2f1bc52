"""The task registry: one module per workload, looked up by name.

A task module decorates a builder with `@register("name")`; the builder takes
the TrainingConfig and returns a TaskSpec. Modules in this package are imported
on first lookup, so adding a workload is adding a file.
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Callable

from trainer.errors import UserError
from trainer.tasks.spec import TaskSpec

Builder = Callable[..., TaskSpec]
_REGISTRY: dict[str, Builder] = {}
_loaded = False


def register(name: str) -> Callable[[Builder], Builder]:
    def decorate(builder: Builder) -> Builder:
        if name in _REGISTRY and _REGISTRY[name] is not builder:
            raise ValueError(f"task {name!r} is registered twice")
        _REGISTRY[name] = builder
        return builder

    return decorate


def _load_all() -> None:
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            if not module.name.startswith("_") and module.name != "spec":
                importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True


def task_names() -> list[str]:
    _load_all()
    return sorted(_REGISTRY)


def get_task(name: str) -> Builder:
    _load_all()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UserError(
            f"training.task: unknown task {name!r}; registered tasks: {', '.join(task_names())}"
        ) from None


__all__ = ["TaskSpec", "register", "get_task", "task_names"]
