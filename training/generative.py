"""Train, sample and judge the generative families (gan, vae, diffusion) on digits, or on the
user's own image folder (`--data`, training/user_data.py).

The data path: every generative family works on images in [-1, 1]; digits' raw 0..16 values
are scaled here, by `to_unit` (x / 8 - 1) in `digits_unit`, and the judge maps samples back
with `training.judge.to_digits`; an image folder's 0..255 pixels by `pixels_unit` (x / 127.5 - 1),
mapped back by `training.judge.to_pixels`. (The classifiers, by contrast, take raw values and
scale inside the model.)

An image folder: the model's image size, channels and (gan, diffusion) class count come from the
data; the GAN and the diffusion UNet are conditioned on its classes (with one class folder, on that
one class), the VAE stays unconditional. The class names become the served labels (gan, diffusion)
and the lineage records the split, sha256, rows and class names. With several classes the
samples are judged by a classifier trained on the folder's own training split
(judge.train_folder_judge), whose held-out accuracy is reported as `judge_test_accuracy`; with
one class there is no judge and only the training figures are reported.

Quality is judged by a digits classifier (training/judge.py) and stored in the checkpoint's
lineage metrics, so the registry shows it:
- gan:       judge_agreement (class-conditional), judge_entropy, spread_ratio
- vae:       judge_entropy (unconditional: prior samples), spread_ratio (by judged label),
             test_neg_elbo (nats per image); on an image folder also judge_agreement_recon (the
             judge's label of the reconstruction of each test image, dec(mu(x)), against its class)
- diffusion: judge_agreement_ddim50, spread_ratio_ddim50, judge_entropy_ddim50_uncond, and
             with a DDPM budget judge_agreement_ddpm (all T steps; costly, so fewer samples)
spread_ratio: how far apart samples of one digit are, over the same for real digits (a
generator that ignores its noise scores near 0 yet can still please the judge).
Entropies are over the K classes (max ln K).
`python -m training.generative` trains the tiny presets into runs/generative (~10 min on one
thread, half of it judging DDPM samples), stores the full metrics in each checkpoint's meta and
writes the 10 x 10 sample grids (row = requested digit) to docs/images.
Dimensions: N samples, Z latent size, K classes, C image channels, S x S the image.
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

from training import checkpoint, data, devices, judge, loop
from training.families import family_module, make_config
from training.run_state import RunStateError

GENERATIVE = ("gan", "vae", "diffusion")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """digits' 0..16 -> [-1, 1]."""
    return images / 8.0 - 1.0


def pixels_unit(images: torch.Tensor) -> torch.Tensor:
    """An image folder's 0..255 -> [-1, 1]."""
    return images / 127.5 - 1.0


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
# the image-folder quick judge: fewer unconditional samples (K classes * per_class, at most this)
FOLDER_UNCONDITIONAL = 500


@dataclass
class Judging:
    """What `evaluate` judges against: the judge, how samples are fed to it, the real training
    images (N, C, S, S) in [-1, 1] with labels (N,) for spread_ratio, the class count K, and (an
    image folder) the test split, whose reconstructions the VAE is judged on."""

    model: torch.nn.Module
    to_input: object                                  # [-1, 1] -> the judge's scale
    real: tuple[torch.Tensor, torch.Tensor]
    n_classes: int = 10
    test: tuple[torch.Tensor, torch.Tensor] | None = None

    def labels(self, images: torch.Tensor) -> torch.Tensor:
        return judge.judge(self.model, images, to_input=self.to_input)


