"""Fine-tuning helpers shared by tasks: freeze, unfreeze later at a lower LR, frozen norms.

`training.finetune.freeze` lists parameter-name prefixes; `unfreezeAfterEpochs`
(null = never) makes them trainable from that epoch on, at `backboneLrScale`
times the learning rate. The optimizer is built once with both groups so the LR
schedule and a resumed optimizer state keep one shape; a frozen parameter has no
gradient, so AdamW/SGD skip it (no update, no weight decay) until it unfreezes.
"""

from __future__ import annotations

import logging
from torch import nn

from trainer.errors import UserError

log = logging.getLogger(__name__)


def _matches(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name.startswith(p) for p in prefixes)


def freeze(model: nn.Module, prefixes: tuple[str, ...]) -> int:
    frozen = 0
    for name, param in model.named_parameters():
        if _matches(name, prefixes):
            param.requires_grad_(False)
            frozen += 1
    if prefixes and not frozen:
        raise UserError(f"training.finetune.freeze: no parameter name starts with any of {list(prefixes)}")
    return frozen


def hooks(finetune, prefixes: tuple[str, ...]) -> dict:
    """TaskSpec fields (param_groups, on_epoch_start) for freezing `prefixes`."""
    unfreeze_at = finetune.unfreeze_after_epochs
    if unfreeze_at is None:
        return {}  # the default optimizer (trainable parameters only) is right

    def param_groups(model: nn.Module) -> list[dict]:
        head, backbone = [], []
        for name, param in model.named_parameters():
            (backbone if _matches(name, prefixes) else head).append(param)
        return [{"params": head, "lr_scale": 1.0},
                {"params": backbone, "lr_scale": finetune.backbone_lr_scale}]

    def on_epoch_start(model: nn.Module, epoch: int) -> bool:
        trainable = epoch >= unfreeze_at
        changed = False
        for name, param in model.named_parameters():
            if _matches(name, prefixes) and param.requires_grad != trainable:
                param.requires_grad_(trainable)
                changed = True
        if changed:
            log.info("epoch %d: %s the parameters under %s (backbone lr x%g)", epoch + 1,
                     "unfroze" if trainable else "froze", list(prefixes), finetune.backbone_lr_scale)
        return changed

    return {"param_groups": param_groups, "on_epoch_start": on_epoch_start}


def keep_frozen_norms_in_eval(module: nn.Module) -> None:
    """BatchNorm layers whose parameters are all frozen stay in eval mode: their running
    statistics are part of the pretrained backbone and must not drift."""
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            params = list(m.parameters(recurse=False))
            if params and not any(p.requires_grad for p in params):
                m.eval()

