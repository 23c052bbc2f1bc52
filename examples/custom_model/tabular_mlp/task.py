"""An MLP classifying points on concentric rings: a custom kubetrain task.

Entry point: `training.entrypoint: "tabular_mlp.task:build"`. kubetrain calls
`build(cfg)` with the TrainingConfig and trains what it returns with DDP or
FSDP, checkpoints and metrics; nothing here knows about distribution.
"""

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset


def rings(num_samples: int, num_classes: int, seed: int) -> TensorDataset:
    """Points on `num_classes` noisy concentric rings; the ring index is the label."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (num_samples,), generator=g)
    angle = 2 * math.pi * torch.rand(num_samples, generator=g)
    radius = 1.0 + labels.float() + 0.25 * torch.randn(num_samples, generator=g)
    points = torch.stack([radius * angle.cos(), radius * angle.sin()], dim=1)
    return TensorDataset(points / num_classes, labels)


class MLP(nn.Module):
    def __init__(self, num_classes: int, hidden: int):
        super().__init__()
        # A ModuleList of blocks: FSDP shards each block separately.
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(2, hidden), nn.ReLU()),
                                     nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU())])
        self.head = nn.Linear(hidden, num_classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def build(cfg):
    hidden = int(cfg.options.get("hidden", 64))
    return {
        "model": MLP(cfg.num_classes, hidden),
        "train_dataset": rings(cfg.data.train_samples, cfg.num_classes, cfg.seed),
        "eval_dataset": rings(cfg.data.eval_samples, cfg.num_classes, cfg.seed + 1),
        "loss_fn": nn.CrossEntropyLoss(),
    }
