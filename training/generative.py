"""Train, sample and judge the generative families (gan, vae, diffusion) on digits.

The data path: every generative family works on images in [-1, 1]; digits' raw 0..16 values
are scaled here, by `to_unit` (x / 8 - 1) in `digits_unit`, and the judge maps samples back
with `training.judge.to_digits`. (The classifiers, by contrast, take raw 0..16 and scale inside
the model.)

Quality is judged by a digits classifier (training/judge.py) and stored in the checkpoint's
lineage metrics, so the registry shows it:
- gan:       judge_agreement (class-conditional), judge_entropy, spread_ratio
- vae:       judge_entropy (unconditional: prior samples), spread_ratio (by judged label),
             test_neg_elbo (nats per image)
- diffusion: judge_agreement_ddim50, spread_ratio_ddim50, judge_entropy_ddim50_uncond, and
             with a DDPM budget judge_agreement_ddpm (all T steps; costly, so fewer samples)
spread_ratio: how far apart samples of one digit are, over the same for real digits (a
generator that ignores its noise scores near 0 yet can still please the judge).
`python -m training.generative` trains the tiny presets into runs/generative (~10 min on one
thread, half of it judging DDPM samples), stores the full metrics in each checkpoint's meta and
writes the 10 x 10 sample grids (row = requested digit) to docs/images.
Dimensions: N samples, Z latent size.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from training import checkpoint, data, judge, loop
from training.families import family_module, make_config

GENERATIVE = ("gan", "vae", "diffusion")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """digits' 0..16 -> [-1, 1]."""
    return images / 8.0 - 1.0


