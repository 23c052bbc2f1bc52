"""DataLoaders: a DistributedSampler for training, an exact shard for evaluation."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler

from trainer.errors import UserError


class ShardSampler(Sampler[int]):
    """Rank r takes items r, r+W, r+2W, ...: every item once, no padding, so
    metrics reduced across ranks count each example exactly once."""

    def __init__(self, length: int, rank: int, world_size: int):
        self.indices = range(rank, length, world_size)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(spec, cfg, info, device: torch.device):
    """(train_loader, train_sampler, eval_loader) for this rank."""
    data = cfg.data
    pin = device.type == "cuda"
    common = dict(num_workers=data.num_workers, pin_memory=pin, collate_fn=spec.collate_fn,
                  persistent_workers=data.num_workers > 0)
    sampler = DistributedSampler(spec.train_dataset, num_replicas=info.world_size, rank=info.rank,
                                 shuffle=True, seed=cfg.seed, drop_last=True)
    train = DataLoader(spec.train_dataset, batch_size=cfg.batch_size, sampler=sampler,
                       drop_last=True, **common)
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