def digits_judging(judge_model: torch.nn.Module) -> Judging:
    return Judging(judge_model, judge.to_digits, digits_unit(seed=0).train)


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
    """Images (N, C, S, S) in [-1, 1]; labels (N,), -1 = unconditional (the VAE ignores them; the GAN
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
                        shape=family_module("diffusion").sample_shape(config))
    raise ValueError(f"{family!r} is not a generative family")


def spread_ratio(images: torch.Tensor, labels: torch.Tensor, real: tuple[torch.Tensor, torch.Tensor] | None = None,
                 n_classes: int = 10) -> float:
    """judge.spread of samples over that of the real training images (digits by default; 1 = as
    varied as the data)."""
    real = real if real is not None else digits_unit(seed=0).train
    return judge.spread(images, labels, n_classes) / judge.spread(*real, n_classes)


def evaluate(family: str, model: torch.nn.Module, config, cfg: EvalConfig,
             judge_model: torch.nn.Module | None = None, judging: Judging | None = None,
             ) -> tuple[dict[str, float], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Judge samples; returns (metrics, {name: (images, requested labels)}). `judging` (default:
    the digits judge `judge_model` on digits) says what they are judged against."""
    j = judging or digits_judging(judge_model)
    K = j.n_classes
    per_class = torch.arange(K).repeat_interleave(cfg.per_class)              # (N,) 0,0,..,1,1,..
    metrics, samples = {}, {}
    if family == "gan":
        images = sample(family, model, config, per_class, cfg.seed)
        judged = j.labels(images)
        metrics.update(judge_agreement=judge.agreement(judged, per_class), judge_entropy=judge.label_entropy(judged, K),
                       spread_ratio=spread_ratio(images, per_class, j.real, K))
        samples["gan"] = (images, per_class)
    elif family == "vae":
        none = torch.full((cfg.unconditional,), -1)
        images = sample(family, model, config, none, cfg.seed)
        judged = j.labels(images)
        metrics.update(judge_entropy=judge.label_entropy(judged, K),
                       spread_ratio=spread_ratio(images, judged, j.real, K))
        samples["vae"] = (images, none)
        if j.test is not None:        # an image folder: are the reconstructions still of their class?
            with torch.no_grad():
                recon = model.eval().reconstruct(j.test[0])
            metrics["judge_agreement_recon"] = judge.agreement(j.labels(recon), j.test[1])
    else:
        images = sample(family, model, config, per_class, cfg.seed, sampler="ddim", steps=50)
        metrics["judge_agreement_ddim50"] = judge.agreement(j.labels(images), per_class)
        metrics["spread_ratio_ddim50"] = spread_ratio(images, per_class, j.real, K)
        samples["diffusion-ddim"] = (images, per_class)
        null = torch.full((cfg.unconditional,), config.null_label)
        uncond = sample(family, model, config, null, cfg.seed + 1, sampler="ddim", steps=50)
        metrics["judge_entropy_ddim50_uncond"] = judge.label_entropy(j.labels(uncond), K)
        if cfg.ddpm_per_class:
            requested = torch.arange(K).repeat_interleave(cfg.ddpm_per_class)
            images = sample(family, model, config, requested, cfg.seed + 2, sampler="ddpm")
            metrics["judge_agreement_ddpm"] = judge.agreement(j.labels(images), requested)
            samples["diffusion-ddpm"] = (images, requested)
    return metrics, samples


def _fit(family: str, model: torch.nn.Module, split: data.Split, train_cfg, progress: bool,
         run: dict, placement: dict | None = None) -> dict[str, float]:
    """Train in place; `run`: run_dir, resume and run_config for the loop (loop.train, or the
    GAN's own `train`, which take the same three); `placement`: device, precision, tensorboard,
    which both take too. The model comes back on the CPU: what follows (test -ELBO) runs there."""
    fam = family_module(family)
    placement = placement or {}
    if family == "gan":
        return fam.train(model, *split.train, train_cfg, progress=progress, **run, **placement)
    result = loop.train(model, fam.loss, split.train, split.val, train_cfg, progress=progress, **run, **placement)
    metrics = {"val_loss": result["best_val_loss"], "epochs_run": float(result["epochs_run"]),
               "steps": float(result["steps"])}
    if family == "vae":
        metrics["test_neg_elbo"] = loop.evaluate(model, fam.loss, split.test)
    return metrics


@dataclass
class _Data:
    """The training data of a run: the split in [-1, 1], served labels, lineage fields."""

    split: data.Split
    labels: list[str]
    details: dict | None = None          # lineage.dataset_details (an image folder)
    scaling: str = "images / 8 - 1 (0..16 -> [-1, 1])"
    class_names: list[str] | None = None


def _digits_data(family: str) -> _Data:
    return _Data(digits_unit(seed=0), data.DIGITS_LABELS if family != "vae" else [])


