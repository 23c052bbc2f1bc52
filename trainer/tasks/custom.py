"""`training.task: custom`: your own model through `training.entrypoint: "package.module:function"`.

The package comes from the image, from PYTHONPATH, or from the directories in
`training.pythonPath` (e.g. a mounted volume). The function takes the
TrainingConfig (or nothing) and returns a TaskSpec, or a mapping with its keys:

    model          nn.Module (required); forward takes a batch's inputs (a dict is
                   passed as keyword arguments)
    train_dataset  map-style Dataset of (inputs, target) pairs (required)
    eval_dataset   the same, for evaluation (optional)
    loss_fn        (outputs, targets) -> scalar (default: cross-entropy)
    collate_fn     DataLoader collate function (optional)
    accuracy       whether eval reports top-1 accuracy (default: True)

Everything else the loop provides: DDP or FSDP, precision, accumulation,
checkpoints, metrics. `training.options` reaches the function as `cfg.options`.

Fine-tuning: `training.pretrained: s3://.../weights.safetensors` (or file://) is
loaded into the returned model by name, skipping tensors whose shape differs
(a new head), unless the function already called
`trainer.tasks.load_pretrained(model, cfg.pretrained)` itself (e.g. into a
sub-module). `training.finetune.freeze` prefixes freeze, and
`unfreezeAfterEpochs` unfreezes at a lower LR, as for the built-in tasks.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import sys
from collections.abc import Mapping

from torch import nn
from torch.utils.data import IterableDataset

from trainer.errors import UserError
from trainer.tasks import TaskSpec, _weights, building, load_pretrained, register
from trainer.tasks._finetune import hooks

log = logging.getLogger(__name__)

SPEC_FIELDS = {f.name for f in dataclasses.fields(TaskSpec)}


def resolve_entrypoint(entrypoint: str, python_path: tuple[str, ...] = ()):
    if not entrypoint:
        raise UserError('training.entrypoint: set it to "package.module:function" for training.task: custom')
    module_name, _, function_name = entrypoint.partition(":")
    if not module_name or not function_name:
        raise UserError(f'training.entrypoint: {entrypoint!r} must look like "package.module:function"')
    for path in reversed(python_path):
        if path not in sys.path:
            sys.path.insert(0, path)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):  # the entry point itself, not one of its imports
            raise UserError(f"training.entrypoint: cannot import {module_name!r} ({e}); put the package in "
                            "the image, on PYTHONPATH or in training.pythonPath") from None
        raise
    function = getattr(module, function_name, None)
    if not callable(function):
        raise UserError(f"training.entrypoint: {module_name!r} has no function {function_name!r}")
    return function


def as_spec(result, entrypoint: str) -> TaskSpec:
    if isinstance(result, TaskSpec):
        return _checked(result, entrypoint)
    if isinstance(result, Mapping):
        unknown = set(result) - SPEC_FIELDS
        if unknown:
            raise UserError(f"training.entrypoint: {entrypoint} returned unknown keys {sorted(unknown)}; "
                            f"allowed: {sorted(SPEC_FIELDS)}")
        missing = {"model", "train_dataset"} - set(result)
        if missing:
            raise UserError(f"training.entrypoint: {entrypoint} returned no {', '.join(sorted(missing))}")
        return _checked(TaskSpec(**result), entrypoint)
    raise UserError(f"training.entrypoint: {entrypoint} returned {type(result).__name__}, "
                    "expected a TaskSpec or a mapping with model and train_dataset")


@register("custom")
def build(cfg, weights: _weights.WeightsReader | None = None) -> TaskSpec:
    function = resolve_entrypoint(cfg.entrypoint, cfg.python_path)
    if not building().weights:  # load_exported: the export's weights replace the pretrained ones
        cfg = dataclasses.replace(cfg, pretrained=False)
    takes_config = bool(inspect.signature(function).parameters)
    reader = _weights.current_reader(weights)
    with _weights.reading_with(reader):  # load_pretrained() in the entry point reads with the run's S3 settings
        spec = as_spec(function(cfg) if takes_config else function(), cfg.entrypoint)
        if isinstance(cfg.pretrained, str) and cfg.pretrained not in reader.applied:
            load_pretrained(spec.model, cfg.pretrained)  # the entry point left training.pretrained to the loop
    if cfg.finetune.freeze and spec.param_groups is None and spec.on_epoch_start is None:
        spec = dataclasses.replace(spec, **hooks(cfg.finetune, tuple(cfg.finetune.freeze)))  # unfreezeAfterEpochs
    log.info("custom task from %s: %s, %d parameters", cfg.entrypoint, type(spec.model).__name__,
             sum(p.numel() for p in spec.model.parameters()))
    return spec


def _checked(spec: TaskSpec, entrypoint: str) -> TaskSpec:
    """What the loop would otherwise fail on deep inside DDP or the optimizer, named here."""
    if not isinstance(spec.model, nn.Module):
        raise UserError(f"training.entrypoint: {entrypoint} returned a model of type {type(spec.model).__name__}, "
                        "expected a torch.nn.Module")
    data = spec.train_dataset
    map_style = all(hasattr(type(data), m) for m in ("__getitem__", "__len__"))
    if data is not None and (isinstance(data, IterableDataset) or not map_style):
        # The loop samples items by index: that is how every rank gets its shard and a resume starts at its
        # data position without reading the epoch again.
        raise UserError(f"training.entrypoint: {entrypoint} returned a train_dataset of type {type(data).__name__}, "
                        "expected a map-style dataset (with __getitem__ and __len__), not an iterable one")
    return spec
