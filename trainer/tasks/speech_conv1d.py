"""A WaveNet-style 1-D convolutional speech classifier over log-mel frames [C, T].

The model: a 1x1 input projection, residual blocks of gated dilated
convolutions (dilations 1, 2, 4, ... repeated), skip connections summed into a
head, global average pooling over time, a linear classifier (as in WaveNet and
the keyword-spotting models built on it).

Data (`training.data.source`):
- `synthetic`: learnable audio, generated offline: each class is a pair of tones
  with a random onset, gain and phase, plus noise and a weaker tone of another
  class; it goes through the same log-mel front end as real audio. Clips are
  made per item on first use (trainer/tasks/_synthetic.py), seeded by index.
- `folder`: `training.data.path` holds WAV files (PCM 8/16/32-bit, any rate,
  mixed to mono and resampled) and `labels.csv` with `file,label` columns
  (label = class index or class name; names are sorted into indices).
  `training.data.evalPath` is a second such folder, else 10% is held out.
The front end is plain torch (STFT + mel filterbank) and WAVs are read with the
standard library, so there is no audio dependency.

Options (`training.options`): sampleRate (16000), seconds (1.0), nMels (40),
channels (64), blocks (8), kernelSize (3).
"""

from __future__ import annotations

import csv
import math
import wave
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, Subset

from trainer.errors import UserError
from trainer.tasks import TaskSpec, building, register
from trainer.tasks._synthetic import LazyDataset, item_generator


# ----------------------------------------------------------------- front end
def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int) -> torch.Tensor:
    """[n_mels, n_fft//2+1] triangular filters on the HTK mel scale."""
    def to_mel(hz): return 2595.0 * math.log10(1.0 + hz / 700.0)
    mels = torch.linspace(to_mel(0.0), to_mel(sample_rate / 2), n_mels + 2)
    hz = 700.0 * (10 ** (mels / 2595.0) - 1.0)
    bins = torch.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    lower, center, upper = hz[:-2, None], hz[1:-1, None], hz[2:, None]
    up = (bins - lower) / (center - lower)
    down = (upper - bins) / (upper - center)
    return torch.clamp(torch.minimum(up, down), min=0.0)


class LogMel(nn.Module):
    """Waveforms [N, samples] -> normalised log-mel features [N, n_mels, frames]."""

    def __init__(self, sample_rate: int, n_mels: int, window_ms: float = 25.0, hop_ms: float = 10.0):
        super().__init__()
        self.n_fft = 2 ** math.ceil(math.log2(sample_rate * window_ms / 1000))
        self.hop = int(sample_rate * hop_ms / 1000)
        self.register_buffer("window", torch.hann_window(self.n_fft), persistent=False)
        self.register_buffer("fbank", mel_filterbank(n_mels, self.n_fft, sample_rate), persistent=False)

    @torch.no_grad()
    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        spec = torch.stft(waves, self.n_fft, self.hop, window=self.window, return_complex=True).abs() ** 2
        feats = torch.log(self.fbank @ spec + 1e-6)
        return (feats - feats.mean(dim=(1, 2), keepdim=True)) / (feats.std(dim=(1, 2), keepdim=True) + 1e-5)


