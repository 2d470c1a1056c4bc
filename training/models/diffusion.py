"""A small class-conditional UNet for 8x8 digits, trained as an epsilon-prediction DDPM
(Ho et al. 2020, arXiv:2006.11239, Algorithm 1) with label dropout for classifier-free guidance
(Ho & Salimans 2022, arXiv:2207.12598).

Training: x_0 ~ data, t ~ U{0..T-1}, e ~ N(0, I), x_t = sqrt(alpha-bar_t) x_0 + sqrt(1 - alpha-bar_t) e,
loss = ||e - eps_theta(x_t, t, y)||^2 (mean over pixels); with probability `p_uncond` the label y
is replaced by the null label `n_classes` (= 10), so one network is both the conditional and the
unconditional model. Sampling lives in training/schedulers (ddpm.py, ddim.py, pipeline.py).

Dimensions: B batch, C channels, K image channels (1 grey, 3 RGB), H x W the image (digits:
8x8 -> 4x4 -> 2x2 and back; any S x S with S a multiple of 2^(len(channel_mult) - 1)), E embedding
size, T the trained horizon. Images live in [-1, 1] (the data path scales digits' 0..16:
training.generative.to_unit, and an image folder's 0..255: training.user_data). `Model.forward` is
the served denoiser: (x_t (B, K, S, S), t (B,) int64, label (B,) int64 in 0..n_classes) -> eps (B, K, S, S).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training.models.gan import check_image
from training.schedulers.schedule import NoiseSchedule

KIND = "denoise"
OUTPUT_NAMES = ("eps",)


@dataclass
class Config:
    image_size: int = 8
    channels: int = 32                      # C at 8x8; stage i has C * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 2)   # 8x8, 4x4, 2x2 (the middle)
    emb_dim: int = 128                      # E, timestep + label embedding
    groups: int = 8                         # GroupNorm groups
    n_classes: int = 10                     # label n_classes is the null label ("no label")
    p_uncond: float = 0.1                   # label dropout while training (for guidance)
    # the noise schedule the model is trained on (training.schedulers.schedule.NoiseSchedule)
    num_train_timesteps: int = 1000         # T, the trained horizon
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    # sampler defaults for serving (the manifest's `generation`)
    sampler: str = "ddim"                   # ddim | ddpm
    steps: int = 50                         # DDIM steps (DDPM takes all T)
    eta: float = 0.0                        # DDIM: 0 deterministic .. 1 DDPM-like variance
    guidance: float = 1.5                   # classifier-free guidance scale g
    clip_sample: bool = True                # clip the predicted x_0 to [-1, 1] while sampling
    clipped_eps: bool = True                # DDIM: re-derive eps from the clipped x_0 (see schedulers/ddim.py)
    image_channels: int = 1                 # K: 1 grey, 3 RGB

    def __post_init__(self):
        self.channel_mult = tuple(self.channel_mult)   # config.json stores a list
        # each stage but the middle halves the image: S must divide into 2^(stages - 1)
        check_image(self.image_size, self.image_channels, 2 ** (len(self.channel_mult) - 1))
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be 1 or more, not {self.n_classes}")

    @property
    def null_label(self) -> int:
        return self.n_classes


PRESETS = {
    "tiny": dict(channels=32, channel_mult=(1, 2, 2), emb_dim=128),
}


def timestep_frequencies(dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(dim / 2,) the sinusoid frequencies of timestep_embedding, computed once on the CPU and
    kept as a buffer, so every device embeds with the same numbers: exp may differ in the last
    bit between the CPU's and a GPU's math library, and t (up to 999) multiplies that error.
    With the buffer, the embedding on an H200 was within 6e-8 of the CPU's."""
    half = dim // 2
    return torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)


