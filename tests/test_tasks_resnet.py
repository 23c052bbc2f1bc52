"""resnet18-finetune: freezing, the head, weights from a file:// URI, unfreezing later."""

from __future__ import annotations

import torch

from fixtures.tasks_helpers import in_process_trainer, resnet_weights_uri


def _snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_backbone_is_bit_for_bit_unchanged_and_head_trains(tmp_path):
    uri = resnet_weights_uri(tmp_path, num_classes=1000)  # an "ImageNet" file: its fc is replaced
    trainer = in_process_trainer(tmp_path, {
        "task": "resnet18-finetune", "pretrained": uri, "numClasses": 4, "batchSize": 8, "maxSteps": 6,
        "data": {"trainSamples": 64, "evalSamples": 16}, "options": {"imageSize": 32},
        "optimizer": {"lr": 0.01}, "lrSchedule": {"warmupSteps": 0},
    })
    model = trainer.raw_model
    saved = torch.load(uri.removeprefix("file://"), weights_only=True)
    assert torch.equal(model.conv1.weight, saved["conv1.weight"])  # the file's weights were loaded
    assert model.fc.out_features == 4
    before = _snapshot(model)

    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    in_optimizer = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert in_optimizer == trainable == {id(model.fc.weight), id(model.fc.bias)}

    summary = trainer.fit()
    assert summary["steps"] == 6
    after = model.state_dict()
    for name, tensor in before.items():
        if name.startswith("fc."):
            assert not torch.equal(tensor, after[name]), f"{name} did not train"
        else:  # frozen weights *and* frozen BatchNorm running statistics
            assert torch.equal(tensor, after[name]), f"frozen {name} changed"
    assert not model.bn1.training and model.fc.training


def test_unfreeze_after_epochs_trains_backbone_at_lower_lr(tmp_path):
    trainer = in_process_trainer(tmp_path, {
        "task": "resnet18-finetune", "numClasses": 4, "batchSize": 8, "epochs": 2,
        "data": {"trainSamples": 24, "evalSamples": 8}, "options": {"imageSize": 32},
        "finetune": {"unfreezeAfterEpochs": 1, "backboneLrScale": 0.1},
        "optimizer": {"lr": 0.01}, "lrSchedule": {"name": "constant", "warmupSteps": 0},
    })
    model = trainer.raw_model
    head_group, backbone_group = trainer.optimizer.param_groups
    assert backbone_group["lr"] == head_group["lr"] * 0.1
    before = _snapshot(model)
    trainer.fit()
    after = model.state_dict()
    assert not torch.equal(before["layer1.0.conv1.weight"], after["layer1.0.conv1.weight"])
    assert model.layer1[0].conv1.weight.requires_grad and model.bn1.training
