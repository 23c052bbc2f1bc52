"""A resume mid-epoch starts at the checkpoint's data position: nothing before it is loaded again,
and random augmentation repeats exactly, with and without DataLoader workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DistributedSampler

from support import run_cli
from trainer.worker.data import ResumableSampler

SEED, SAMPLES, BATCH, STEPS, EVERY, RESUME = 1234, 512, 8, 24, 10, 10  # 64 steps an epoch: resume mid-epoch

# CIFAR-style augmentation (torchvision's random crop and flip) plus draws from Python's and NumPy's RNGs,
# on the synthetic CIFAR set; each training read is logged to $READ_LOG, one file per process.
AUGMENTED = """
import dataclasses, os, random

import numpy
import torch
from torchvision import transforms

from trainer.tasks import get_task


class Augmented(torch.utils.data.Dataset):
    def __init__(self, inner):
        self.inner = inner
        self.augment = transforms.Compose([transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()])

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, index):
        with open(f"{os.environ['READ_LOG']}.{os.getpid()}", "a") as f:
            f.write(f"{index}\\n")
        x, y = self.inner[index]
        gain = 1.0 + 0.1 * random.random() + 0.1 * float(numpy.random.rand())
        return self.augment(x) * gain, y


def build(cfg):
    spec = get_task("cifar10-convnet")(cfg)
    return dataclasses.replace(spec, train_dataset=Augmented(spec.train_dataset))
"""


def test_a_sampler_started_part_way_yields_the_rest_of_the_unbroken_epoch():
    data = range(103)
    full = DistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=SEED, drop_last=True)
    part = ResumableSampler(data, num_replicas=2, rank=1, shuffle=True, seed=SEED, drop_last=True)
    tagged = ResumableSampler(data, num_replicas=2, rank=1, shuffle=True, seed=SEED, drop_last=True, tag_epoch=True)
    for epoch, skip in [(0, 0), (3, 16), (3, 51)]:
        full.set_epoch(epoch)
        part.set_epoch(epoch, skip=skip)
        tagged.set_epoch(epoch, skip=skip)
        order = list(full)
        assert list(part) == order[skip:] and len(part) == len(order) - skip
        assert list(tagged) == [(epoch, i) for i in order[skip:]]
    part.set_epoch(4)  # the next epoch starts at its beginning
    full.set_epoch(4)
    assert list(part) == list(full)


def step_losses(workdir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (workdir / "steps.jsonl").read_text().splitlines())}


def reads(log: Path) -> list[int]:
    return [int(line) for f in sorted(log.parent.glob(f"{log.name}.*")) for line in f.read_text().split()]


@pytest.mark.parametrize("workers", [0, 2])
def test_resuming_mid_epoch_loads_nothing_before_the_position_and_augments_exactly(tmp_path, workers):
    (tmp_path / "augmented.py").write_text(AUGMENTED)
    store = (tmp_path / "store").as_uri()
    args = ["--set", f"job.nodes=1,metrics.enabled=false,training.seed={SEED},training.batchSize={BATCH}",
            "--set", f"training.data.trainSamples={SAMPLES},training.data.evalSamples=16,training.maxSteps={STEPS}",
            "--set", f"training.data.numWorkers={workers},training.stepLogFile=steps.jsonl,training.tensorboard.enabled=false",
            "--set", "training.task=custom,training.entrypoint=augmented:build",
            "--set-json", f"training.pythonPath={json.dumps([str(tmp_path)])}",
            "--set", f"checkpoint.uri={store},checkpoint.everySteps={EVERY},checkpoint.keepLast=5"]
    env = {"OMP_NUM_THREADS": "1"}
    first = run_cli("run", "aug", "--workdir", str(tmp_path / "first"), *args,
                    env={**env, "READ_LOG": str(tmp_path / "first-reads")})
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    again = run_cli("run", "aug", "--workdir", str(tmp_path / "again"), *args, "--set", f"checkpoint.resume={RESUME}",
                    env={**env, "READ_LOG": str(tmp_path / "again-reads")})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-2000:]
    assert f"resumed from {store}/aug/step-{RESUME:08d}" in again.stdout, again.stdout[-3000:]

    reference, resumed = step_losses(tmp_path / "first"), step_losses(tmp_path / "again")
    assert sorted(resumed) == list(range(RESUME + 1, STEPS + 1))
    assert resumed == {s: reference[s] for s in resumed}  # bit-exact: the same floats

    sampler = DistributedSampler(range(SAMPLES), num_replicas=1, rank=0, shuffle=True, seed=SEED, drop_last=True)
    sampler.set_epoch(0)
    before = set(list(sampler)[:RESUME * BATCH])  # what the first RESUME steps of epoch 0 trained on
    assert before <= set(reads(tmp_path / "first-reads"))  # the log sees what is read
    loaded = reads(tmp_path / "again-reads")
    assert loaded and not before & set(loaded), sorted(before & set(loaded))[:10]
    assert len(loaded) <= (STEPS - RESUME + 2 * workers) * BATCH  # the steps left, and what workers read ahead
