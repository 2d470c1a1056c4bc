"""The denoise engine's loop on a torch device (issue 18): the UNet's batch, the scheduler
arithmetic and the guidance stay on the device from a request's first step to its last.

    DeviceLoop.step(requests)       # every running request's rows as ONE batch on the device
        t, t' = table[row, pos], table[row, pos + 1]      gathered on the device; then pos += 1
        eps   = UNet(x ++ x[guided], t ++ t[guided], label ++ null)  (one call) -> guidance
        x     = ddpm_step / ddim_step per row  (training.schedulers: the CPU loop's own functions)

The batch (`DeviceBatch`: x, labels, guidance, eta, clipping, sampler kind, a row's timesteps
padded with -1, its position) is built when the set of running requests changes (a request
joins or leaves) and lives on the device between steps; the host keeps only the books (which
request, which step). What crosses: per request, its labels and timesteps when it joins, its
noise as below, and its images once when it leaves (the only device-to-host copy). No step
waits on the host: nothing in the loop reads a device value back (the guided rows are known on
the host when the batch is built, so no `nonzero()` on the device).

Noise keeps the CPU loop's per-request generator semantics (a seeded request gives the same
image alone or in any batch), from one of two sources:
- "host" (the default): x_T and each step's z from the request's own CPU generator (the
  sampler's), in exactly the order the CPU loop draws them, a block of steps ahead
  (`max_noise_elements` per request; all of a request's steps for small images) and copied to the
  device in one non-blocking copy per block from pinned memory. A seed gives the same image on
  every device, and on the CPU the same numbers as the CPU loop.
- "device": a generator on the device seeded with the request's seed; nothing crosses, but a seed
  gives other numbers on CUDA than on the CPU (on the CPU the same as "host").

On the CPU (torch tensors on `cpu`, ZOOSERVE_DENOISE_ON_DEVICE=1) the same code runs, and the
tests hold it to the CPU loop within 1e-5 (tests/serve/test_device_denoise.py).
Dimensions: B rows, C channels, H x W the image, S steps.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from training.schedulers.ddim import ddim_step
from training.schedulers.ddpm import DDPMSampler, ddpm_step

NOISE_SOURCES = ("host", "device")
MAX_NOISE_ELEMENTS = 1 << 22       # per request and block of pre-drawn host noise: 16 MiB of float32


def to_device(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`: from pinned memory with a non-blocking copy on CUDA (torch's
    caching host allocator keeps the pinned block until the copy is done), as it is on the CPU."""
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def device_denoiser(runtime, part) -> Callable:
    """A TorchScript runtime's module as a denoiser whose tensors stay on its device."""
    names = [s.name for s in part.inputs]                       # x_t, t, label: the loop's order
    order = [names.index(n) for n in runtime.input_names]
    out = runtime.output_names.index(part.outputs[0].name)

    def denoise(x_t, t, label):
        args = (x_t, t, label)
        with torch.inference_mode():
            outs = runtime.module(*[args[i] for i in order])
        return (outs if isinstance(outs, tuple) else (outs,))[out]
    return denoise


