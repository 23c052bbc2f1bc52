"""What a task hands the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.utils.data import Dataset


@dataclass
class TaskSpec:
    """A workload: model, datasets and loss.

    model: an nn.Module whose forward takes the batch's inputs.
    train_dataset / eval_dataset: map-style datasets of (inputs, target) pairs.
    loss_fn: (outputs, targets) -> scalar loss; cross-entropy by default.
    collate_fn: optional DataLoader collate function (e.g. dynamic padding).
    accuracy: whether eval reports top-1 accuracy (classification tasks).

    Optional hooks (all default to "not needed"):
    param_groups: model -> list of optimizer groups {"params": [...], "lr_scale": float};
        called on the wrapped model's parameters, after FSDP sharding (which replaces
        parameter objects). Default: one group of the parameters that require grad.
    on_epoch_start: (model, epoch) -> bool, called before every epoch (also the one a
        resume lands in, so it must depend on `epoch` only); returns True when it
        changed which parameters require grad (e.g. unfreezing a backbone), so the
        loop re-wraps DDP.
    shard_units: model -> the blocks FSDP shards one by one (default: the elements of
        the model's nn.ModuleLists).
    """

    model: nn.Module
    train_dataset: Dataset
    eval_dataset: Optional[Dataset] = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(
        default_factory=nn.CrossEntropyLoss
    )
    collate_fn: Optional[Callable] = None
    accuracy: bool = True
    param_groups: Optional[Callable[[nn.Module], list[dict]]] = None
    on_epoch_start: Optional[Callable[[nn.Module, int], bool]] = None
    shard_units: Optional[Callable[[nn.Module], Iterable[nn.Module]]] = None
