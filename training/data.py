"""Datasets that ship inside packages; nothing is downloaded at run time.

Digits: scikit-learn's bundled `load_digits` (1,797 8x8 images, 16 grey levels, 10 classes).
Images stay raw (values 0..16) because normalisation lives inside each model, so clients
send what the dataset holds. Shapes: X (N, 1, 8, 8) float32, y (N,) int64.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

DIGITS_LABELS = [str(i) for i in range(10)]


@dataclass
class Split:
    """Fixed, seeded train / validation / test tensors plus what lineage records about them."""

    train: tuple[torch.Tensor, torch.Tensor]
    val: tuple[torch.Tensor, torch.Tensor]
    test: tuple[torch.Tensor, torch.Tensor]
    name: str          # dataset name for lineage
    split: str         # how it was split, for lineage
    sha256: str        # hash of the raw data, for lineage


def digits(seed: int = 0, val_fraction: float = 0.15, test_fraction: float = 0.15) -> Split:
    """The digits set split 70/15/15 by a seeded permutation (the same split for every family)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = bunch.images.astype(np.float32)[:, None, :, :]   # (N, 1, 8, 8), values 0..16
    labels = bunch.target.astype(np.int64)                     # (N,)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    train, val, test, split = seeded_split(images, labels, seed, val_fraction, test_fraction)
    return Split(train=train, val=val, test=test, name="sklearn.datasets.load_digits", split=split, sha256=digest)


def seeded_split(x: np.ndarray, y: np.ndarray, seed: int = 0, val_fraction: float = 0.15,
                 test_fraction: float = 0.15) -> tuple[tuple[torch.Tensor, torch.Tensor],
                                                       tuple[torch.Tensor, torch.Tensor],
                                                       tuple[torch.Tensor, torch.Tensor], str]:
    """(train, val, test, description): rows of (x, y) by a seeded permutation, the first
    int(n * test_fraction) to test, the next int(n * val_fraction) to validation, the rest to train.
    Every dataset (digits, a user's own: training/user_data.py) is split this way."""
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(len(y) * test_fraction)
    n_val = int(len(y) * val_fraction)
    parts = np.split(order, [n_test, n_test + n_val])
    test, val, train = ((torch.from_numpy(x[p]), torch.from_numpy(y[p])) for p in parts)
    return train, val, test, f"seeded permutation seed={seed}: test {n_test}, val {n_val}, train {len(parts[2])}"