def timestep_embedding(t: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Sinusoidal embedding of integer timesteps (Vaswani et al. 2017): (B,) -> (B, 2 * len(freqs))."""
    angles = t.float()[:, None] * freqs[None, :]                     # (B, dim / 2)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm calling the ATen op directly: F.group_norm's Python-side size check turns
    into a TracerWarning ("Converting a tensor to a Python boolean") under torch.jit.trace."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, plus the embedding as a per-channel shift, GroupNorm-SiLU-conv, skip."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = GroupNorm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, 1, 1)
        self.emb = nn.Linear(emb_dim, c_out)
        self.norm2 = GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))                         # (B, C_out, H, W)
        h = h + self.emb(F.silu(emb))[:, :, None, None]               # + (B, C_out, 1, 1)
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class UNet(nn.Module):
    """One ResBlock per resolution on the way down and up, skips concatenated."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        C, E, G = config.channels, config.emb_dim, config.groups
        widths = [C * m for m in config.channel_mult]                 # e.g. [C, 2C, 2C]
        self.schedule = NoiseSchedule(config.num_train_timesteps, config.beta_schedule,
                                      config.beta_start, config.beta_end)
        self.register_buffer("freqs", timestep_frequencies(C), persistent=False)   # not in checkpoints
        self.time_mlp = nn.Sequential(nn.Linear(C, E), nn.SiLU(), nn.Linear(E, E))
        self.label_emb = nn.Embedding(config.n_classes + 1, E)       # + 1: the null label
        self.conv_in = nn.Conv2d(config.image_channels, C, 3, 1, 1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        c_prev = C
        for i, w in enumerate(widths[:-1]):
            self.down.append(ResBlock(c_prev, w, E, G))
            self.downsample.append(nn.Conv2d(w, w, 3, 2, 1))          # H -> H / 2
            c_prev = w
        self.mid = ResBlock(c_prev, widths[-1], E, G)
        self.up = nn.ModuleList()
        c_prev = widths[-1]
        for w in reversed(widths[:-1]):
            # nearest x2 then this block's conv (no separate upsampling conv: it cost a third of
            # the FLOPs at 8x8 for no visible gain)
            self.up.append(ResBlock(c_prev + w, w, E, G))             # concatenated skip
            c_prev = w
        self.norm_out = GroupNorm(G, c_prev)
        self.conv_out = nn.Conv2d(c_prev, config.image_channels, 3, 1, 1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        emb = self.time_mlp(timestep_embedding(t, self.freqs)) + self.label_emb(label)   # (B, E)
        h = self.conv_in(x_t)                                         # (B, C, S, S)
        skips = []
        for block, down in zip(self.down, self.downsample):
            h = block(h, emb)
            skips.append(h)
            h = down(h)                                               # (B, w, H / 2, W / 2)
        h = self.mid(h, emb)                                          # (B, C_mid, S/4, S/4) for 3 stages
        for block in self.up:
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")   # (B, c, 2H, 2W)
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))                # (B, K, S, S)


Model = UNet


def example_inputs(config: Config, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t ~ N(0, I), t in 0..T-1, labels in 0..n_classes (n_classes = no label)."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, config.image_channels, config.image_size, config.image_size, generator=g),
            torch.randint(0, config.num_train_timesteps, (batch,), generator=g),
            torch.randint(0, config.n_classes + 1, (batch,), generator=g))


def loss(model: UNet, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The simple DDPM loss ||e - eps(x_t, t, y)||^2 with label dropout. In eval mode t, e and the
    dropout come from a fixed seed, so validation losses of different epochs are comparable."""
    x0, label = batch
    c = model.config
    g = None if model.training else torch.Generator().manual_seed(0)
    B = x0.shape[0]
    # drawn on the CPU (its generator) whatever the device, then moved: the same draws on any device
    t = torch.randint(0, c.num_train_timesteps, (B,), generator=g).to(x0.device)
    noise = torch.randn(x0.shape, generator=g).to(x0.device)
    drop = (torch.rand(B, generator=g) < c.p_uncond).to(x0.device)
    label = torch.where(drop, torch.full_like(label, c.null_label), label)
    x_t = model.schedule.add_noise(x0, noise, t)
    return F.mse_loss(model(x_t, t, label), noise)


def make_sampler(config: Config, sampler: str | None = None, steps: int | None = None, eta: float | None = None,
                 seed: int | None = None):
    """A per-request sampler with the config's defaults for anything not given."""
    from training.schedulers.ddim import DDIMSampler
    from training.schedulers.ddpm import DDPMSampler

    schedule = NoiseSchedule(config.num_train_timesteps, config.beta_schedule, config.beta_start, config.beta_end)
    kind = sampler or config.sampler
    if kind == "ddpm":
        return DDPMSampler(schedule, steps, clip_sample=config.clip_sample, seed=seed)
    if kind == "ddim":
        return DDIMSampler(schedule, steps or config.steps, config.eta if eta is None else eta,
                           clip_sample=config.clip_sample, seed=seed, clipped_eps=config.clipped_eps)
    raise ValueError(f"unknown sampler {kind!r}; known: ddpm, ddim")


def generation_defaults(config: Config) -> dict:
    """Sampler defaults and the trained schedule (the manifest's `generation`)."""
    return {"sampler": config.sampler, "steps": config.steps, "eta": config.eta, "guidance": config.guidance,
            "clip_sample": config.clip_sample, "clipped_eps": config.clipped_eps, "timestep_spacing": "leading",
            "num_train_timesteps": config.num_train_timesteps, "beta_schedule": config.beta_schedule,
            "beta_start": config.beta_start, "beta_end": config.beta_end,
            "n_classes": config.n_classes, "null_label": config.null_label,
            "sample_shape": list(sample_shape(config)), "output_range": [-1.0, 1.0]}


def sample_shape(config: Config) -> tuple[int, int, int]:
    """One image: (K, S, S)."""
    return (config.image_channels, config.image_size, config.image_size)
