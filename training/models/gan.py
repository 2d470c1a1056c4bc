"""Class-conditional DCGAN for 8x8 digits (Radford et al. 2016, arXiv:1511.06434; conditioning as
in Mirza & Osindero 2014, arXiv:1411.1784, with a projection discriminator, Miyato & Koyama 2018,
arXiv:1802.05637).

Objective (Goodfellow et al. 2014, arXiv:1406.2661, eq. 1), conditioned on the label y:
    min_G max_D  E_{x,y ~ data}[log D(x, y)] + E_{z ~ N(0, I), y}[log(1 - D(G(z, y), y))]
D is trained on that objective as written; G uses the non-saturating form (section 3 of the
paper): maximise E[log D(G(z, y), y)] instead of minimising E[log(1 - D(G(z, y), y))], which has
strong gradients early when D rejects every sample. With logits l = D(.), -log D = softplus(-l)
and -log(1 - D) = softplus(l).

Conditional GANs on a small set tend to ignore z: measured here, every sample of a digit came out
nearly the same (samples of one digit 0.15-0.25 as far apart as real ones) while the judge still
agreed 93-100 %. G therefore also gets the mode-seeking term of Mao et al. 2019
(arXiv:1903.05628, eq. 3): lambda / (mean|G(z1, y) - G(z2, y)| / mean|z1 - z2|), which rewards
different images for different z of the same label (spread back to ~1.0 of the real data's).

Dimensions: B batch, Z latent size, E label embedding size, C channels, K image channels (1 grey,
3 RGB), S x S the image (8 x 8 for digits; any multiple of 4: the networks work at S/4, S/2, S),
s = S / 4. Images live in [-1, 1] (the data path scales digits' 0..16: training.generative.to_unit,
and an image folder's 0..255: training.user_data); `Model.forward` is the generator, the served
function: (z (B, Z), label (B,)) -> image (B, K, S, S).
The GAN keeps its own two-optimiser loop (`train` below), not training/loop.py; with a run folder it
logs metrics.jsonl and writes run-state checkpoints (training/run_state.py's RunFolder) so that a
killed run resumes exactly. It takes the shared loop's device, precision and tensorboard
(training/devices.py): the batches and z are drawn on the CPU whatever the device, and the model
comes back to the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from training import devices
from training.run_state import RunFolder, tensor_fingerprint

KIND = "sample"
OUTPUT_NAMES = ("image",)


@dataclass
class Config:
    image_size: int = 8         # S, a multiple of 4
    latent_dim: int = 32        # Z
    n_classes: int = 10
    label_dim: int = 32         # E, the generator's label embedding
    g_channels: int = 64        # C of the generator's s x s stage (C / 2 at 2s, C / 4 at S = 4s)
    d_channels: int = 64        # C of the discriminator's s x s stage (C / 2 at 2s, C / 4 at S)
    image_channels: int = 1     # K: 1 grey, 3 RGB

    def __post_init__(self):
        check_image(self.image_size, self.image_channels, 4)
        if self.n_classes < 1:
            raise ValueError(f"n_classes must be 1 or more, not {self.n_classes}")


def check_image(image_size: int, image_channels: int, multiple: int) -> None:
    """ValueError unless the image is S x S with S a positive multiple of `multiple` (the networks
    halve it that many times and double it back) and K 1 or 3 channels."""
    if image_size < multiple or image_size % multiple:
        raise ValueError(f"image_size must be a multiple of {multiple} (the networks halve it and double "
                         f"it back), not {image_size}")
    if image_channels not in (1, 3):
        raise ValueError(f"image_channels must be 1 (grey) or 3 (RGB), not {image_channels}")


PRESETS = {
    "tiny": dict(latent_dim=32, g_channels=128, d_channels=64),
}


@dataclass
class GANTrainConfig:
    steps: int = 1500          # tiny: ~70 s on one thread; judged 98 % at 1000-1500 steps
    batch_size: int = 64
    lr_g: float = 2e-4          # DCGAN: Adam, lr 2e-4, beta1 0.5
    lr_d: float = 2e-4
    betas: tuple[float, float] = (0.5, 0.999)
    mode_seeking: float = 1.0   # lambda of the mode-seeking term (0 = plain DCGAN)
    seed: int = 0
    # with a run folder (train's run_dir): a run-state checkpoint every this many steps, and one at
    # the end; 0: only the one at the end
    checkpoint_every: int = 100


class Generator(nn.Module):
    """(z, y) -> image: project to s x s (s = S / 4), two transposed-conv upsamplings, tanh."""

    def __init__(self, c: Config):
        super().__init__()
        C, s = c.g_channels, c.image_size // 4
        self.embed = nn.Embedding(c.n_classes, c.label_dim)
        self.project = nn.Sequential(nn.Linear(c.latent_dim + c.label_dim, C * s * s, bias=False),
                                     nn.BatchNorm1d(C * s * s), nn.ReLU())
        self.body = nn.Sequential(
            nn.ConvTranspose2d(C, C // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(C // 2), nn.ReLU(),       # 2s
            nn.ConvTranspose2d(C // 2, C // 4, 4, 2, 1, bias=False), nn.BatchNorm2d(C // 4), nn.ReLU(),  # S
            nn.Conv2d(C // 4, c.image_channels, 3, 1, 1), nn.Tanh(),
        )
        self.channels, self.start = C, s

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.project(torch.cat([z, self.embed(label)], dim=1))      # (B, C s s)
        return self.body(h.view(-1, self.channels, self.start, self.start))   # (B, C, s, s) -> (B, K, S, S)


class Discriminator(nn.Module):
    """(x, y) -> logit: strided convs, then psi(h) + <embed(y), h> (the projection)."""

    def __init__(self, c: Config):
        super().__init__()
        C, s = c.d_channels, c.image_size // 4
        self.body = nn.Sequential(
            nn.Conv2d(c.image_channels, C // 4, 3, 1, 1), nn.LeakyReLU(0.2),                     # S
            nn.Conv2d(C // 4, C // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(C // 2), nn.LeakyReLU(0.2),  # 2s
            nn.Conv2d(C // 2, C, 4, 2, 1, bias=False), nn.BatchNorm2d(C), nn.LeakyReLU(0.2),     # s
        )
        self.psi = nn.Linear(C * s * s, 1)
        self.embed = nn.Embedding(c.n_classes, C * s * s)

    def forward(self, x: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        h = self.body(x).flatten(1)                                   # (B, C s s)
        return self.psi(h).squeeze(1) + (self.embed(label) * h).sum(1)   # (B,) logits


class GAN(nn.Module):
    """Generator + discriminator in one checkpoint; forward is the generator (what is served)."""

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    def forward(self, z: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        return self.generator(z, label)   # (B, K, S, S) in [-1, 1]


Model = GAN


def example_inputs(config: Config, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """z ~ N(0, I) and labels 0..n_classes-1."""
    g = torch.Generator().manual_seed(0)
    return (torch.randn(batch, config.latent_dim, generator=g),
            torch.randint(0, config.n_classes, (batch,), generator=g))


def discriminator_loss(model: GAN, real: torch.Tensor, fake: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """-E[log D(x, y)] - E[log(1 - D(G(z, y), y))]: D's side of the min-max objective."""
    d = model.discriminator
    return F.softplus(-d(real, label)).mean() + F.softplus(d(fake, label)).mean()


