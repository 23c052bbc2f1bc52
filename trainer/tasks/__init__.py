"""The task registry: one module per workload, looked up by name.

A task module decorates a builder with `@register("name")`; the builder takes
the TrainingConfig and, as `weights`, the run's WeightsReader (for
`training.pretrained` URIs; None means boto3's default S3 settings), and returns
a TaskSpec. Modules in this package are imported
on first lookup, so adding a workload is adding a file.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable, Iterator

from trainer.errors import UserError
from trainer.tasks.spec import TaskSpec

Builder = Callable[..., TaskSpec]
_REGISTRY: dict[str, Builder] = {}
_loaded = False


@dataclass(frozen=True)
class Building:
    """What a builder is asked for. Training wants everything; load_exported wants the bare network
    (no datasets, and no pretrained weights: the export's replace them), so a model loads in the
    time its network takes to build, without the training data or a download."""

    data: bool = True  # build the datasets (False: TaskSpec's datasets stay None)
    weights: bool = True  # read training.pretrained's weights (False: its config and tokenizer only)


_BUILDING: contextvars.ContextVar[Building] = contextvars.ContextVar("kubetrain_building", default=Building())


def building() -> Building:
    """What the builder running now should build (tasks check it; the default is everything)."""
    return _BUILDING.get()


@contextlib.contextmanager
def build_mode(**what: bool) -> Iterator[None]:
    token = _BUILDING.set(Building(**what))
    try:
        yield
    finally:
        _BUILDING.reset(token)


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


def load_weights(uri: str, key: str = "training.pretrained", s3=None) -> dict:
    """A state dict from a `file://` or `s3://` weights file: `.safetensors`, or a `.pt`/`.pth`/`.bin`
    state dict (read with weights_only=True; a checkpoint-style {"model": ...} is unwrapped). Called
    from a custom entry point, S3 reads use the run's `s3.*` values and credentials, like
    checkpoints; elsewhere pass `s3` (an S3Config) for a non-AWS endpoint. Bad URIs and files are
    user errors naming `key`."""
    from trainer.tasks._weights import current_reader

    return current_reader(s3_config=s3).load_state_dict(uri, key)


def load_pretrained(model, uri: str, key: str = "training.pretrained", s3=None) -> dict[str, list[str]]:
    """Load `uri`'s tensors into `model` by name, for fine-tuning your own network: tensors whose shape
    differs from the model's (a new classifier head) are skipped, as are names the model lacks; both
    are logged. Returns {"loaded": [...], "skipped": [...], "missing": [...]} (missing: model tensors
    the file does not have, left as initialised). A file that matches nothing is a user error.
    S3 settings as for load_weights."""
    from trainer.tasks._weights import current_reader, load_matching

    reader = current_reader(s3_config=s3)
    report = load_matching(model, reader.load_state_dict(uri, key), uri, key)
    reader.applied.add(uri)
    return report


__all__ = ["TaskSpec", "Building", "building", "build_mode", "register", "get_task", "task_names", "load_weights", "load_pretrained"]
