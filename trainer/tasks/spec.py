"""What a task hands the training loop."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

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
    """

    model: nn.Module
    train_dataset: Dataset
    eval_dataset: Optional[Dataset] = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(
        default_factory=nn.CrossEntropyLoss
    )
    collate_fn: Optional[Callable] = None
    accuracy: bool = True
