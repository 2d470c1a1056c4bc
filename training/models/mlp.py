"""MLP classifier for 8x8 digits, or for a table of numeric features (a user's own data).

Dimensions: B batch, P pixels (64), F features, H hidden width, K classes (10 for digits).
The model takes raw values and scales them itself, so a client sends the dataset's values
unchanged: digits images (0..16) divided by input_scale; or, when n_features > 0, table rows
standardised with the training split's per-feature mean and std (stored in the config).
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
    # table input (training/user_data.py): n_features > 0 makes the input `features` (B, F), each
    # column standardised by the training split's mean and std (fit by the recipe, not set by hand);
    # 0 keeps the image input above
    n_features: int = 0
    feature_mean: tuple[float, ...] = ()
    feature_std: tuple[float, ...] = ()

    def __post_init__(self):
        self.feature_mean = tuple(self.feature_mean)   # config.json stores lists
        self.feature_std = tuple(self.feature_std)
        if self.n_features and not (len(self.feature_mean) == len(self.feature_std) == self.n_features):
            raise ValueError(f"feature_mean and feature_std need n_features={self.n_features} values each, "
                             f"not {len(self.feature_mean)} and {len(self.feature_std)}")


PRESETS = {
    "tiny": dict(hidden=128, n_layers=2),
    "small": dict(hidden=512, n_layers=3),
}


class MLP(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        width_in = config.n_features or config.in_channels * config.image_size**2
        layers: list[nn.Module] = []
        for _ in range(config.n_layers):
            layers += [nn.Linear(width_in, config.hidden), nn.GELU(), nn.Dropout(config.dropout)]
            width_in = config.hidden
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width_in, config.n_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image.flatten(1) / self.config.input_scale   # (B, P) in [0, 1]
        return self.head(self.body(x))                   # (B, K) logits


class TableMLP(MLP):
    """The same network over rows of raw feature values; its exported input is `features` (B, F)."""

    def __init__(self, config: Config):
        super().__init__(config)
        # constants of the exported graph; config.json is their one stored copy (not the state dict)
        self.register_buffer("feature_mean", torch.tensor(config.feature_mean, dtype=torch.float32), persistent=False)
        self.register_buffer("feature_std", torch.tensor(config.feature_std, dtype=torch.float32), persistent=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = (features - self.feature_mean) / self.feature_std   # (B, F) standardised
        return self.head(self.body(x))                          # (B, K) logits


def Model(config: Config) -> MLP:
    """The digits MLP, or TableMLP when the config describes a table (n_features > 0)."""
    return TableMLP(config) if config.n_features else MLP(config)


def example_inputs(config: Config, batch: int = 2) -> tuple[torch.Tensor]:
    """A batch of random digit-like images (values 0..16), or of table rows drawn around the
    training split's mean and std."""
    g = torch.Generator().manual_seed(0)
    if config.n_features:
        mean, std = torch.tensor(config.feature_mean), torch.tensor(config.feature_std)
        return ((mean + std * torch.randn(batch, config.n_features, generator=g)).float(),)
    shape = (batch, config.in_channels, config.image_size, config.image_size)
    return (torch.randint(0, 17, shape, generator=g).float(),)


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)
