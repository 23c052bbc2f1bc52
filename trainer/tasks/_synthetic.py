"""Offline, deterministic datasets with learnable structure, for tests and quickstarts.

Each class owns a smooth random template. A sample is its class template under
a random gain, plus a weaker template of another random class (a distractor
that makes some samples genuinely ambiguous), plus Gaussian noise. So accuracy
climbs far above chance but not trivially to 100%. Same seed, same data, on
every rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset


def class_templates(num_classes: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Low-frequency patterns, one per class, normalised to unit std."""
    g = torch.Generator().manual_seed(seed)
    channels, *spatial = shape
    coarse = torch.randn(num_classes, channels, *[max(2, s // 8) for s in spatial], generator=g)
    mode = "bilinear" if len(spatial) == 2 else "linear"
    smooth = F.interpolate(coarse, size=tuple(spatial), mode=mode, align_corners=False)
    return smooth / smooth.std()


def synthetic_classification(
    num_samples: int, num_classes: int, shape: tuple[int, ...], seed: int, noise: float = 2.0,
    split_offset: int = 0,
) -> TensorDataset:
    templates = class_templates(num_classes, shape, seed)
    g = torch.Generator().manual_seed(seed * 1_000_003 + 17 + split_offset)
    labels = torch.randint(0, num_classes, (num_samples,), generator=g)
    ones = [1] * len(shape)
    gain = 0.5 + torch.rand(num_samples, *ones, generator=g)
    distractor = torch.randint(0, num_classes, (num_samples,), generator=g)
    distractor_gain = torch.rand(num_samples, *ones, generator=g)
    inputs = (templates[labels] * gain + templates[distractor] * distractor_gain
              + noise * torch.randn(num_samples, *shape, generator=g))
    inputs /= inputs.std()  # unit variance, like normalised real data
    return TensorDataset(inputs.contiguous(), labels)