def generator_loss(model: GAN, fake: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Non-saturating: -E[log D(G(z, y), y)]."""
    return F.softplus(-model.discriminator(fake, label)).mean()


def mode_seeking_loss(model: GAN, fake: torch.Tensor, z: torch.Tensor, label: torch.Tensor,
                      z2: torch.Tensor) -> torch.Tensor:
    """1 / (mean|G(z, y) - G(z2, y)| / mean|z - z2|): small when different z give different images.
    fake = G(z, label); z2 (B', Z) pairs with the first B' rows."""
    n = z2.shape[0]
    ratio = (fake[:n] - model.generator(z2, label[:n])).abs().mean() / (z[:n] - z2).abs().mean()
    return 1.0 / (ratio + 1e-5)


def loss(model: GAN, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Both players' losses on one batch (a monitor: training uses `train`, which steps them apart)."""
    real, label = batch
    z = torch.randn(real.shape[0], model.config.latent_dim).to(real.device)   # the CPU's draw on any device
    fake = model.generator(z, label)
    return discriminator_loss(model, real, fake, label) + generator_loss(model, fake, label)


def train(model: GAN, images: torch.Tensor, labels: torch.Tensor, cfg: GANTrainConfig,
          progress: bool = True, *, run_dir: str | os.PathLike | None = None, resume: bool = False,
          run_config: dict[str, Any] | None = None, device: str | torch.device = "cpu", precision: str = "fp32",
          tensorboard: bool = False) -> dict[str, float]:
    """The DCGAN loop: per step, (1) update D on a real and a fake batch, (2) update G.
    loss_g in the result includes the mode-seeking term.
    images: (N, K, S, S) in [-1, 1]; labels: (N,). Returns the last losses (EMA-smoothed).

    `run_dir` (optional), as loop.train's: metrics.jsonl (loss_d, loss_g each step), a run-state
    checkpoint every `cfg.checkpoint_every` steps and at the end; `resume=True` continues from the
    last one and ends with the same weights as an uninterrupted run (both optimisers, the data and
    noise generator, BatchNorm statistics and the smoothed losses travel); refused
    (run_state.RunStateError) when `run_config`, `cfg` or the data differ from what was recorded.

    `device`, `precision`, `tensorboard`: as loop.train takes them (training/devices.py). The images
    stay on the CPU and every batch and z is drawn there from `gen` (the same draws on any device),
    then moved; both players' losses run under autocast for bf16/fp16 on CUDA, fp16 through one
    GradScaler for both optimisers. The model comes back on the device it was on (the CPU). The
    precision is part of the recorded configuration, the device is not. `tensorboard` (needs
    `run_dir`): metrics.jsonl's scalars as event files in run_dir/tensorboard."""
    device = devices.resolve(device)
    devices.check(device, precision)
    if tensorboard and run_dir is None:
        raise ValueError("tensorboard=True writes into the run folder: give run_dir too")
    home = next(model.parameters()).device
    gen = torch.Generator().manual_seed(cfg.seed)     # data order and every z: one stream (on the CPU)
    torch.manual_seed(cfg.seed)
    model.to(device)   # before the optimisers exist: their state is made beside the parameters
    opt_g = torch.optim.Adam(model.generator.parameters(), lr=cfg.lr_g, betas=cfg.betas)
    opt_d = torch.optim.Adam(model.discriminator.parameters(), lr=cfg.lr_d, betas=cfg.betas)
    scaler = devices.grad_scaler(device, precision)
    smooth = {"loss_d": math.nan, "loss_g": math.nan}
    start, run = 0, None
    try:
        if run_dir is not None:
            config = {"run": run_config or {}, "gan": dataclasses.asdict(cfg), "precision": precision,
                      "data": {"train": tensor_fingerprint((images, labels))}}
            run = RunFolder(run_dir, config, model, _PairedOptimizers(model, opt_g, opt_d),
                            None, gen, scaler, device, tensorboard)   # no scheduler: constant learning rates
            if not resume:
                run.start()
            else:
                state = run.resume()
                if state.finished:
                    return state.result
                start, smooth = state.step, dict(state.extra["smooth"])
        elif resume:
            raise ValueError("resume=True needs the run_dir of the run to resume")
        _steps(model, images, labels, cfg, opt_g, opt_d, gen, smooth, start, run, progress, device, precision, scaler)
        model.eval()
        result = {**smooth, "steps": float(cfg.steps)}
        if run is not None:
            _save(run, cfg.steps, smooth, result)
        return result
    finally:
        model.to(home)   # back where it was (the CPU): judging, the checkpoint and export see it there
        if run is not None:
            run.close()


def _steps(model: GAN, images: torch.Tensor, labels: torch.Tensor, cfg: GANTrainConfig,
           opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer, gen: torch.Generator,
           smooth: dict[str, float], start: int, run: RunFolder | None, progress: bool,
           device: torch.device = torch.device("cpu"), precision: str = "fp32",
           scaler: torch.amp.GradScaler | None = None) -> None:
    """Steps `start`..cfg.steps-1 in place (`smooth` updated: the EMA of each loss). Batches and z are
    drawn on the CPU from `gen` and moved to `device`; the losses run under autocast (`precision`);
    with `scaler` (fp16) both backward passes are scaled, each optimiser steps through it and the
    scale is updated once a step."""
    on = lambda t: t.to(device, non_blocking=True)  # noqa: E731
    n, Z = images.shape[0], model.config.latent_dim
    model.train()
    bar = tqdm(range(start, cfg.steps), desc="GAN", disable=not progress, unit="step", mininterval=1.0,
               initial=start, total=cfg.steps)
    for step in bar:
        idx = torch.randint(0, n, (cfg.batch_size,), generator=gen)
        real, label = on(images[idx]), on(labels[idx])                         # (B, K, S, S), (B,)
        z = on(torch.randn(cfg.batch_size, Z, generator=gen))
        with devices.autocast(device, precision):
            fake = model.generator(z, label)
            # (1) Update D: maximise log D(x, y) + log(1 - D(G(z, y), y))
            loss_d = discriminator_loss(model, real, fake.detach(), label)
        opt_d.zero_grad(set_to_none=True)
        if scaler is None:
            loss_d.backward()
            opt_d.step()
        else:
            scaler.scale(loss_d).backward()
            scaler.step(opt_d)
        # (2) Update G: maximise log D(G(z, y), y) (non-saturating), plus the mode-seeking term
        with devices.autocast(device, precision):
            loss_g = generator_loss(model, fake, label)
            if cfg.mode_seeking > 0:
                z2 = on(torch.randn(cfg.batch_size // 2, Z, generator=gen))
                loss_g = loss_g + cfg.mode_seeking * mode_seeking_loss(model, fake, z, label, z2)
        opt_g.zero_grad(set_to_none=True)
        if scaler is None:
            loss_g.backward()
            opt_g.step()
        else:
            scaler.scale(loss_g).backward()
            scaler.step(opt_g)
            scaler.update()
        raw = {"loss_d": loss_d.item(), "loss_g": loss_g.item()}
        for k, v in raw.items():
            smooth[k] = v if math.isnan(smooth[k]) else 0.98 * smooth[k] + 0.02 * v
        if step % 50 == 0:
            bar.set_postfix(loss_d=f"{smooth['loss_d']:.3f}", loss_g=f"{smooth['loss_g']:.3f}")
        if run is not None:
            run.log(step=step + 1, **raw)
            if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
                _save(run, step + 1, smooth)   # the last step's state is the final checkpoint


def _save(run: RunFolder, step: int, smooth: dict[str, float], result: dict[str, Any] | None = None) -> None:
    """A run-state checkpoint after `step` steps; `result` marks the run finished. The position is
    the step alone (no epochs: batches are drawn with replacement from the data and noise generator,
    saved as it stands), there is no early stopping, and the smoothed losses go in `extra`."""
    run.save(step=step, last_loss=smooth["loss_g"], extra={"smooth": dict(smooth)}, result=result)


class _PairedOptimizers:
    """The generator's and the discriminator's optimisers as the one optimizer state dict a run-state
    checkpoint holds: the generator's parameters are indices 0..n_g-1 (param group 0), the
    discriminator's n_g.. (group 1), the order of model.named_parameters()."""

    def __init__(self, model: GAN, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer):
        self.opt_g, self.opt_d = opt_g, opt_d
        self.n_g = len(list(model.generator.parameters()))

    def state_dict(self) -> dict[str, Any]:
        return merge_optimizers(self.opt_g.state_dict(), self.opt_d.state_dict(), self.n_g)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        g_state, d_state = split_optimizers(state, self.n_g)
        self.opt_g.load_state_dict(g_state)
        self.opt_d.load_state_dict(d_state)


def merge_optimizers(g: dict[str, Any], d: dict[str, Any], n_g: int) -> dict[str, Any]:
    """Two optimizer state dicts as one: d's parameter indices shifted by n_g (group 0: g, group 1: d)."""
    (g_group,), (d_group,) = g["param_groups"], d["param_groups"]
    state = {**g["state"], **{i + n_g: v for i, v in d["state"].items()}}
    return {"state": state, "param_groups": [g_group, {**d_group, "params": [i + n_g for i in d_group["params"]]}]}


def split_optimizers(merged: dict[str, Any], n_g: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The inverse of merge_optimizers."""
    g_group, d_group = merged["param_groups"]
    g = {"state": {i: v for i, v in merged["state"].items() if i < n_g}, "param_groups": [g_group]}
    d = {"state": {i - n_g: v for i, v in merged["state"].items() if i >= n_g},
         "param_groups": [{**d_group, "params": [i - n_g for i in d_group["params"]]}]}
    return g, d


def generation_defaults(config: Config) -> dict:
    """What a server needs to draw samples (the manifest's `generation`)."""
    return {"latent_dim": config.latent_dim, "n_classes": config.n_classes, "latent_distribution": "normal",
            "output_range": [-1.0, 1.0], **digits_scale(config.image_size, config.image_channels)}


def digits_scale(image_size: int, image_channels: int) -> dict:
    """The manifest's `digits_scale` note for a digits-shaped sampler (8 x 8 grey); none for others
    (an image folder's model maps [-1, 1] to 0..255: pixel = (image + 1) * 127.5)."""
    return {"digits_scale": "pixel_0_16 = (image + 1) * 8"} if (image_size, image_channels) == (8, 1) else {}
