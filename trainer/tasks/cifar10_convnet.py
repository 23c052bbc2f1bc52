"""CIFAR-10 ConvNet from scratch, after the PyTorch "Training a classifier" tutorial.

Two 3x3 conv layers with pooling, then two linear layers. `training.data.source`:
`synthetic` (offline) or `cifar10` (torchvision; `download` fetches it into `root`).
`training.options.augment: true` adds random crop + horizontal flip to real data.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.errors import UserError
from trainer.tasks import TaskSpec, building, register
from trainer.tasks._synthetic import synthetic_classification

CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


class ConvNet(nn.Module):
    def __init__(self, num_classes: int = 10, width: int = 16, hidden: int = 128):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(2 * width * 8 * 8, hidden), nn.ReLU(inplace=True),
            nn.Linear(hidden, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def cifar10_datasets(root: str, download: bool, augment: bool):
    """Real CIFAR-10 through torchvision, normalised; augmentation on the training split."""
    from torchvision import datasets, transforms

    normalize = [transforms.ToTensor(), transforms.Normalize(CIFAR_MEAN, CIFAR_STD)]
    train_tf = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if augment else []
    try:
        train = datasets.CIFAR10(root, train=True, download=download,
                                 transform=transforms.Compose(train_tf + normalize))
        test = datasets.CIFAR10(root, train=False, download=download,
                                transform=transforms.Compose(normalize))
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise UserError(
            f"training.data.root: CIFAR-10 not found under {root!r} ({e}); "
            "set training.data.download: true or mount the dataset there"
        ) from None
    return train, test


@register("cifar10-convnet")
def build(cfg, weights=None) -> TaskSpec:  # no pretrained weights to read
    options = cfg.options
    model = ConvNet(cfg.num_classes, width=int(options.get("width", 16)),
                    hidden=int(options.get("hidden", 128)))
    if not building().data:
        train = test = None
    elif cfg.data.source == "synthetic":
        train = synthetic_classification(cfg.data.train_samples, cfg.num_classes, (3, 32, 32), cfg.seed)
        test = synthetic_classification(cfg.data.eval_samples, cfg.num_classes, (3, 32, 32), cfg.seed,
                                        split_offset=1)
    elif cfg.data.source == "cifar10":
        if cfg.num_classes != 10:
            raise UserError("training.numClasses must be 10 for training.data.source: cifar10")
        train, test = cifar10_datasets(cfg.data.root, cfg.data.download, bool(options.get("augment", False)))
    else:
        raise UserError(
            f"training.data.source: {cfg.data.source!r} is not supported by cifar10-convnet "
            "(use synthetic or cifar10)"
        )
    return TaskSpec(model=model, train_dataset=train, eval_dataset=test)
