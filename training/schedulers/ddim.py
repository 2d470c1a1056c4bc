"""DDIM sampling (Song et al. 2021, arXiv:2010.02502, eq. 12 and 16): any number of steps, and
eta from 0 (deterministic) to 1 (the DDPM posterior variance).

Contract shared with `ddpm.py` (no base class): a per-request sampler object holds the request's
`timesteps` (descending), `eta` and its own random generator; `step(eps, t, x_t, noise) -> x_prev`
is pure given its arguments. The row-wise math is `ddim_step`, with a timestep and an eta per row.

Notation (<variable name> -> <name in the paper>; the paper's alpha is our alpha-bar):
- ab_t, ab_prev -> alpha_t, alpha_{t-1} of the paper: alpha-bar at the current and the next
  timestep of the request (1 after the last step)
- eps -> epsilon_theta(x_t, t); x0 -> f_theta(x_t, t), the predicted x_0 (clipped when asked)

Clipping x_0 alone leaves the direction term on the raw eps. Measured on our tiny digits UNet
(DDIM 50 steps, eta 0), that made guidance destructive: the judge agreed with 94 % of samples at
g = 1, 77 % at g = 2 and 38 % at g = 3. With `clipped_eps` (eps re-derived from the clipped x_0,
as GLIDE does) the same model gave 97 %, 100 % and 100 %.
- std -> sigma_t(eta) = eta * sqrt((1 - ab_prev) / (1 - ab_t)) * sqrt(1 - ab_t / ab_prev), eq. 16
- direction -> "direction pointing to x_t" = sqrt(1 - ab_prev - std^2) * eps
Dimensions: B batch, C channels, H x W the image.
"""

from __future__ import annotations

import torch

from training.schedulers.schedule import NoiseSchedule, RequestSampler, gather


def ddim_step(alphas_cumprod: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor,
              x_t: torch.Tensor, eta: float | torch.Tensor, noise: torch.Tensor | None,
              clip_sample: bool | torch.Tensor = True, clipped_eps: bool | torch.Tensor = False) -> torch.Tensor:
    """x_{t'} for a batch whose rows may sit at different timesteps and use different eta.

    eps, x_t, noise: (B, C, H, W); t, prev_t: (B,) int64 (prev_t = -1 on a row's last step);
    eta, clip_sample, clipped_eps: scalars or (B,) per row. noise may be None where every row has
    eta = 0. clipped_eps re-derives eps from the clipped x_0 (GLIDE; diffusers'
    `use_clipped_model_output`), so that x_0 and the direction term agree.
    """
    n = x_t.dim()
    per_row = (-1, *([1] * (n - 1)))
    ab_t = gather(alphas_cumprod, t, n)                   # (B, 1, 1, 1)
    ab_prev = gather(alphas_cumprod, prev_t, n)           # (B, 1, 1, 1)
    # 1. predicted x_0 (eq. 12, "predicted x_0"), optionally clipped, and eps made consistent with it
    x0 = (x_t - (1 - ab_t) ** 0.5 * eps) / ab_t**0.5
    x0 = torch.where(torch.as_tensor(clip_sample).view(per_row), x0.clamp(-1, 1), x0)
    eps = torch.where(torch.as_tensor(clipped_eps).view(per_row), (x_t - ab_t**0.5 * x0) / (1 - ab_t) ** 0.5, eps)
    # 2. sigma_t(eta) (eq. 16)
    var = (1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)
    std = torch.as_tensor(eta, dtype=x_t.dtype).view(per_row) * var**0.5
    # 3. x_{t'} = sqrt(ab_prev) x0 + direction pointing to x_t + sigma_t z (eq. 12)
    direction = (1 - ab_prev - std**2).clamp(min=0) ** 0.5 * eps
    x_prev = ab_prev**0.5 * x0 + direction
    if noise is None:
        if bool((std > 0).any()):
            raise ValueError("eta > 0 needs noise")
        return x_prev
    return x_prev + std * noise


class DDIMSampler(RequestSampler):
    """One request's DDIM sampler: its timesteps, eta and random generator (per-request state)."""

    def __init__(self, schedule: NoiseSchedule, num_steps: int = 50, eta: float = 0.0, clip_sample: bool = True,
                 spacing: str = "leading", seed: int | None = None, clipped_eps: bool = False):
        if not 0.0 <= eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        self.schedule = schedule
        self.timesteps = schedule.timesteps(num_steps, spacing)   # (S,)
        self.eta = float(eta)
        self.clip_sample = clip_sample
        self.clipped_eps = clipped_eps
        self._seed(seed)

    def needs_noise(self, t: int) -> bool:
        """Whether a step draws noise: only when eta > 0 (eta = 0 is deterministic)."""
        return self.eta > 0

    def draw_noise(self, shape: tuple[int, ...]) -> torch.Tensor:
        """z ~ N(0, I) for one step, from this request's generator."""
        return torch.randn(shape, generator=self.generator)

    def step(self, eps: torch.Tensor, t: int | torch.Tensor, x_t: torch.Tensor,
             noise: torch.Tensor | None = None) -> torch.Tensor:
        """x_{t'} from the denoiser's eps at t (an int, or one timestep per row); noise None draws
        it from this request's generator when eta > 0."""
        t = torch.as_tensor(t, dtype=torch.int64).expand(x_t.shape[0])           # (B,)
        if noise is None and self.eta > 0:
            noise = self.draw_noise(tuple(x_t.shape))
        return ddim_step(self.schedule.alphas_cumprod, eps, t, self.prev_timestep(t), x_t, self.eta, noise,
                         self.clip_sample, self.clipped_eps)