# ----------------------------------------------------------------- model
class GatedResidualBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int, dilation: int, residual: bool = True):
        super().__init__()
        self.conv = nn.Conv1d(channels, 2 * channels, kernel_size, dilation=dilation,
                              padding=dilation * (kernel_size - 1) // 2)
        # The last block feeds only the skip path (an unused residual conv would upset DDP).
        self.residual = nn.Conv1d(channels, channels, 1) if residual else None
        self.skip = nn.Conv1d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        filt, gate = self.conv(x).chunk(2, dim=1)
        h = torch.tanh(filt) * torch.sigmoid(gate)
        return (x + self.residual(h) if self.residual is not None else x), self.skip(h)


class SpeechConv1d(nn.Module):
    def __init__(self, n_mels: int, num_classes: int, channels: int = 64, blocks: int = 8,
                 kernel_size: int = 3, dilation_cycle: int = 4):
        super().__init__()
        self.input = nn.Conv1d(n_mels, channels, 1)
        self.blocks = nn.ModuleList(
            GatedResidualBlock(channels, kernel_size, 2 ** (i % dilation_cycle), residual=i < blocks - 1)
            for i in range(blocks))
        self.head = nn.Sequential(nn.ReLU(), nn.Conv1d(channels, channels, 1), nn.ReLU())
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:  # [N, n_mels, T]
        x = self.input(features)
        skips = 0
        for block in self.blocks:
            x, skip = block(x)
            skips = skips + skip
        return self.classifier(self.head(skips / math.sqrt(len(self.blocks))).mean(dim=-1))


# ----------------------------------------------------------------- data
class SyntheticAudio:
    """make(index) of a synthetic clip's (log-mel features, label): the class's two tones with a random
    onset, gain and phase, a weaker tone of another class, and noise; one generator per item."""

    def __init__(self, num_classes: int, sample_rate: int, seconds: float, seed: int, front_end: LogMel,
                 split_offset: int = 0):
        g_classes = torch.Generator().manual_seed(seed)
        # two tones per class, spread over 200 Hz .. 0.4 x sample rate
        self.tones = 200 + torch.rand(num_classes, 2, generator=g_classes) * (0.4 * sample_rate - 200)
        self.base = seed * 1_000_003 + 29 + split_offset
        self.n = int(sample_rate * seconds)
        self.t = torch.arange(self.n) / sample_rate
        self.num_classes, self.front_end = num_classes, front_end

    def _tone(self, cls: int, gain: float, g: torch.Generator) -> torch.Tensor:
        phase = 2 * math.pi * torch.rand(2, 1, generator=g)
        w = torch.sin(2 * math.pi * self.tones[cls][:, None] * self.t + phase).sum(dim=0)
        onset = int(torch.randint(0, self.n // 2, (), generator=g))
        length = int(torch.randint(self.n // 4, self.n // 2 + 1, (), generator=g))
        w[:onset] = 0
        w[onset + length:] = 0
        return w * gain

    def wave(self, index: int) -> tuple[torch.Tensor, int]:
        g = item_generator(self.base, index)
        label, distractor = torch.randint(0, self.num_classes, (2,), generator=g).tolist()
        gain, distractor_gain = torch.rand(2, generator=g).tolist()
        wave = (self._tone(label, 0.5 + gain, g) + self._tone(distractor, 0.4 * distractor_gain, g)
                + 0.5 * torch.randn(self.n, generator=g))
        return wave, label

    def __call__(self, index: int) -> tuple[torch.Tensor, int]:
        wave, label = self.wave(index)
        return self.front_end(wave[None])[0], label


def read_wav(path: Path, sample_rate: int, seconds: float) -> torch.Tensor:
    """Mono float waveform at `sample_rate`, cropped or zero-padded to `seconds`."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            raw = w.readframes(w.getnframes())
    except (wave.Error, EOFError, OSError) as e:
        raise UserError(f"training.data.path: {path}: not a PCM WAV file ({e})") from None
    dtype = {1: torch.uint8, 2: torch.int16, 4: torch.int32}.get(width)
    if dtype is None:
        raise UserError(f"training.data.path: {path}: {8 * width}-bit WAV is not supported (8/16/32-bit PCM)")
    x = torch.frombuffer(bytearray(raw), dtype=dtype).float()
    x = (x - 128) / 128 if width == 1 else x / float(2 ** (8 * width - 1))
    x = x.view(-1, channels).mean(dim=1)
    if rate != sample_rate:
        x = F.interpolate(x[None, None], scale_factor=sample_rate / rate, mode="linear",
                          align_corners=False)[0, 0]
    n = int(sample_rate * seconds)
    return F.pad(x[:n], (0, max(0, n - x.numel())))


class WavFolder(Dataset):
    """WAV files listed in `<folder>/labels.csv` (file,label); features computed per item."""

    def __init__(self, folder: str, key: str, front_end: LogMel, sample_rate: int, seconds: float,
                 classes: list[str] | None = None):
        root = Path(folder)
        labels_file = root / "labels.csv"
        if not labels_file.is_file():
            raise UserError(f"{key}: {labels_file} not found (expected a labels.csv with file,label columns)")
        with open(labels_file, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"file", "label"} <= set(rows[0]):
            raise UserError(f"{key}: {labels_file} needs a header row with file,label columns")
        names = sorted({r["label"] for r in rows})
        self.classes = classes or (names if not all(n.isdigit() for n in names) else None)
        self.items = []
        for r in rows:
            label = self.classes.index(r["label"]) if self.classes else int(r["label"])
            self.items.append((root / r["file"], label))
        self.front_end, self.sample_rate, self.seconds = front_end, sample_rate, seconds

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        path, label = self.items[index]
        return self.front_end(read_wav(path, self.sample_rate, self.seconds)[None])[0], label


@register("speech-conv1d")
def build(cfg, weights=None) -> TaskSpec:  # no pretrained weights to read
    o = cfg.options
    sample_rate, seconds = int(o.get("sampleRate", 16000)), float(o.get("seconds", 1.0))
    n_mels = int(o.get("nMels", 40))
    front_end = LogMel(sample_rate, n_mels)
    model = SpeechConv1d(n_mels, cfg.num_classes, channels=int(o.get("channels", 64)),
                         blocks=int(o.get("blocks", 8)), kernel_size=int(o.get("kernelSize", 3)))
    train, test = datasets(cfg, front_end, sample_rate, seconds) if building().data else (None, None)
    return TaskSpec(model=model, train_dataset=train, eval_dataset=test)


def datasets(cfg, front_end: LogMel, sample_rate: int, seconds: float):
    """(train, eval) of training.data: synthetic clips made per item, or WAV folders."""
    data = cfg.data
    if data.source == "synthetic":
        def clips(count, offset):
            return LazyDataset(count, SyntheticAudio(cfg.num_classes, sample_rate, seconds, cfg.seed, front_end,
                                                     offset))
        return clips(data.train_samples, 0), clips(data.eval_samples, 1)
    elif data.source == "folder":
        if not data.path:
            raise UserError("training.data.path: set it to a folder of WAV files with labels.csv")
        train = WavFolder(data.path, "training.data.path", front_end, sample_rate, seconds)
        if data.eval_path:
            test = WavFolder(data.eval_path, "training.data.evalPath", front_end, sample_rate, seconds,
                             classes=train.classes)
        else:
            order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            cut = max(1, len(order) // 10)
            train, test = Subset(train, order[cut:]), Subset(train, order[:cut])
    else:
        raise UserError(f"training.data.source: {data.source!r} is not supported by speech-conv1d "
                        "(use synthetic or folder)")
    return train, test
