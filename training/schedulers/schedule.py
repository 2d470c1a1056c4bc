"""The forward (noising) process shared by training and every sampler: betas, alphas_cumprod,
q(x_t | x_0) and the spacing of inference timesteps.

Notation (<variable name> -> <name in the DDPM paper, Ho et al. 2020>):
- betas[t] -> beta_t, the noise variance added at step t
- alphas_cumprod[t] -> alpha-bar_t = prod_{s <= t} (1 - beta_s)
- num_train_timesteps -> T, the trained horizon; timesteps are 0-based, 0..T-1
Dimensions: B batch, C channels, H x W the image, S inference steps.

Conventions follow diffusers (`DDPMScheduler` / `DDIMScheduler`) so that their schedulers,
configured the same, are our test oracle: float32 betas, "squaredcos_cap_v2" is the cosine
schedule of Nichol & Dhariwal 2021 (arXiv:2102.09672, eq. 17) with betas capped at 0.999, and
"leading"/"trailing" spacing is Table 2 of Lin et al. 2023 (arXiv:2305.08891).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
SPACINGS = ("leading", "trailing")


def cosine_betas(num_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Betas that discretise alpha-bar(s) = cos^2((s + 0.008) / 1.008 * pi / 2) over s in [0, 1]."""
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = [min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
             for i in range(num_timesteps)]
    return torch.tensor(betas, dtype=torch.float32)


def make_betas(beta_schedule: str, num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """(T,) float32 betas for a named schedule."""
    if beta_schedule == "linear":                 # DDPM paper: 1e-4 .. 0.02 over T = 1000
        return torch.linspace(beta_start, beta_end, num_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":          # linear in sqrt(beta) (latent diffusion)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(num_timesteps)
    raise ValueError(f"unknown beta schedule {beta_schedule!r}; known: {', '.join(BETA_SCHEDULES)}")


@dataclass(frozen=True)
class NoiseSchedule:
    """The trained noise schedule; immutable and shared by every request of a model."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    betas: torch.Tensor = field(init=False, repr=False, compare=False)           # (T,)
    alphas_cumprod: torch.Tensor = field(init=False, repr=False, compare=False)  # (T,)

    def __post_init__(self):
        betas = make_betas(self.beta_schedule, self.num_train_timesteps, self.beta_start, self.beta_end)
        object.__setattr__(self, "betas", betas)
        object.__setattr__(self, "alphas_cumprod", torch.cumprod(1.0 - betas, dim=0))

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Sample q(x_t | x_0) = N(sqrt(alpha-bar_t) x_0, (1 - alpha-bar_t) I) with the given noise; t: (B,)."""
        ab = self.alphas_cumprod.to(x0.device)[t].view(-1, *([1] * (x0.dim() - 1)))   # (B, 1, 1, 1)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def timesteps(self, num_steps: int, spacing: str = "leading") -> torch.Tensor:
        """(S,) int64 descending timesteps for an S-step sampler.

        leading: 0, r, 2r, ... (r = T // S) reversed, so the last step is t = 0;
        trailing: T-1, T-1-r, ... with r = T / S, so the first step is the fully noised t = T-1.
        """
        T = self.num_train_timesteps
        if not 1 <= num_steps <= T:
            raise ValueError(f"steps must be in 1..{T} (the trained horizon), got {num_steps}")
        if spacing == "leading":
            return torch.arange(num_steps, dtype=torch.int64).flip(0) * (T // num_steps)
        if spacing == "trailing":
            return torch.round(torch.arange(T, 0, -T / num_steps, dtype=torch.float64)).to(torch.int64) - 1
        raise ValueError(f"unknown timestep spacing {spacing!r}; known: {', '.join(SPACINGS)}")


def gather(values: torch.Tensor, t: torch.Tensor, ndim: int, default: float = 1.0) -> torch.Tensor:
    """values[t] per row, shaped (B, 1, ..., 1) to broadcast over an ndim sample; t < 0 gives
    `default` (alpha-bar before the first step is 1)."""
    picked = torch.where(t >= 0, values[t.clamp(min=0)], torch.tensor(default, dtype=values.dtype))
    return picked.view(-1, *([1] * (ndim - 1)))


def previous_timesteps(timesteps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """For each row's t (one of `timesteps`, descending), the timestep that follows it, -1 after the last."""
    index = (timesteps.view(1, -1) == t.view(-1, 1)).int().argmax(dim=1)       # (B,)
    if not bool((timesteps[index] == t).all()):
        raise ValueError(f"timesteps {t.tolist()} are not all in this sampler's schedule")
    padded = torch.cat([timesteps, timesteps.new_tensor([-1])])                # (S + 1,)
    return padded[index + 1]


class RequestSampler:
    """What every per-request sampler shares: its own random generator (seeded: the same seed gives
    the same sample, alone or batched), the starting noise, and the walk along its timesteps."""

    timesteps: torch.Tensor     # (S,) descending

    def _seed(self, seed: int | None) -> None:
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else torch.Generator()
        if seed is None:
            self.generator.seed()

    def initial_sample(self, shape: tuple[int, ...]) -> torch.Tensor:
        """x_T ~ N(0, I) from this request's generator."""
        return torch.randn(shape, generator=self.generator)

    def prev_timestep(self, t: torch.Tensor) -> torch.Tensor:
        """(B,) the timestep after each row's t in this request's schedule (-1 after the last)."""
        return previous_timesteps(self.timesteps, t)
