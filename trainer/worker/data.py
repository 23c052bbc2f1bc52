"""DataLoaders: a DistributedSampler for training, an exact shard for evaluation.

A resume mid-epoch starts the sampler at the checkpoint's data position
(ResumableSampler), so no batch before it is loaded again. For that to be
exact, a training item's randomness (augmentation) must not depend on which
DataLoader worker made it or what that worker made before: a worker makes
every item under RNGs seeded from (seed, epoch, index) (SeededItems), unless its
dataset declares `deterministic_items = True` (trainer/tasks/spec.py).

Input-pipeline knobs (training.data.*): numWorkers, pinMemory (GPU only),
persistentWorkers and prefetchFactor (with workers), and onDevice, which keeps a
small tensor dataset on the GPU and gathers batches there.
"""

from __future__ import annotations

import logging
import random
import sys

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from trainer.errors import UserError

log = logging.getLogger(__name__)


class ShardSampler(Sampler[int]):
    """Rank r takes items r, r+W, r+2W, ...: every item once, no padding, so
    metrics reduced across ranks count each example exactly once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (same per-epoch permutation, same shard) that can start an epoch part-way:
    `set_epoch(epoch, skip)` drops the first `skip` indices, so the DataLoader's batches are the
    unbroken epoch's from batch skip/batchSize on, and nothing before them is loaded.

    Why not torchdata's StatefulDataLoader: it saves the loader's position and worker states in the
    checkpoint, a new dependency for what the (epoch, batch_in_epoch) already in train_state decides
    here, since every training dataset is map-style and its order is the sampler's index list. With
    `tag_epoch`, indices come as (epoch, index) for SeededItems, which needs the epoch in the worker
    (persistent workers keep the dataset they were started with)."""

    def __init__(self, *args, tag_epoch: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.skip, self.tag_epoch = 0, tag_epoch

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)
        self.skip = skip

    def __iter__(self):
        indices = list(super().__iter__())[self.skip:]
        return iter([(self.epoch, i) for i in indices] if self.tag_epoch else indices)

    def __len__(self) -> int:
        return max(0, self.num_samples - self.skip)


def item_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * 1_000_003 + epoch) * 1_000_000_007 + index) % (2 ** 32)


def seed_global_rngs(seed: int) -> None:
    """torch's CPU RNG, Python's `random` and NumPy's (if loaded): what a torchvision transform or a
    user's dataset draws from. In a worker process they serve only its items, so nothing is restored."""
    torch.default_generator.manual_seed(seed)  # not torch.manual_seed: that would touch CUDA's
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed)


class SeededItems(Dataset):
    """A training set read by DataLoader workers whose item `index` in `epoch` is made under RNGs seeded
    from (seed, epoch, index): the same augmentation in an unbroken run and in one resumed at any batch,
    whichever worker makes it. Without workers, items draw from the main process's RNGs, which the
    checkpoint saves and restores at the step boundary, so they repeat exactly as they are."""

    def __init__(self, inner: Dataset, seed: int):
        self.inner, self.seed = inner, seed

    def __len__(self) -> int:
        return len(self.inner)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        seed_global_rngs(item_seed(self.seed, epoch, index))
        return self.inner[index]


def needs_item_seeds(dataset: Dataset, workers: int) -> bool:
    """Whether items are made in workers and may draw from the global RNGs: any dataset but a tensor one
    or one that says it draws nothing."""
    return workers > 0 and not (isinstance(dataset, TensorDataset) or getattr(dataset, "deterministic_items", False))


class DeviceTensorDataset(TensorDataset):
    """A TensorDataset living on the accelerator: a batch is one gather on the device
    (DataLoader calls __getitems__ with the batch's indices), so there is no per-sample
    collate and no host-to-device copy. The fastest CIFAR-10 trainers keep data this way."""

    def __init__(self, dataset: TensorDataset, device: torch.device):
        super().__init__(*(t.to(device) for t in dataset.tensors))

    def __getitems__(self, indices: list[int]):
        index = torch.as_tensor(indices, device=self.tensors[0].device)
        return tuple(t[index] for t in self.tensors)


def _already_batched(batch):
    return batch


def _loader_options(spec, data, device: torch.device, on_device: bool) -> dict:
    if on_device:  # batches are gathered on the device: no workers, no pinning
        return dict(num_workers=0, collate_fn=_already_batched)
    workers = data.num_workers
    options = dict(num_workers=workers, pin_memory=data.pin_memory and device.type == "cuda",
                   collate_fn=spec.collate_fn)
    if workers > 0:
        options.update(persistent_workers=data.persistent_workers, prefetch_factor=data.prefetch_factor)
    return options


def _to_device(spec, data, device: torch.device) -> bool:
    """Apply training.data.onDevice: True when both datasets now live on the device."""
    if not data.on_device:
        return False
    if device.type == "cpu":
        log.info("training.data.onDevice: the device is the CPU, data already lives there")
        return False
    # synthetic data is made per item (trainer/tasks/_synthetic.py): stack it once for the device
    stack = lambda d: d.as_tensor_dataset() if hasattr(d, "as_tensor_dataset") else d  # noqa: E731
    spec.train_dataset, spec.eval_dataset = stack(spec.train_dataset), stack(spec.eval_dataset)
    datasets = [d for d in (spec.train_dataset, spec.eval_dataset) if d is not None]
    if not all(isinstance(d, TensorDataset) for d in datasets) or spec.collate_fn is not None:
        raise UserError("training.data.onDevice: this task's data is not an in-memory tensor dataset; "
                        "set it to false")
    spec.train_dataset = DeviceTensorDataset(spec.train_dataset, device)
    if spec.eval_dataset is not None:
        spec.eval_dataset = DeviceTensorDataset(spec.eval_dataset, device)
    return True


def build_loaders(spec, cfg, info, device: torch.device):
    """(train_loader, train_sampler, eval_loader) for this rank."""
    data = cfg.data
    common = _loader_options(spec, data, device, _to_device(spec, data, device))
    seeded = needs_item_seeds(spec.train_dataset, common["num_workers"])
    sampler = ResumableSampler(spec.train_dataset, num_replicas=info.world_size, rank=info.rank,
                               shuffle=True, seed=cfg.seed, drop_last=True, tag_epoch=seeded)
    dataset = SeededItems(spec.train_dataset, cfg.seed) if seeded else spec.train_dataset
    train = DataLoader(dataset, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **common)
    if len(train) == 0:
        raise UserError(
            f"training.batchSize: {cfg.batch_size} x {info.world_size} processes is larger than the "
            f"training set ({len(spec.train_dataset)} samples)"
        )
    evaluation = None
    if spec.eval_dataset is not None:
        evaluation = DataLoader(
            spec.eval_dataset, batch_size=cfg.batch_size,
            sampler=ShardSampler(len(spec.eval_dataset), info.rank, info.world_size), **common,
        )
    return train, sampler, evaluation


def move(batch, device: torch.device):
    """Move a batch (tensor, tuple/list or dict of tensors) to the device."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move(v, device) for v in batch)
    return batch