class HostNoise:
    """x_T and the steps' z from the sampler's own CPU generator, in the CPU loop's order."""

    def __init__(self, sampler, shape: tuple[int, ...], device: torch.device,
                 max_elements: int = MAX_NOISE_ELEMENTS):
        self.generator, self.shape, self.device = sampler.generator, shape, device
        needs = [sampler.needs_noise(t) for t in sampler.timesteps.tolist()]
        drawn_before = [0, *itertools.accumulate(needs)]
        self.draw = [drawn_before[i] if need else -1 for i, need in enumerate(needs)]   # position -> draw
        self.draws = drawn_before[-1]
        self.block_steps = max(1, max_elements // max(1, math.prod(shape)))
        self._block: torch.Tensor | None = None       # (K, n, C, H, W) on the device
        self._first = 0                               # the draw index of the block's first row

    def initial(self) -> torch.Tensor:
        """x_T (n, C, H, W) on the device: the generator's first draw, as sampler.initial_sample."""
        return to_device(torch.randn(self.shape, generator=self.generator), self.device)

    def at(self, position: int) -> torch.Tensor | None:
        """The z of the step at `position` (None where the step draws none); steps go in order."""
        k = self.draw[position]
        if k < 0:
            return None
        if self._block is None or not self._first <= k < self._first + self._block.shape[0]:
            count = min(self.block_steps, self.draws - k)
            host = torch.stack([torch.randn(self.shape, generator=self.generator) for _ in range(count)])
            self._block, self._first = to_device(host, self.device), k
        return self._block[k - self._first]


class DeviceNoise:
    """x_T and the steps' z from a generator on the device, seeded with the request's seed."""

    def __init__(self, sampler, seed: int | None, shape: tuple[int, ...], device: torch.device):
        self.generator = torch.Generator(device=device)
        if seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(seed)
        self.shape, self.device = shape, device
        self.needs = [sampler.needs_noise(t) for t in sampler.timesteps.tolist()]

    def initial(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.generator, device=self.device)

    def at(self, position: int) -> torch.Tensor | None:
        if not self.needs[position]:
            return None
        return torch.randn(self.shape, generator=self.generator, device=self.device)


@dataclass(eq=False)
class DeviceRequest:
    """One request inside the device loop (the engine's `job.request`)."""

    sampler: object                  # DDPMSampler | DDIMSampler: timesteps, eta, clipping (host)
    label: torch.Tensor              # (n,) int64 on the host (null label = unconditional)
    guidance: float
    seed: int | None
    noise: HostNoise | DeviceNoise | None = None
    x: torch.Tensor | None = None    # (n, C, H, W) on the device: x_t, the images once done
    position: int = 0                # index into sampler.timesteps of the next step

    @property
    def done(self) -> bool:
        return self.position >= len(self.sampler.timesteps)

    @property
    def rows(self) -> int:
        return int(self.label.shape[0])


class DeviceBatch:
    """The running requests' rows on the device, built when the set of requests changes."""

    def __init__(self, requests: list[DeviceRequest], device: torch.device, null_label: int):
        self.requests = list(requests)
        sizes = [r.rows for r in requests]
        starts = [0, *itertools.accumulate(sizes)][:-1]
        self.slices = [slice(s, s + n) for s, n in zip(starts, sizes)]
        B, S = sum(sizes), max(len(r.sampler.timesteps) for r in requests)

        def per_row(value: Callable[[DeviceRequest], object], dtype) -> torch.Tensor:
            return torch.tensor([value(r) for r in requests for _ in range(r.rows)], dtype=dtype)

        # host side first (the books know all of it), then one copy each to the device
        label = torch.cat([r.label for r in requests])                                # (B,)
        guidance = per_row(lambda r: float(r.guidance), torch.float32)                # (B,)
        rows = ((label != null_label) & (guidance != 1)).nonzero().flatten()          # (G,) guided rows
        table = torch.full((B, S + 1), -1, dtype=torch.int64)                         # timesteps, -1 after
        for r, sl in zip(requests, self.slices):
            table[sl, :len(r.sampler.timesteps)] = r.sampler.timesteps
        ddpm = per_row(lambda r: isinstance(r.sampler, DDPMSampler), torch.bool)
        self.any_ddpm, self.any_ddim = bool(ddpm.any()), not bool(ddpm.all())
        host = dict(
            label=label, rows=rows, table=table, ddpm=ddpm,
            position=per_row(lambda r: r.position, torch.int64),
            label_in=torch.cat([label, torch.full_like(rows, null_label)]),           # (B + G,)
            g_rows=guidance[rows],                                                    # (G,)
            eta=per_row(lambda r: float(getattr(r.sampler, "eta", 0.0)), torch.float32),
            clip=per_row(lambda r: bool(r.sampler.clip_sample), torch.bool),
            clipped_eps=per_row(lambda r: bool(getattr(r.sampler, "clipped_eps", False)), torch.bool))
        for name, value in host.items():
            setattr(self, name, to_device(value, device))
        self.guided = int(rows.numel())
        self.x = torch.cat([r.x for r in requests])                                   # (B, C, H, W): on the device
        self.zeros = torch.zeros_like(self.x)

    def holds(self, requests: list[DeviceRequest]) -> bool:
        return len(requests) == len(self.requests) and all(a is b for a, b in zip(requests, self.requests))

    def guided_eps(self, denoiser, t: torch.Tensor) -> torch.Tensor:
        """Classifier-free guided eps (as training.schedulers.pipeline.guided_eps, with the guided
        rows known from the books): one denoiser call over the rows and their unconditional twins."""
        B, x = self.x.shape[0], self.x
        if not self.guided:
            return denoiser(x, t, self.label)
        x_in = torch.cat([x, x.index_select(0, self.rows)])                           # (B + G, C, H, W)
        t_in = torch.cat([t, t.index_select(0, self.rows)])
        eps_all = denoiser(x_in, t_in, self.label_in)
        eps = eps_all[:B].clone()
        eps_cond, eps_uncond = eps_all[:B].index_select(0, self.rows), eps_all[B:]
        guided = eps_uncond + self.g_rows.view(-1, *([1] * (x.dim() - 1))) * (eps_cond - eps_uncond)
        return eps.index_copy_(0, self.rows, guided)

    def noise(self) -> torch.Tensor:
        """(B, C, H, W) this step's z: each request's own, zeros where its step draws none."""
        drawn = [r.noise.at(r.position) for r in self.requests]
        if all(z is None for z in drawn):
            return self.zeros
        parts = [self.zeros[sl] if z is None else z for z, sl in zip(drawn, self.slices)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)


class DeviceLoop:
    """The engine's loop with every tensor on `device` (the engine's `loop`; the CPU one is
    serve/engines/denoise.HostLoop). `denoiser` takes and returns tensors on the device."""

    def __init__(self, denoiser: Callable, device: torch.device, alphas_cumprod: torch.Tensor, null_label: int,
                 noise: str = "host", max_noise_elements: int = MAX_NOISE_ELEMENTS):
        if noise not in NOISE_SOURCES:
            raise ValueError(f"noise must be one of {', '.join(NOISE_SOURCES)}, not {noise!r}")
        self.denoiser, self.device, self.null_label = denoiser, torch.device(device), null_label
        self.noise, self.max_noise_elements = noise, max_noise_elements
        self.alphas_cumprod = alphas_cumprod.to(self.device)                         # (T,)
        self.where = f"{self.device.type} (torch loop, noise from the {noise})"
        self._batch: DeviceBatch | None = None

    def private(self) -> "DeviceLoop":
        """A loop over the same model with a batch of its own (for a caller outside the engine thread)."""
        return DeviceLoop(self.denoiser, self.device, self.alphas_cumprod, self.null_label, self.noise,
                          self.max_noise_elements)

    def request(self, sampler, labels: torch.Tensor, guidance: float, seed: int | None) -> DeviceRequest:
        return DeviceRequest(sampler, labels, float(guidance), seed)

    def start(self, request: DeviceRequest, shape: tuple[int, ...]) -> None:
        """x_T on the device, from the request's noise source."""
        full = (request.rows, *shape)
        request.noise = (HostNoise(request.sampler, full, self.device, self.max_noise_elements)
                         if self.noise == "host" else DeviceNoise(request.sampler, request.seed, full, self.device))
        request.x = request.noise.initial()

    def images(self, request: DeviceRequest):
        """The finished request's images on the host (numpy): the one device-to-host copy."""
        return request.x.to("cpu").numpy()

    def step(self, requests: list[DeviceRequest]) -> None:
        """One step of every unfinished request: one (guided) denoiser call over the batch, then
        each row's DDPM or DDIM step, all on the device."""
        active = [r for r in requests if not r.done]
        if not active:
            return
        with torch.inference_mode():
            if self._batch is None or not self._batch.holds(active):
                self._batch = DeviceBatch(active, self.device, self.null_label)
            b, ac = self._batch, self.alphas_cumprod
            t = b.table.gather(1, b.position.view(-1, 1)).view(-1)                    # (B,)
            prev_t = b.table.gather(1, (b.position + 1).view(-1, 1)).view(-1)         # (B,) -1 after the last
            eps = b.guided_eps(self.denoiser, t)
            noise, x = b.noise(), b.x
            if b.any_ddpm:
                x_ddpm = ddpm_step(ac, eps, t, prev_t, x, noise, b.clip)
            if b.any_ddim:
                x_ddim = ddim_step(ac, eps, t, prev_t, x, b.eta, noise, b.clip, b.clipped_eps)
            if b.any_ddpm and b.any_ddim:
                x = torch.where(b.ddpm.view(-1, *([1] * (x.dim() - 1))), x_ddpm, x_ddim)
            else:
                x = x_ddpm if b.any_ddpm else x_ddim
            b.x = x
            b.position += 1
            for r, sl in zip(b.requests, b.slices):
                r.x, r.position = x[sl], r.position + 1

    def reset(self) -> None:
        """Forget the batch (the engine restarted)."""
        self._batch = None
