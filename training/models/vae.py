"""Convolutional VAE for 8x8 digits (Kingma & Welling 2014, arXiv:1312.6114).

Encoder q(z|x) = N(mu(x), diag(sigma(x)^2)); decoder p(x|z) = N(dec(z), s^2 I) with a fixed
pixel scale s (`recon_sigma`); prior p(z) = N(0, I). Reparameterisation (section 2.4):
z = mu + sigma * e, e ~ N(0, I). Per image,
    ELBO(x) = E_q[log p(x|z)] - KL(q(z|x) || p(z))
            = -||x - dec(z)||^2 / (2 s^2) - (P/2) log(2 pi s^2)        (one z sample)
              - 1/2 sum_j (mu_j^2 + sigma_j^2 - 1 - log sigma_j^2)     (closed form, appendix B)
and loss = -ELBO, averaged over the batch (nats per image).

Dimensions: B batch, Z latent size, C channels, K image channels (1 grey, 3 RGB), S x S the image
(8 x 8 for digits; any multiple of 4: the networks work at S, S/2, s = S/4), P = K S S pixels (64
for digits); images in [-1, 1] (the data path scales digits' 0..16: training.generative.to_unit,
and an image folder's 0..255: training.user_data). The VAE is unconditional, also on an image
folder of several classes (its served decoder takes z only).
`Model.forward` is the decoder, the served function: z (B, Z) -> image (B, K, S, S) in [-1, 1].
`encode_mean` (image -> z_mean) and `reconstruct` (image -> decoded mean) are the other parts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from training.models.gan import check_image, digits_scale

KIND = "sample"
OUTPUT_NAMES = ("image",)


@dataclass
class Config:
    image_size: int = 8         # S, a multiple of 4
    latent_dim: int = 16        # Z
    channels: int = 64          # C of the s x s stage (C / 2 at 2s, C / 4 at S = 4s)
    recon_sigma: float = 0.2    # s, the decoder's fixed pixel std on the [-1, 1] scale
    image_channels: int = 1     # K: 1 grey, 3 RGB

    def __post_init__(self):
        check_image(self.image_size, self.image_channels, 4)


PRESETS = {
    "tiny": dict(latent_dim=8, channels=64, recon_sigma=0.25),
}


class Encoder(nn.Module):
    """x -> (mu, log sigma^2): three 3x3 convs, two of them strided, then linear heads."""

    def __init__(self, c: Config):
        super().__init__()
        C, s = c.channels, c.image_size // 4
        self.body = nn.Sequential(
            nn.Conv2d(c.image_channels, C // 4, 3, 1, 1), nn.SiLU(),   # S
            nn.Conv2d(C // 4, C // 2, 3, 2, 1), nn.SiLU(),   # 2s
            nn.Conv2d(C // 2, C, 3, 2, 1), nn.SiLU(),        # s
            nn.Flatten(),
        )
        self.mean = nn.Linear(C * s * s, c.latent_dim)
        self.log_var = nn.Linear(C * s * s, c.latent_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(x)                                     # (B, C s s)
        return self.mean(h), self.log_var(h)                 # (B, Z) each


class Decoder(nn.Module):
    """z -> mean image: linear to s x s (s = S / 4), two transposed-conv upsamplings, tanh."""

    def __init__(self, c: Config):
        super().__init__()
        C, s = c.channels, c.image_size // 4
        self.channels, self.start = C, s
        self.project = nn.Sequential(nn.Linear(c.latent_dim, C * s * s), nn.SiLU())
        self.body = nn.Sequential(
            nn.ConvTranspose2d(C, C // 2, 4, 2, 1), nn.SiLU(),        # 2s
            nn.ConvTranspose2d(C // 2, C // 4, 4, 2, 1), nn.SiLU(),   # S
            nn.Conv2d(C // 4, c.image_channels, 3, 1, 1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.project(z).view(-1, self.channels, self.start, self.start))   # (B, K, S, S)


class VAE(nn.Module):
    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """The served decoder: p(x|z)'s mean, (B, K, S, S) in [-1, 1]."""
        return self.decoder(z)

    def encode_mean(self, image: torch.Tensor) -> torch.Tensor:
        """mu(x), the posterior mean: (B, Z)."""
        return self.encoder(image)[0]

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """dec(mu(x)): the deterministic reconstruction."""
        return self.decoder(self.encode_mean(image))


Model = VAE


def example_inputs(config: Config, batch: int = 2) -> tuple[torch.Tensor]:
    """z ~ N(0, I), the prior."""
    return (torch.randn(batch, config.latent_dim, generator=torch.Generator().manual_seed(0)),)


def elbo_terms(model: VAE, x: torch.Tensor, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(E_q[log p(x|z)], KL(q || p)) per image, (B,) each, with the reparameterisation noise e (B, Z)."""
    s = model.config.recon_sigma
    mu, log_var = model.encoder(x)                                    # (B, Z)
    z = mu + (0.5 * log_var).exp() * e                                # reparameterisation
    sq = (x - model.decoder(z)).pow(2).flatten(1).sum(1)              # (B,)
    log_lik = -sq / (2 * s * s) - 0.5 * x[0].numel() * math.log(2 * math.pi * s * s)
    kl = 0.5 * (mu.pow(2) + log_var.exp() - 1 - log_var).sum(1)       # (B,)
    return log_lik, kl


def loss(model: VAE, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """-ELBO in nats per image. In eval mode e comes from a fixed seed, so validation losses of
    different epochs are comparable (early stopping) rather than noisy."""
    x = batch[0]
    g = None if model.training else torch.Generator().manual_seed(0)
    # drawn on the CPU (its generator) whatever the device, then moved: the same noise on any device
    e = torch.randn(x.shape[0], model.config.latent_dim, generator=g).to(x.device)
    log_lik, kl = elbo_terms(model, x, e)
    return (kl - log_lik).mean()


def generation_defaults(config: Config) -> dict:
    """What a server needs to draw samples (the manifest's `generation`)."""
    return {"latent_dim": config.latent_dim, "latent_distribution": "normal", "output_range": [-1.0, 1.0],
            **digits_scale(config.image_size, config.image_channels)}