def digits_unit(seed: int = 0) -> data.Split:
    """The digits split (the classifiers' split, same seed) with images in [-1, 1]."""
    split = data.digits(seed=seed)

    def scale(part: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return to_unit(part[0]), part[1]
    return dataclasses.replace(split, train=scale(split.train), val=scale(split.val), test=scale(split.test))


@dataclass
class EvalConfig:
    per_class: int = 50         # class-conditional samples per digit (GAN, diffusion DDIM)
    unconditional: int = 500    # unconditional samples (VAE prior, diffusion with the null label)
    ddpm_per_class: int = 0     # DDPM runs all T steps: 0 skips it
    seed: int = 1234
    judge_dir: str | None = None   # a trained judge checkpoint to reuse (else one is trained)


FULL_EVAL = EvalConfig(per_class=100, unconditional=1000, ddpm_per_class=10)


def train_config(family: str, preset: str):
    """The training recipe of a generative preset (tiny: a few minutes on one thread)."""
    if family == "gan":
        return family_module("gan").GANTrainConfig(steps=1500)
    if family == "vae":
        return loop.TrainConfig(epochs=100, batch_size=64, lr=3e-3, weight_decay=0.0, warmup_steps=20, patience=10)
    if family == "diffusion":
        return loop.TrainConfig(epochs=80, batch_size=128, lr=2e-3, weight_decay=0.0, warmup_steps=50,
                                patience=80)
    raise ValueError(f"{family!r} is not a generative family; known: {', '.join(GENERATIVE)}")


def draw_latents(family: str, config, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What a GAN or VAE sample starts from, as `sample` (and the server) draw it: z (N, Z) ~ N(0, I)
    from torch.Generator().manual_seed(seed), then, for the GAN, a uniform class from the same
    generator for every label < 0 ("unconditional": the GAN has no label-free mode, and a uniform
    label samples the marginal over digits). Returns (z, the labels used)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(labels.shape[0], config.latent_dim, generator=g)
    free = labels < 0
    if family == "gan" and bool(free.any()):
        labels = labels.clone()
        labels[free] = torch.randint(0, config.n_classes, (int(free.sum()),), generator=g)
    return z, labels


@torch.no_grad()
def sample(family: str, model: torch.nn.Module, config, labels: torch.Tensor, seed: int, **sampler_kw) -> torch.Tensor:
    """Images (N, 1, 8, 8) in [-1, 1]; labels (N,), -1 = unconditional (the VAE ignores them; the GAN
    draws a uniform class, see `draw_latents`; diffusion takes its null label).
    Diffusion: sampler_kw picks `sampler`, `steps`, `eta`, `guidance` (config defaults otherwise)."""
    model.eval()
    if family == "gan":
        return model(*draw_latents(family, config, labels, seed))
    if family == "vae":
        return model(draw_latents(family, config, labels, seed)[0])
    if family == "diffusion":
        from training.schedulers.pipeline import generate

        guidance = sampler_kw.pop("guidance", config.guidance)
        sampler = family_module("diffusion").make_sampler(config, seed=seed, **sampler_kw)
        labels = torch.where(labels < 0, config.null_label, labels)
        return generate(model, sampler, labels, guidance, config.null_label,
                        shape=(1, config.image_size, config.image_size))
    raise ValueError(f"{family!r} is not a generative family")


def spread_ratio(images: torch.Tensor, labels: torch.Tensor) -> float:
    """judge.spread of samples over that of the real training digits (1 = as varied as the data)."""
    real = digits_unit(seed=0).train
    return judge.spread(images, labels) / judge.spread(*real)


def evaluate(family: str, model: torch.nn.Module, config, cfg: EvalConfig,
             judge_model: torch.nn.Module) -> tuple[dict[str, float], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Judge samples; returns (metrics, {name: (images, requested labels)})."""
    per_class = torch.arange(10).repeat_interleave(cfg.per_class)             # (N,) 0,0,..,1,1,..
    metrics, samples = {}, {}
    if family == "gan":
        images = sample(family, model, config, per_class, cfg.seed)
        judged = judge.judge(judge_model, images)
        metrics.update(judge_agreement=judge.agreement(judged, per_class), judge_entropy=judge.label_entropy(judged),
                       spread_ratio=spread_ratio(images, per_class))
        samples["gan"] = (images, per_class)
    elif family == "vae":
        none = torch.full((cfg.unconditional,), -1)
        images = sample(family, model, config, none, cfg.seed)
        judged = judge.judge(judge_model, images)
        metrics.update(judge_entropy=judge.label_entropy(judged), spread_ratio=spread_ratio(images, judged))
        samples["vae"] = (images, none)
    else:
        images = sample(family, model, config, per_class, cfg.seed, sampler="ddim", steps=50)
        metrics["judge_agreement_ddim50"] = judge.agreement(judge.judge(judge_model, images), per_class)
        metrics["spread_ratio_ddim50"] = spread_ratio(images, per_class)
        samples["diffusion-ddim"] = (images, per_class)
        null = torch.full((cfg.unconditional,), config.null_label)
        uncond = sample(family, model, config, null, cfg.seed + 1, sampler="ddim", steps=50)
        metrics["judge_entropy_ddim50_uncond"] = judge.label_entropy(judge.judge(judge_model, uncond))
        if cfg.ddpm_per_class:
            requested = torch.arange(10).repeat_interleave(cfg.ddpm_per_class)
            images = sample(family, model, config, requested, cfg.seed + 2, sampler="ddpm")
            metrics["judge_agreement_ddpm"] = judge.agreement(judge.judge(judge_model, images), requested)
            samples["diffusion-ddpm"] = (images, requested)
    return metrics, samples


def _fit(family: str, model: torch.nn.Module, split: data.Split, train_cfg, progress: bool) -> dict[str, float]:
    fam = family_module(family)
    if family == "gan":
        return fam.train(model, *split.train, train_cfg, progress=progress)
    result = loop.train(model, fam.loss, split.train, split.val, train_cfg, progress=progress)
    metrics = {"val_loss": result["best_val_loss"], "epochs_run": float(result["epochs_run"]),
               "steps": float(result["steps"])}
    if family == "vae":
        metrics["test_neg_elbo"] = loop.evaluate(model, fam.loss, split.test)
    return metrics


def train_generative(family: str, preset: str, out_dir: str | Path, progress: bool = True,
                     eval_cfg: EvalConfig | None = EvalConfig(), train_cfg=None,
                     ) -> tuple[dict[str, float], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Train a generative preset, judge its samples (unless eval_cfg is None) and write a checkpoint
    whose lineage holds the metrics; returns (metrics, judged samples)."""
    from training.train import code_revision

    fam = family_module(family)
    config = make_config(family, preset)
    train_cfg = train_cfg or train_config(family, preset)
    split = digits_unit(seed=0)
    torch.manual_seed(train_cfg.seed)
    model = fam.Model(config)
    started = time.perf_counter()
    metrics = _fit(family, model, split, train_cfg, progress)
    metrics["train_seconds"] = time.perf_counter() - started
    samples = {}
    if eval_cfg is not None:
        started = time.perf_counter()
        judge_model = judge.load_judge(eval_cfg.judge_dir)
        quality, samples = evaluate(family, model, config, eval_cfg, judge_model)
        metrics.update(quality, eval_seconds=time.perf_counter() - started)
    meta = {
        "family": family,
        "labels": data.DIGITS_LABELS if family != "vae" else [],
        "lineage": {
            "training_config": {"preset": preset, "model": dataclasses.asdict(config),
                                "train": dataclasses.asdict(train_cfg),
                                "eval": dataclasses.asdict(eval_cfg) if eval_cfg is not None else None,
                                "data_scaling": "images / 8 - 1 (0..16 -> [-1, 1])"},
            "dataset": split.name, "dataset_split": split.split, "dataset_sha256": split.sha256,
            "seed": train_cfg.seed, "metrics": metrics, "code_revision": code_revision(),
            "created_at": datetime.now(timezone.utc).isoformat(),
        },
    }
    checkpoint.save(out_dir, model, config, meta)
    return metrics, samples


def train(family: str, preset: str, out_dir: str | Path, progress: bool = True) -> dict[str, float]:
    """training.train's entry point for the generative families (quick judge evaluation)."""
    return train_generative(family, preset, out_dir, progress=progress)[0]


def grid_rows(images: torch.Tensor, requested: torch.Tensor, judge_model: torch.nn.Module,
              per_row: int = 10) -> torch.Tensor:
    """100 images for a 10 x 10 grid: row d = the first samples requested as d; unconditional
    samples (requested < 0) are ordered by their judged label instead."""
    if bool((requested < 0).all()):
        first = images[: per_row * 10]
        return first[torch.argsort(judge.judge(judge_model, first), stable=True)]
    return torch.cat([images[requested == d][:per_row] for d in range(10)])


def write_grid(images: torch.Tensor, path: str | Path, per_row: int = 10, scale: int = 4, gap: int = 1) -> Path:
    """`grid_png` written to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(grid_png(images, per_row, scale, gap))
    return path


def grid_png(images: torch.Tensor, per_row: int = 10, scale: int = 4, gap: int = 1) -> bytes:
    """A PNG grid of images (N, 1, H, W) in [-1, 1], each pixel `scale` x `scale`, light gaps."""
    import io

    from PIL import Image

    n, _, h, w = images.shape
    rows = -(-n // per_row)
    cell_h, cell_w = h * scale + gap, w * scale + gap
    canvas = torch.full((rows * cell_h + gap, per_row * cell_w + gap), 255, dtype=torch.uint8)
    pixels = ((1 - (images[:, 0].clamp(-1, 1) + 1) / 2) * 255).round().to(torch.uint8)   # dark ink on white
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)            # (N, 8s, 8s)
    for i in range(n):
        r, c = divmod(i, per_row)
        canvas[gap + r * cell_h: gap + r * cell_h + h * scale, gap + c * cell_w: gap + c * cell_w + w * scale] = pixels[i]
    out = io.BytesIO()
    Image.fromarray(canvas.numpy(), mode="L").save(out, format="PNG")
    return out.getvalue()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the generative tiny presets, judge them with the "
                                                 "digits classifier and write sample grids.")
    parser.add_argument("--work", default="runs/generative", help="folder for the checkpoints and the judge (a judge found there is reused)")
    parser.add_argument("--images", default="docs/images", help="where the PNG grids go")
    parser.add_argument("--families", nargs="+", default=list(GENERATIVE), choices=GENERATIVE,
                        help="which families to run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    work = Path(args.work)
    eval_cfg = dataclasses.replace(FULL_EVAL, judge_dir=str(work / "judge"))
    judge_model = judge.load_judge(eval_cfg.judge_dir, progress=not args.no_progress)
    for family in args.families:
        metrics, samples = train_generative(family, "tiny", work / family, progress=not args.no_progress,
                                            eval_cfg=eval_cfg)
        for name, (images, requested) in samples.items():
            path = write_grid(grid_rows(images, requested, judge_model), Path(args.images) / f"{name}.png")
            print(f"wrote {path}")
        print(json.dumps({family: metrics}, indent=1, sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