def _folder_data(family: str, preset: str, source, data_options: dict | None, seed: int, config):
    """(the image folder as _Data, the model config with the fields the data decides); DataError
    for bad data, or for a data-decided field set by hand (--set/--config) to another value."""
    from training import user_data

    user = user_data.read(family, source, seed=seed, **(data_options or {}))
    decided = user.sampler_overrides(family)
    baseline = dataclasses.asdict(make_config(family, preset))
    changed = [k for k in decided if getattr(config, k) != baseline[k]]
    if changed:
        raise user_data.DataError(f"model.{changed[0]} comes from --data (with it, {', '.join(decided)} are read "
                                  "from the data); do not set it")
    try:
        config = dataclasses.replace(config, **decided)
    except ValueError as exc:       # e.g. diffusion with more stages than the image size allows
        raise user_data.DataError(f"{source}: {family} cannot take {user.image_size}x{user.image_size} images: "
                                  f"{exc}") from None

    def scale(part: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return pixels_unit(part[0]), part[1]
    split = dataclasses.replace(user.split, train=scale(user.split.train), val=scale(user.split.val),
                                test=scale(user.split.test))
    labels = user.class_names if family != "vae" else []      # the VAE is unconditional
    return _Data(split, labels, user.details, "pixels / 127.5 - 1 (0..255 -> [-1, 1])", user.class_names), config


def _judging(d: _Data, eval_cfg: EvalConfig, seed: int, progress: bool) -> tuple[Judging | None, dict[str, float]]:
    """The judge for `d` and its own figures: the digits judge; an image folder's own (its test
    accuracy as judge_test_accuracy); None for a single class (nothing to tell apart)."""
    if d.class_names is None:
        return digits_judging(judge.load_judge(eval_cfg.judge_dir)), {}
    if len(d.class_names) < 2:
        return None, {}
    unpixel = judge.to_pixels

    def pixels(part: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return unpixel(part[0]), part[1]
    model, accuracy = judge.train_folder_judge(pixels(d.split.train), pixels(d.split.val), pixels(d.split.test),
                                               seed=seed, progress=progress)
    return Judging(model, unpixel, d.split.train, len(d.class_names), d.split.test), {"judge_test_accuracy": accuracy}


def train_generative(family: str, preset: str, out_dir: str | Path, progress: bool = True,
                     eval_cfg: EvalConfig | None = EvalConfig(), train_cfg=None, *, model_config=None,
                     data_path: str | Path | None = None, data_options: dict | None = None,
                     run_dir: str | Path | None = None, resume: bool = False,
                     device: str | torch.device = "cpu", precision: str = "fp32", tensorboard: bool = False,
                     ) -> tuple[dict[str, float], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Train a generative preset, judge its samples (unless eval_cfg is None) and write a checkpoint
    whose lineage holds the metrics; returns (metrics, judged samples).

    `model_config`: the family's Config (default the preset's; training/run_config.py resolves one
    from --set/--config); `train_cfg`: GANTrainConfig (gan) or loop.TrainConfig (default
    `train_config(family, preset)`). `data_path`: an image folder (training/user_data.py; its
    `data_options` image_size, channels), else digits; bad data raises user_data.DataError before
    anything trains. `run_dir`: the run folder (metrics.jsonl, run-state checkpoints); `resume`
    continues the run it holds (run_state.RunStateError when it cannot).

    `device`, `precision`, `tensorboard`: where and how the training runs (training/devices.py;
    loop.train for vae and diffusion, the GAN's own loop for gan; `tensorboard` needs `run_dir`);
    devices.DeviceError before the data is read when this machine cannot. The judging, the test
    figures and the checkpoint use the float32 CPU model; lineage records the device and precision."""
    from training.train import code_revision

    device = devices.resolve(device)      # before the data is read: a machine without CUDA stops at once
    devices.check(device, precision)
    if tensorboard and run_dir is None:
        raise ValueError("tensorboard=True writes into the run folder: give run_dir too")
    fam = family_module(family)
    config = model_config if model_config is not None else make_config(family, preset)
    train_cfg = train_cfg or train_config(family, preset)
    if data_path is None:
        d = _digits_data(family)
    else:
        d, config = _folder_data(family, preset, data_path, data_options, train_cfg.seed, config)
        if eval_cfg is not None:       # a quick judge: per_class per class, and as many unconditional
            eval_cfg = dataclasses.replace(eval_cfg, unconditional=min(
                FOLDER_UNCONDITIONAL, eval_cfg.per_class * max(2, len(d.class_names))))
    if resume and run_dir is None:
        raise RunStateError("--resume needs the run folder of the run to resume")
    torch.manual_seed(train_cfg.seed)
    model = fam.Model(config)
    run_config = {"family": family, "preset": preset, "model": dataclasses.asdict(config),
                  "data": None if data_path is None else str(Path(data_path).resolve())}
    run = {"run_dir": run_dir, "resume": resume, "run_config": run_config} if run_dir is not None else {}
    started = time.perf_counter()
    metrics = _fit(family, model, d.split, train_cfg, progress, run,
                   {"device": device, "precision": precision, "tensorboard": tensorboard})
    metrics["train_seconds"] = time.perf_counter() - started
    samples = {}
    if eval_cfg is not None:
        started = time.perf_counter()
        judging, figures = _judging(d, eval_cfg, train_cfg.seed, progress)
        metrics.update(figures)
        if judging is not None:
            quality, samples = evaluate(family, model, config, eval_cfg, judging=judging)
            metrics.update(quality)
        metrics["eval_seconds"] = time.perf_counter() - started
    meta = {
        "family": family,
        "labels": d.labels,
        "lineage": {
            "training_config": {"preset": preset, "model": dataclasses.asdict(config),
                                "train": dataclasses.asdict(train_cfg),
                                "eval": dataclasses.asdict(eval_cfg) if eval_cfg is not None else None,
                                "data_scaling": d.scaling, "device": devices.describe(device),
                                "precision": precision},
            "dataset": d.split.name, "dataset_split": d.split.split, "dataset_sha256": d.split.sha256,
            "seed": train_cfg.seed, "metrics": metrics, "code_revision": code_revision(),
            "created_at": datetime.now(timezone.utc).isoformat(),
        },
    }
    if d.details is not None:
        meta["lineage"]["dataset_details"] = d.details
    checkpoint.save(out_dir, model, config, meta)
    return metrics, samples


def train(family: str, preset: str, out_dir: str | Path, progress: bool = True, *, data_path=None,
          data_options: dict | None = None, train_cfg=None, model_config=None, run_dir=None,
          resume: bool = False, device: str | torch.device = "cpu", precision: str = "fp32",
          tensorboard: bool = False) -> dict[str, float]:
    """training.train's entry point for the generative families (quick judge evaluation); the
    keywords as train_generative's."""
    return train_generative(family, preset, out_dir, progress=progress, train_cfg=train_cfg,
                            model_config=model_config, data_path=data_path, data_options=data_options,
                            run_dir=run_dir, resume=resume, device=device, precision=precision,
                            tensorboard=tensorboard)[0]


def grid_rows(images: torch.Tensor, requested: torch.Tensor, judge_model: torch.nn.Module,
              per_row: int = 10) -> torch.Tensor:
    """100 images for a 10 x 10 grid: row d = the first samples requested as d; unconditional
    samples (requested < 0) are ordered by their judged label instead."""
    if bool((requested < 0).all()):
        first = images[: per_row * 10]
        return first[torch.argsort(judge.judge(judge_model, first), stable=True)]
    return torch.cat([images[requested == d][:per_row] for d in range(int(requested.max()) + 1)])


def write_grid(images: torch.Tensor, path: str | Path, per_row: int = 10, scale: int = 4, gap: int = 1) -> Path:
    """`grid_png` written to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(grid_png(images, per_row, scale, gap))
    return path


def grid_png(images: torch.Tensor, per_row: int = 10, scale: int = 4, gap: int = 1) -> bytes:
    """A PNG grid of images (N, C, H, W) in [-1, 1], each pixel `scale` x `scale`, light gaps.
    One channel: dark ink on white (digits: 1 is ink), mode L; three: the colours as they are
    (-1 black, 1 full), mode RGB."""
    import io

    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // per_row)
    cell_h, cell_w = h * scale + gap, w * scale + gap
    unit = (images.clamp(-1, 1) + 1) / 2                                               # (N, C, H, W) in [0, 1]
    pixels = (((1 - unit) if c == 1 else unit) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)   # (N, H, W, C)
    pixels = pixels.repeat_interleave(scale, 1).repeat_interleave(scale, 2)            # (N, Hs, Ws, C)
    canvas = torch.full((rows * cell_h + gap, per_row * cell_w + gap, c), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, per_row)
        canvas[gap + r * cell_h: gap + r * cell_h + h * scale,
               gap + col * cell_w: gap + col * cell_w + w * scale] = pixels[i]
    out = io.BytesIO()
    if c == 1:
        Image.fromarray(canvas[..., 0].numpy(), mode="L").save(out, format="PNG")
    else:
        Image.fromarray(canvas.numpy(), mode="RGB").save(out, format="PNG")
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
