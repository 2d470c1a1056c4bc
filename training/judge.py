"""A classifier as the judge of generated samples.

On digits the judge is the resnet family's `tiny` preset trained on the digits split (about 99.6 %
test accuracy), so "the sample looks like a 7" means "a good classifier says 7". Generators work in
[-1, 1]; the judge reads digits' own 0..16 scale (`to_digits`).

On a user's image folder (training/user_data.py) with several classes, the judge is the same
resnet recipe trained on the training split of that folder (`train_folder_judge`: the shared loop,
a short budget), reading 0..255 pixels (`to_pixels`); its own held-out accuracy on the folder's test
split is reported beside the figures it gives, so they can be read (a judge right 70 % of the
time caps the agreement it can see).

Metrics:
- agreement: share of class-conditional samples judged as the requested digit;
- label entropy: entropy (nats) of the histogram of judged labels over many samples; ln 10 = 2.30
  when every digit is equally common, 0 when one digit is all the generator makes.
Dimensions: N samples, K classes (10 for digits), C image channels, S x S the image.
"""

from __future__ import annotations

import functools
import math
import tempfile
from pathlib import Path
from typing import Callable

import torch

from training import checkpoint

MAX_ENTROPY = math.log(10)
# the folder judge's training budget: early stopping ends it sooner (3-class 8x8 digits: ~3 s)
FOLDER_JUDGE_TRAIN = dict(epochs=20, patience=4)


def to_digits(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> digits' 0..16 (clamped): the inverse of training.generative.to_unit."""
    return ((images + 1) * 8).clamp(0, 16)


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> an image folder's 0..255 (clamped): the inverse of training.generative.pixels_unit."""
    return ((images + 1) * 127.5).clamp(0, 255)


def train_folder_judge(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                       test: tuple[torch.Tensor, torch.Tensor], seed: int = 0,
                       progress: bool = False) -> tuple[torch.nn.Module, float]:
    """A resnet `tiny` classifier trained (loop.train, FOLDER_JUDGE_TRAIN) on an image folder's
    training split, images (N, C, S, S) as 0..255 pixels and labels (N,) 0..K-1; returns (the
    judge in eval mode, its accuracy on `test`)."""
    import dataclasses

    from training import loop
    from training.families import family_module, make_config

    images, labels = train
    n_classes = int(max(labels.max(), val[1].max(), test[1].max())) + 1
    config = dataclasses.replace(make_config("resnet", "tiny"), in_channels=images.shape[1],
                                 image_size=images.shape[-1], n_classes=n_classes, input_scale=255.0)
    fam = family_module("resnet")
    torch.manual_seed(seed)
    model = fam.Model(config)
    loop.train(model, fam.loss, train, val, loop.TrainConfig(seed=seed, **FOLDER_JUDGE_TRAIN), progress=progress)
    return model.eval(), loop.accuracy(model, test)


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
def judge(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 512,
          to_input: Callable[[torch.Tensor], torch.Tensor] = to_digits) -> torch.Tensor:
    """Judged labels (N,) of images (N, C, S, S) in [-1, 1], fed to the judge through `to_input`
    (digits: to_digits; an image folder's judge: to_pixels)."""
    model.eval()
    return torch.cat([model(to_input(x)).argmax(-1) for x in images.split(batch_size)])


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
