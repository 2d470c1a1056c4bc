"""The denoising loop, with classifier-free guidance, over a denoiser function.

A denoiser is any function `(x_t (B, C, H, W) float32, t (B,) int64, label (B,) int64) -> eps`
(the eager UNet, an ONNX Runtime session, ...). Guidance (Ho & Salimans 2022, arXiv:2207.12598):
    eps = eps(x_t, t, null) + g * (eps(x_t, t, label) - eps(x_t, t, null))
g = 1 is the plain conditional model, g = 0 the unconditional one; rows whose label is the null
label are unconditional whatever g is. The conditional and unconditional rows of a batch go
through the denoiser as one call.

Two ways to run it:
- `generate(denoiser, sampler, labels, ...)`: one request's loop, the diffusers pipeline loop
  written out (timesteps -> denoiser -> sampler.step).
- `DenoiseRequest` + `step_requests(denoiser, requests)`: requests at different timesteps (and
  with different samplers, step counts, eta, guidance) share one denoiser call per step; each
  request keeps its own sampler state and generator, so a seeded request draws the same noise
  whatever else is in the batch. This is what a serving engine's step looks like.
Dimensions: B batch (rows), C channels, H x W the image, S steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from training.schedulers.ddim import DDIMSampler, ddim_step
from training.schedulers.ddpm import DDPMSampler, ddpm_step

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
Sampler = DDPMSampler | DDIMSampler


def guided_eps(denoiser: Denoiser, x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor,
               guidance: float | torch.Tensor, null_label: int) -> torch.Tensor:
    """Classifier-free guided eps for a batch; t, label, guidance per row (guidance may be a scalar)."""
    B = x_t.shape[0]
    g = torch.as_tensor(guidance, dtype=x_t.dtype).expand(B)                   # (B,)
    guided = (label != null_label) & (g != 1)              # rows that also need an unconditional eps
    rows = guided.nonzero().flatten()                      # (G,)
    x_in = torch.cat([x_t, x_t[rows]])                     # (B + G, C, H, W)
    t_in = torch.cat([t, t[rows]])
    label_in = torch.cat([label, torch.full_like(rows, null_label)])
    eps_all = denoiser(x_in, t_in, label_in)               # (B + G, C, H, W): one call
    eps = eps_all[:B].clone()
    eps_cond, eps_uncond = eps_all[:B][rows], eps_all[B:]
    eps[rows] = eps_uncond + g[rows].view(-1, *([1] * (x_t.dim() - 1))) * (eps_cond - eps_uncond)
    return eps


@torch.no_grad()
def generate(denoiser: Denoiser, sampler: Sampler, labels: torch.Tensor, guidance: float, null_label: int,
             shape: tuple[int, ...] = (1, 8, 8)) -> torch.Tensor:
    """One request: len(labels) images (B, *shape) drawn with `sampler` (seeded by its generator)."""
    x = sampler.initial_sample((labels.shape[0], *shape))                     # x_T
    for t in sampler.timesteps.tolist():
        t_rows = torch.full_like(labels, t)                                    # (B,)
        eps = guided_eps(denoiser, x, t_rows, labels, guidance, null_label)
        x = sampler.step(eps, t, x)
    return x


@dataclass
class DenoiseRequest:
    """One request inside a batched denoising loop; the engine owns it and steps it."""

    # per-request scheduler state: timesteps, eta, generator
    sampler: Sampler
    # (n,) int64 requested labels (null_label = unconditional)
    label: torch.Tensor
    # classifier-free guidance scale g
    guidance: float
    # (n, C, H, W) the current sample x_t; starts at x_T from the sampler's generator
    x: torch.Tensor | None = None
    # index into sampler.timesteps of the next step; == len(timesteps) when finished
    position: int = 0

    def start(self, shape: tuple[int, ...] = (1, 8, 8)) -> "DenoiseRequest":
        """Draw x_T from the request's own generator."""
        self.x = self.sampler.initial_sample((self.label.shape[0], *shape))
        return self

    @property
    def done(self) -> bool:
        return self.position >= len(self.sampler.timesteps)

    @property
    def t(self) -> int:
        """The timestep the next step runs at."""
        return int(self.sampler.timesteps[self.position])


def _stack_rows(requests: list[DenoiseRequest], values: Callable[[DenoiseRequest], torch.Tensor]) -> torch.Tensor:
    return torch.cat([values(r).expand(r.label.shape[0], *values(r).shape[1:]) for r in requests])


def step_rows(requests: list[DenoiseRequest], eps: torch.Tensor) -> None:
    """Advance each request one step from its rows of `eps`, stepping rows of the same sampler
    kind together with a timestep (and eta) per row. Noise comes from each request's generator.
    All requests belong to one model, so they share its noise schedule."""
    offsets, start = {}, 0
    for r in requests:
        offsets[id(r)] = slice(start, start + r.label.shape[0])
        start += r.label.shape[0]
    for kind in (DDPMSampler, DDIMSampler):
        group = [r for r in requests if isinstance(r.sampler, kind)]
        if not group:
            continue
        eps_g = torch.cat([eps[offsets[id(r)]] for r in group])                # (G, C, H, W)
        x_g = torch.cat([r.x for r in group])
        t = _stack_rows(group, lambda r: torch.tensor([r.t]))                  # (G,)
        prev_t = _stack_rows(group, lambda r: r.sampler.prev_timestep(torch.tensor([r.t])))
        clip = _stack_rows(group, lambda r: torch.tensor([r.sampler.clip_sample]))
        noise = torch.cat([r.sampler.draw_noise(tuple(r.x.shape)) if r.sampler.needs_noise(r.t)
                           else torch.zeros_like(r.x) for r in group])
        if kind is DDPMSampler:
            x_prev = ddpm_step(group[0].sampler.schedule.alphas_cumprod, eps_g, t, prev_t, x_g, noise, clip)
        else:
            eta = _stack_rows(group, lambda r: torch.tensor([r.sampler.eta]))
            clipped_eps = _stack_rows(group, lambda r: torch.tensor([r.sampler.clipped_eps]))
            x_prev = ddim_step(group[0].sampler.schedule.alphas_cumprod, eps_g, t, prev_t, x_g, eta, noise, clip,
                               clipped_eps)
        for r, x in zip(group, x_prev.split([r.label.shape[0] for r in group])):
            r.x, r.position = x, r.position + 1


@torch.no_grad()
def step_requests(denoiser: Denoiser, requests: list[DenoiseRequest], null_label: int) -> None:
    """One engine step: every unfinished request's rows through one (guided) denoiser call, then
    one sampler step each."""
    active = [r for r in requests if not r.done]
    if not active:
        return
    x = torch.cat([r.x for r in active])                                       # (B, C, H, W)
    t = _stack_rows(active, lambda r: torch.tensor([r.t]))                     # (B,)
    label = torch.cat([r.label for r in active])
    guidance = _stack_rows(active, lambda r: torch.tensor([float(r.guidance)]))
    step_rows(active, guided_eps(denoiser, x, t, label, guidance, null_label))
