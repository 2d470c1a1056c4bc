"""MLP classifier for 8x8 digits.

Dimensions: B batch, P pixels (64), H hidden width, K classes (10).
The model takes raw digits values (0..16) and scales them itself, so a client sends the
dataset's values unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

KIND = "classify"
# names of forward()'s outputs in the exported signature (inputs are forward()'s argument names)
OUTPUT_NAMES = ("logits",)


@dataclass
class Config:
    in_channels: int = 1
    image_size: int = 8
    hidden: int = 128          # width of each hidden layer
    n_layers: int = 2          # hidden layers
    n_classes: int = 10
    dropout: float = 0.1
    input_scale: float = 16.0  # digits are 0..16; the model divides by this


PRESETS = {
    "tiny": dict(hidden=128, n_layers=2),
    "small": dict(hidden=512, n_layers=3),
}


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        width_in = config.in_channels * config.image_size**2
        layers: list[nn.Module] = []
        for _ in range(config.n_layers):
            layers += [nn.Linear(width_in, config.hidden), nn.GELU(), nn.Dropout(config.dropout)]
            width_in = config.hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width_in, config.n_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.flatten(1) / self.config.input_scale   # (B, P) in [0, 1]
        return self.head(self.body(x))                   # (B, K) logits


Model = MLP


def example_inputs(config: Config, batch: int = 2) -> tuple[torch.Tensor]:
    """A batch of random digit-like images (values 0..16)."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, config.in_channels, config.image_size, config.image_size)
    return (torch.randint(0, 17, shape, generator=g).float(),)


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)
