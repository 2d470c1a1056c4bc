"""Small ResNet (basic blocks, He et al. 2015) for 8x8 digits, or a user's image folder.

Dimensions: B batch, C channels, H x W the image (8x8 for digits), K classes (10 for digits).
Raw pixel values go in (digits 0..16; a user's images 0..255, input_scale 255); the model
normalises them itself.
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
    width: int = 32                         # channels of the first stage
    blocks_per_stage: tuple[int, ...] = (1, 1)  # stage i has width * 2**i channels, stride 2 after the first
    n_classes: int = 10
    input_scale: float = 16.0               # the largest pixel value (digits 16, 8-bit images 255)

    def __post_init__(self):
        self.blocks_per_stage = tuple(self.blocks_per_stage)   # config.json stores a list


PRESETS = {
    "tiny": dict(width=32, blocks_per_stage=(1, 1)),
    "small": dict(width=64, blocks_per_stage=(2, 2, 2)),
}


class BasicBlock(nn.Module):
    """conv-bn-relu-conv-bn plus a shortcut (1x1 conv when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        c = config.width
        self.stem = nn.Sequential(nn.Conv2d(config.in_channels, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        blocks: list[nn.Module] = []
        c_in = c
        for stage, n_blocks in enumerate(config.blocks_per_stage):
            c_out = c * 2**stage
            for i in range(n_blocks):
                blocks.append(BasicBlock(c_in, c_out, stride=2 if (stage > 0 and i == 0) else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, config.n_classes)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = image / self.config.input_scale * 2 - 1   # (B, C, H, W) in [-1, 1]
        x = self.blocks(self.stem(x))                 # (B, C', H', W')
        return self.head(x.mean(dim=(2, 3)))          # global average pool -> (B, K) logits


Model = ResNet


def example_inputs(config: Config, batch: int = 2) -> tuple[torch.Tensor]:
    """A batch of random images with whole values 0..input_scale (digits: 0..16)."""
    g = torch.Generator().manual_seed(0)
    shape = (batch, config.in_channels, config.image_size, config.image_size)
    return (torch.randint(0, int(config.input_scale) + 1, shape, generator=g).float(),)


def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    images, labels = batch
    return F.cross_entropy(model(images), labels)
