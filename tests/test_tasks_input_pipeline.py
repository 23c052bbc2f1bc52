"""training.data.* input-pipeline options reach the DataLoader; on-device batches match host batches."""

from __future__ import annotations

import dataclasses

import torch
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from fixtures.tasks_helpers import in_process_trainer
from trainer.worker.data import DeviceTensorDataset, _already_batched


def test_device_dataset_gathers_the_same_batches_as_the_default_collate():
    data = TensorDataset(torch.randn(50, 3, 4, 4), torch.randint(0, 10, (50,)))
    sampler = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3, drop_last=True)
    host = list(DataLoader(data, batch_size=8, sampler=sampler, drop_last=True))
    device = list(DataLoader(DeviceTensorDataset(data, torch.device("cpu")), batch_size=8, sampler=sampler,
                             drop_last=True, collate_fn=_already_batched))
    assert len(host) == len(device) == 3
    for (x, y), (dx, dy) in zip(host, device):
        assert torch.equal(x, dx) and torch.equal(y, dy)


def test_worker_options_reach_the_loader(tmp_path):
    trainer = in_process_trainer(tmp_path, {
        "maxSteps": 1, "data": {"trainSamples": 64, "evalSamples": 16, "numWorkers": 1,
                                "persistentWorkers": False, "prefetchFactor": 3, "pinMemory": True}})
    loader = trainer.train_loader
    assert loader.num_workers == 1 and loader.prefetch_factor == 3 and not loader.persistent_workers
    assert not loader.pin_memory  # pinning only helps copies to a GPU
    assert dataclasses.asdict(trainer.cfg.data)["on_device"] is False
