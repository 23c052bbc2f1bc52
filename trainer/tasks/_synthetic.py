"""Offline, deterministic datasets with learnable structure, for tests and quickstarts.

Each class owns a smooth random template. A sample is its class template under
a random gain, plus a weaker template of another random class (a distractor
that makes some samples genuinely ambiguous), plus Gaussian noise. So accuracy
climbs far above chance but not trivially to 100%.

Items are made lazily, one at a time, each from a generator seeded with (seed,
split, index): the first step waits for one batch, not the whole set, and item
i is the same on every rank, in every DataLoader worker and in any order.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, TensorDataset, get_worker_info


def item_generator(base_seed: int, index: int) -> torch.Generator:
    """The generator that owns item `index` of the split seeded `base_seed`."""
    return torch.Generator().manual_seed((base_seed * 1_000_000_007 + index) % (2 ** 63))


class LazyDataset(Dataset):
    """`count` items made by `make(index)` on first access. The main process keeps what it made (an
    epoch after the first costs nothing, as with a prebuilt tensor); DataLoader workers make items
    afresh rather than each holding a copy of the set."""

    deterministic_items = True  # item i comes from its own generator (trainer/tasks/spec.py)

    def __init__(self, count: int, make: Callable[[int], tuple]):
        self.count, self.make = count, make
        self.cache: dict[int, tuple] = {}

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> tuple:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[tuple]:
        """A batch at once (the DataLoader asks so): one switch to a single thread for its items.
        Items are small: intra-op threads only contend (4x slower on 2 busy cores), and made on one
        thread an item is the same as in a DataLoader worker, which runs on one."""
        items, threads = [], torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for index in indices:
                if not -self.count <= index < self.count:
                    raise IndexError(f"index {index} out of range for {self.count} items")
                index %= self.count
                item = self.cache.get(index)
                if item is None:
                    item = self.make(index)
                    if get_worker_info() is None:
                        self.cache[index] = item
                items.append(item)
        finally:
            torch.set_num_threads(threads)
        return items

    def as_tensor_dataset(self) -> TensorDataset:
        """Every item, stacked (training.data.onDevice)."""
        items = [self[i] for i in range(self.count)]
        return TensorDataset(torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items]))


def class_templates(num_classes: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Low-frequency patterns, one per class, normalised to unit std."""
    g = torch.Generator().manual_seed(seed)
    channels, *spatial = shape
    coarse = torch.randn(num_classes, channels, *[max(2, s // 8) for s in spatial], generator=g)
    mode = "bilinear" if len(spatial) == 2 else "linear"
    smooth = F.interpolate(coarse, size=tuple(spatial), mode=mode, align_corners=False)
    return smooth / smooth.std()


class ClassificationItems:
    """make(index) for synthetic_classification (a class, not a closure: DataLoader workers pickle it)."""

    def __init__(self, num_classes: int, shape: tuple[int, ...], seed: int, noise: float, split_offset: int):
        self.templates = class_templates(num_classes, shape, seed)
        self.num_classes, self.shape, self.noise = num_classes, shape, noise
        self.base = seed * 1_000_003 + 17 + split_offset
        # The expected std of a sample (unit-std templates, gain ~ U(0.5, 1.5), distractor gain ~ U(0, 1)):
        # unit variance like normalised real data, without looking at the whole set.
        self.scale = math.sqrt(13 / 12 + 1 / 3 + noise ** 2)

    def __call__(self, index: int) -> tuple[torch.Tensor, int]:
        g = item_generator(self.base, index)
        label, distractor = torch.randint(0, self.num_classes, (2,), generator=g).tolist()
        gain, distractor_gain = (torch.rand(2, generator=g) + torch.tensor([0.5, 0.0])).tolist()
        x = (self.templates[label] * gain + self.templates[distractor] * distractor_gain
             + self.noise * torch.randn(self.shape, generator=g))
        return x / self.scale, label


def synthetic_classification(
    num_samples: int, num_classes: int, shape: tuple[int, ...], seed: int, noise: float = 2.0,
    split_offset: int = 0,
) -> LazyDataset:
    return LazyDataset(num_samples, ClassificationItems(num_classes, shape, seed, noise, split_offset))
