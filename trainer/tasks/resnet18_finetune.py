"""ResNet-18 fine-tuning with a frozen backbone (torchvision).

`training.pretrained`: `true` downloads torchvision's ImageNet weights
(ResNet18_Weights.DEFAULT); a `file://` or `s3://` URI loads a state dict saved
by `torch.save(model.state_dict())` or safetensors (offline clusters); `false`
starts from random weights. The ImageNet head is replaced by a `numClasses` one;
a weights file whose `fc` already has `numClasses` outputs keeps it.
`training.finetune.freeze` (default: everything but `fc`) stays frozen, frozen
BatchNorm layers stay in eval mode, and `unfreezeAfterEpochs` trains the
backbone later at `backboneLrScale` x the learning rate.

Data: `synthetic` (learnable, `options.imageSize`, default 64), `cifar10`
(upsampled to `options.imageSize`), or `imagefolder` (torchvision ImageFolder at
training.data.path, class per sub-folder; evalPath or a 10% hold-out).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import nn

from trainer.errors import UserError
from trainer.tasks import TaskSpec, building, register
from trainer.tasks import _finetune, _weights
from trainer.tasks._synthetic import synthetic_classification

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_FREEZE_ALL_BUT = "fc."


@functools.cache
def finetune_resnet_class() -> type:
    """torchvision's ResNet with frozen BatchNorms kept in eval mode (built on first use:
    importing torchvision.models takes seconds, and the registry imports every task)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    class FinetuneResNet(ResNet):
        """ResNet-18 with torchvision's parameter names."""

        def __init__(self, num_classes: int = 1000):
            super().__init__(BasicBlock, [2, 2, 2, 2], num_classes=num_classes)

        def train(self, mode: bool = True):
            super().train(mode)
            if mode:
                _finetune.keep_frozen_norms_in_eval(self)
            return self

    return FinetuneResNet


def resnet_blocks(model: nn.Module) -> list[nn.Module]:
    """FSDP units: the eight BasicBlocks."""
    return [block for layer in (model.layer1, model.layer2, model.layer3, model.layer4) for block in layer]


def build_model(num_classes: int, pretrained, weights: _weights.WeightsReader | None = None) -> nn.Module:
    model = finetune_resnet_class()(num_classes=1000)
    if not building().weights:  # an export's weights replace them
        state = None
    elif pretrained is True:
        from torchvision.models import ResNet18_Weights

        try:
            state = ResNet18_Weights.DEFAULT.get_state_dict(progress=False)
        except Exception as e:  # no internet: say what to do instead
            raise UserError(f"training.pretrained: cannot download torchvision's ResNet-18 weights ({e}); "
                            "on an offline cluster set it to a file:// or s3:// weights URI") from None
    elif isinstance(pretrained, str):
        state = _weights.current_reader(weights).load_state_dict(pretrained)
    else:
        state = None
    if state is not None and state.get("fc.weight", torch.empty(0)).shape[:1] == (num_classes,):
        model.fc = nn.Linear(model.fc.in_features, num_classes)  # a fine-tuned file: keep its head
    if state is not None:
        own = model.state_dict()
        head = {k for k in state if k.startswith("fc.") and state[k].shape != own[k].shape}
        missing, unexpected = model.load_state_dict({k: v for k, v in state.items() if k not in head},
                                                    strict=False)
        bad = [k for k in missing if not k.startswith("fc.")] + list(unexpected)
        if bad:
            raise UserError(f"training.pretrained: {pretrained!r} is not a ResNet-18 state dict "
                            f"(mismatched keys: {', '.join(bad[:5])})")
    if model.fc.out_features != num_classes:
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    return model


def datasets(cfg, size: int):
    data = cfg.data
    if data.source == "synthetic":
        shape = (3, size, size)
        return (synthetic_classification(data.train_samples, cfg.num_classes, shape, cfg.seed),
                synthetic_classification(data.eval_samples, cfg.num_classes, shape, cfg.seed, split_offset=1))
    from torchvision import datasets as tv, transforms

    augment = bool(cfg.options.get("augment", True))
    norm = [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    train_tf = transforms.Compose(
        ([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()] if augment
         else [transforms.Resize(size), transforms.CenterCrop(size)]) + norm)
    eval_tf = transforms.Compose([transforms.Resize(size), transforms.CenterCrop(size)] + norm)
    if data.source == "cifar10":
        try:
            return (tv.CIFAR10(data.root, train=True, download=data.download, transform=train_tf),
                    tv.CIFAR10(data.root, train=False, download=data.download, transform=eval_tf))
        except RuntimeError as e:
            raise UserError(f"training.data.root: CIFAR-10 not found under {data.root!r} ({e})") from None
    if data.source == "imagefolder":
        if not data.path:
            raise UserError("training.data.path: set it to an ImageFolder directory for source imagefolder")
        try:
            train = tv.ImageFolder(data.path, transform=train_tf)
            if data.eval_path:
                return train, tv.ImageFolder(data.eval_path, transform=eval_tf)
        except (FileNotFoundError, OSError) as e:
            raise UserError(f"training.data.path: {e}") from None
        g = torch.Generator().manual_seed(cfg.seed)
        order = torch.randperm(len(train), generator=g).tolist()
        cut = max(1, len(order) // 10)
        held_out = tv.ImageFolder(data.path, transform=eval_tf)
        return (torch.utils.data.Subset(train, order[cut:]), torch.utils.data.Subset(held_out, order[:cut]))
    raise UserError(f"training.data.source: {data.source!r} is not supported by resnet18-finetune "
                    "(use synthetic, cifar10 or imagefolder)")


@register("resnet18-finetune")
def build(cfg, weights: _weights.WeightsReader | None = None) -> TaskSpec:
    model = build_model(cfg.num_classes, cfg.pretrained, weights)
    prefixes = cfg.finetune.freeze
    if not prefixes:  # default: the whole backbone, i.e. every top-level module but the head
        prefixes = tuple(f"{name}." for name, _ in model.named_children() if name != "fc"
                         and any(True for _ in _.parameters()))
    frozen = _finetune.freeze(model, prefixes)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log.info("resnet18-finetune: %d parameter tensors frozen, %d trainable weights", frozen, trainable)
    train, test = datasets(cfg, int(cfg.options.get("imageSize", 64))) if building().data else (None, None)
    return TaskSpec(model=model, train_dataset=train, eval_dataset=test, shard_units=resnet_blocks,
                    **_finetune.hooks(cfg.finetune, prefixes))
