"""A digits classifier as the judge of generated samples.

The judge is the resnet family's `tiny` preset trained on the digits split (about 99.6 % test
accuracy), so "the sample looks like a 7" means "a good classifier says 7". Generators work in
[-1, 1]; the judge reads digits' own 0..16 scale (`to_digits`).

Metrics:
- agreement: share of class-conditional samples judged as the requested digit;
- label entropy: entropy (nats) of the histogram of judged labels over many samples; ln 10 = 2.30
  when every digit is equally common, 0 when one digit is all the generator makes.
Dimensions: N samples, K classes (10).
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path

import torch

from training import checkpoint

MAX_ENTROPY = math.log(10)


def to_digits(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> digits' 0..16 (clamped): the inverse of training.generative.to_unit."""
    return ((images + 1) * 8).clamp(0, 16)


@functools.lru_cache(maxsize=4)
def load_judge(directory: str | None = None, progress: bool = False) -> torch.nn.Module:
    """The judge classifier: loaded from `directory` when it holds a checkpoint, else trained
    there (in memory only when None; ~20 s on one thread) and cached for this process."""
    from training.train import train_classifier

    if directory is None:
        with tempfile.TemporaryDirectory(prefix="zooserve-judge-") as tmp:
            train_classifier("resnet", "tiny", tmp, progress=progress)
            return checkpoint.load(tmp)[0]
    if not (Path(directory) / checkpoint.META).exists():
        train_classifier("resnet", "tiny", directory, progress=progress)
    return checkpoint.load(directory)[0]


@torch.no_grad()
def judge(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Judged labels (N,) of images (N, 1, 8, 8) in [-1, 1]."""
    model.eval()
    return torch.cat([model(to_digits(x)).argmax(-1) for x in images.split(batch_size)])


def agreement(judged: torch.Tensor, requested: torch.Tensor) -> float:
    """Share of samples judged as the digit they were asked for."""
    return float((judged == requested).float().mean())


def label_entropy(judged: torch.Tensor, n_classes: int = 10) -> float:
    """Entropy in nats of the judged-label histogram."""
    p = torch.bincount(judged, minlength=n_classes).double() / judged.numel()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def spread(images: torch.Tensor, labels: torch.Tensor, n_classes: int = 10) -> float:
    """Mean pairwise L2 distance between images of the same label, averaged over labels: how
    varied the samples of one digit are (a generator that ignores its noise scores 0). Compare it
    with the same number on real digits (`spread_ratio`); the judge alone cannot see a collapse."""
    per_class = []
    for k in range(n_classes):
        x = images[labels == k].flatten(1).double()                               # (n_k, P)
        if x.shape[0] > 1:
            d = torch.cdist(x, x)                                                 # (n_k, n_k)
            per_class.append(float(d.sum() / (x.shape[0] * (x.shape[0] - 1))))
    return sum(per_class) / len(per_class)
