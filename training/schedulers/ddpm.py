"""DDPM ancestral sampling (Ho et al. 2020, arXiv:2006.11239, Algorithm 2 and eq. 6-7).

Contract shared with `ddim.py` (no base class): a per-request sampler object holds the request's
`timesteps` (descending) and its own random generator; `step(eps, t, x_t, noise) -> x_prev` is
pure given its arguments, so an engine can keep many requests at different timesteps and run
their denoiser calls as one batch. The row-wise math is the module function `ddpm_step`, which
takes a timestep per row.

Notation (<variable name> -> <name in the paper>):
- ab_t, ab_prev -> alpha-bar_t, alpha-bar_{t'} (t' the next timestep of the request; t = t - 1
  when every step is taken; alpha-bar = 1 after the last step)
- beta_t -> beta_t = 1 - alpha-bar_t / alpha-bar_{t'} (the effective beta when steps are skipped)
- x0 -> the predicted x_0 of eq. 15, clipped to [-1, 1] when clip_sample
- mean, var -> mu-tilde_t and beta-tilde_t of the posterior q(x_{t'} | x_t, x_0), eq. 7
Dimensions: B batch, C channels, H x W the image.
"""

from __future__ import annotations

import torch

from training.schedulers.schedule import NoiseSchedule, RequestSampler, gather


def ddpm_step(alphas_cumprod: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor,
              x_t: torch.Tensor, noise: torch.Tensor | None, clip_sample: bool | torch.Tensor = True) -> torch.Tensor:
    """x_{t'} for a batch whose rows may sit at different timesteps.

    eps, x_t, noise: (B, C, H, W); t, prev_t: (B,) int64 (prev_t = -1 on a row's last step);
    clip_sample: a bool or a (B,) bool per row. No noise is added on rows at t = 0.
    """
    n = x_t.dim()
    ab_t = gather(alphas_cumprod, t, n)                   # (B, 1, 1, 1)
    ab_prev = gather(alphas_cumprod, prev_t, n)           # (B, 1, 1, 1)
    beta_t = 1 - ab_t / ab_prev
    # 1. predicted x_0 from the predicted noise (eq. 15), optionally clipped to the data range
    x0 = (x_t - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
    clip = torch.as_tensor(clip_sample).view(-1, *([1] * (n - 1)))
    x0 = torch.where(clip, x0.clamp(-1, 1), x0)
    # 2. posterior mean mu-tilde_t(x_t, x_0) (eq. 7)
    mean = (ab_prev**0.5 * beta_t / (1 - ab_t)) * x0 + ((1 - beta_t) ** 0.5 * (1 - ab_prev) / (1 - ab_t)) * x_t
    if noise is None:
        return mean
    # 3. add sigma_t z with sigma_t^2 = beta-tilde_t (eq. 7); none at t = 0
    var = ((1 - ab_prev) / (1 - ab_t) * beta_t).clamp(min=1e-20)
    keep = (t > 0).view(-1, *([1] * (n - 1)))
    return mean + torch.where(keep, var**0.5 * noise, torch.zeros_like(noise))


class DDPMSampler(RequestSampler):
    """One request's ancestral sampler: its timesteps and its random generator (per-request state)."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int | None = None, clip_sample: bool = True,
                 spacing: str = "leading", seed: int | None = None):
        self.schedule = schedule
        # DDPM proper takes every step; fewer steps skip with the effective beta (as diffusers does)
        self.timesteps = schedule.timesteps(num_steps or schedule.num_train_timesteps, spacing)   # (S,)
        self.clip_sample = clip_sample
        self._seed(seed)

    def needs_noise(self, t: int) -> bool:
        """Whether a step at t draws noise (all but the final t = 0)."""
        return int(t) > 0

    def draw_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """z ~ N(0, I) for one step, from this request's generator."""
        return torch.randn(shape, generator=self.generator)

    def step(self, eps: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_{t'} from the denoiser's eps at t (an int, or one timestep per row); noise None draws
        it from this request's generator."""
        t = torch.as_tensor(t, dtype=torch.int64).expand(x_t.shape[0])           # (B,)
        if noise is None and bool((t > 0).any()):
            noise = self.draw_noise(tuple(x_t.shape))
        return ddpm_step(self.schedule.alphas_cumprod, eps, t, self.prev_timestep(t), x_t, noise, self.clip_sample)
