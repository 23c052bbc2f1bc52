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
    train_dataset / eval_dataset: map-style datasets of (inputs, target) pairs; None where the
        builder was asked for the network only (trainer.tasks.building(), load_exported).
    loss_fn: (outputs, targets) -> scalar loss; cross-entropy by default.
    collate_fn: optional DataLoader collate function (e.g. dynamic padding); it should draw no
        randomness (with numWorkers > 0 a resume mid-epoch would not repeat it): augment in the dataset.
    accuracy: whether eval reports top-1 accuracy (classification tasks).

    DataLoader workers make each training item under RNGs (torch CPU, `random`, NumPy) seeded from
    (seed, epoch, index), so random augmentation repeats exactly in a run resumed mid-epoch
    (trainer/worker/data.py). A dataset class that draws nothing from them may set
    `deterministic_items = True` to skip that (a little per-item work; its `__getitems__` is kept).

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
    eval_counts: (outputs, targets) -> (n, correct) tensors: how much an eval batch weighs
        in the mean loss and how many of it were right (default: examples, argmax == target).
    materialize: (model, device) -> None, for a model built with its parameters on the meta
        device: give them storage on the device and load them. The loop calls it after FSDP
        sharded the model (each rank loads its shards) or before DDP wraps it.
    generate: (model, device, synced) -> [{"prompt", "answer", "expected"}], run after each
        evaluation and logged; under FSDP every rank calls it (synced=True), else rank 0.
    checkpoint_keys: model state name -> bool: what checkpoints hold of the model (LoRA:
        the adapters; the frozen rest is the pretrained weights, loaded at every start).
    export: (full CPU state dict, folder) -> {name: subfolder}: write the exported model
        (rank 0, at the end) instead of kubetrain's model.safetensors + model.json.
    count_tokens: batch -> the real (non-padding) tokens of one training micro-batch as the loader
        yields it, `(inputs, target)`: a tensor or an int. The loop adds them up on the device and
        reads the sum at log steps only, for tokens/s (token tasks; others report none).
    perplexity: the eval loss is a mean per-token cross-entropy (language models): report
        its exponential beside it, in the log and TensorBoard.
    """

    model: nn.Module
    train_dataset: Optional[Dataset] = None
    eval_dataset: Optional[Dataset] = None
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = field(
        default_factory=nn.CrossEntropyLoss
    )
    collate_fn: Optional[Callable] = None
    accuracy: bool = True
    param_groups: Optional[Callable[[nn.Module], list[dict]]] = None
    on_epoch_start: Optional[Callable[[nn.Module, int], bool]] = None
    shard_units: Optional[Callable[[nn.Module], Iterable[nn.Module]]] = None
    eval_counts: Optional[Callable] = None
    materialize: Optional[Callable[[nn.Module, torch.device], None]] = None
    generate: Optional[Callable] = None
    checkpoint_keys: Optional[Callable[[str], bool]] = None
    export: Optional[Callable] = None
    count_tokens: Optional[Callable] = None
    perplexity: bool = False
