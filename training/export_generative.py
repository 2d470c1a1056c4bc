"""Export of the generative kinds (`sample`: GAN, VAE; `denoise`: diffusion) as parts.

A sampler is not one function of its inputs: the server draws the noise, walks the diffusion
loop and maps labels, so what is exported is each network the loop calls, one artifact per part:

    gan        generator  (z (B, Z), label (B,)) -> image (B, C, H, W)   (C image channels: 1, or 3 for RGB)
    vae        decoder    z (B, Z) -> image;   encoder  image -> latent_mean (B, Z), latent_log_var (B, Z)
    diffusion  denoiser   (x_t (B, C, H, W), t (B,), label (B,)) -> eps (B, C, H, W)

The part names are the contract the server's engines read (serve/engines/sample.py, denoise.py).
Each part is exported to ONNX and TorchScript and checked against eager at batch 2, 1 and 7
(`training.export.check_parity`); its golden pair goes into golden.safetensors as
`part.<part>.input.<name>` / `part.<part>.output.<name>`.

The manifest's `signature` is the public one (KServe v2): `label` INT64 [n] (-1 = unconditional)
and `seed` INT64 [1] in, `image` FP32 [n, C, H, W] out (the GAN adds the `label` it used, the VAE
takes an optional `image` to encode and returns `latent_mean`/`latent_log_var`). Its parity is
end to end: seeded requests through each format's parts against `training.generative.sample`
(the eager reference), with the noise drawn exactly as `sample` draws it. The public golden pair
(`input.label`, `input.seed`, `output.image`) is one such request, which the server replays at load.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from training import export, generative
from training.families import family_module
from training.parity import max_abs_error

PART_SUFFIX = {"onnx": ".onnx", "torchscript": ".ts"}
# a seeded request end to end is held to the same bound: one network call for the GAN and VAE; the
# diffusion loop runs tens of denoiser calls and carries their differences from step to step, yet
# measured they stay at 1.5e-6 to 3.4e-6 (tiny UNet, 50 DDIM steps, ONNX Runtime vs eager)
SAMPLE_TOLERANCE = export.TOLERANCE
GOLDEN_SEED = 1234
Runner = Callable[..., tuple[np.ndarray, ...]]


class _Encoder(nn.Module):
    """The VAE encoder with the public input name: image -> (latent_mean, latent_log_var)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.encoder = vae.encoder

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.encoder(image)


def parts(family: str, model: nn.Module, config) -> dict[str, tuple[nn.Module, list[str], Callable[[int], tuple]]]:
    """part name -> (module, output names, make_inputs(batch)); the main part first."""
    fam = family_module(family)

    def example(batch: int) -> tuple[torch.Tensor, ...]:
        return fam.example_inputs(config, batch)

    def images(batch: int) -> tuple[torch.Tensor]:
        g = torch.Generator().manual_seed(batch)
        return (torch.rand(batch, config.image_channels, config.image_size, config.image_size, generator=g) * 2 - 1,)

    if family == "gan":
        return {"generator": (model.generator, ["image"], example)}
    if family == "vae":
        return {"decoder": (model.decoder, ["image"], example),
                "encoder": (_Encoder(model).eval(), ["latent_mean", "latent_log_var"], images)}
    if family == "diffusion":
        return {"denoiser": (model, ["eps"], example)}
    raise ValueError(f"{family!r} is not a generative family")


def signature(family: str, config) -> dict:
    """The public v2 signature of a sampler."""
    image = {"name": "image", "datatype": "FP32",
             "shape": [-1, config.image_channels, config.image_size, config.image_size]}
    label = {"name": "label", "datatype": "INT64", "shape": [-1]}
    inputs = [label, {"name": "seed", "datatype": "INT64", "shape": [1]}]
    outputs = [image]
    if family == "gan":
        outputs.append(label)                      # the class each image was drawn for (-1 resolved)
    if family == "vae":
        latent = [-1, config.latent_dim]
        inputs.append(image)                       # optional: encode / reconstruct instead of sampling
        outputs += [{"name": "latent_mean", "datatype": "FP32", "shape": latent},
                    {"name": "latent_log_var", "datatype": "FP32", "shape": latent}]
    return {"inputs": inputs, "outputs": outputs}


def _spec(name: str, t: torch.Tensor) -> dict:
    return {"name": name, "datatype": export.KSERVE_DTYPES[t.dtype], "shape": [-1, *t.shape[1:]]}


def _export_part(name: str, module: nn.Module, output_names: list[str], make_inputs, out: Path,
                 formats) -> tuple[dict, dict[str, Runner], dict[str, np.ndarray]]:
    """Export one part in every format, each checked against eager; (PartSpec dict, runners, golden)."""
    example = make_inputs(export.PARITY_BATCHES[0])
    artifacts, reports, runners = {}, [], {}
    for fmt in formats:
        path = out / f"{name}{PART_SUFFIX[fmt]}"
        if fmt == "onnx":
            export.export_onnx(module, example, output_names, path)
            runners[fmt] = export.onnx_runner(path)
        else:
            export.export_torchscript(module, example, path)
            runners[fmt] = export.torchscript_runner(path)
        artifacts[fmt] = path.name
        reports.append(export._check(export.check_parity(module, runners[fmt], make_inputs, fmt)))
    names = export.input_names(module)
    golden_in = make_inputs(3)
    with torch.no_grad():
        golden_out = export._outputs(module(*golden_in))
    tensors = {f"part.{name}.input.{n}": t.numpy() for n, t in zip(names, golden_in)}
    tensors.update({f"part.{name}.output.{n}": t.numpy() for n, t in zip(output_names, golden_out)})
    spec = {"artifacts": artifacts, "parity": reports,
            "inputs": [_spec(n, t) for n, t in zip(names, golden_in)],
            "outputs": [_spec(n, t) for n, t in zip(output_names, golden_out)]}
    return spec, runners, tensors


def _request_cases(family: str, config) -> list[tuple[torch.Tensor, int, dict]]:
    """(labels, seed, sampler settings) of the end-to-end parity check; the first is the golden request."""
    if family == "vae":
        return [(torch.full((3,), -1), GOLDEN_SEED, {}), (torch.full((7,), -1), 7, {})]
    labels = torch.tensor([0, min(7, config.n_classes - 1), -1])     # digits: 0, 7, unconditional
    if family == "gan":
        return [(labels, GOLDEN_SEED, {}), (torch.arange(-1, config.n_classes), 7, {})]
    # diffusion: the defaults (DDIM 50 steps, guidance), every label, eta > 0 (noise drawn every step), DDPM
    return [(labels, GOLDEN_SEED, {}), (torch.arange(-1, config.n_classes), 7, {"steps": 10}),
            (labels, 8, {"sampler": "ddim", "steps": 10, "eta": 0.5, "guidance": 3.0}),
            (labels, 9, {"sampler": "ddpm", "steps": 20})]


def served_sample(family: str, config, run_main: Runner, labels: torch.Tensor, seed: int, **sampler_kw) -> torch.Tensor:
    """`generative.sample` with the main part replaced by an exported runner: what the server computes."""
    if family == "diffusion":
        from training.schedulers.pipeline import generate

        def denoiser(x_t: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(run_main(x_t, t, label)[0])
        guidance = sampler_kw.pop("guidance", config.guidance)
        sampler = family_module("diffusion").make_sampler(config, seed=seed, **sampler_kw)
        labels = torch.where(labels < 0, config.null_label, labels)
        return generate(denoiser, sampler, labels, guidance, config.null_label,
                        shape=family_module("diffusion").sample_shape(config))
    z, used = generative.draw_latents(family, config, labels, seed)
    return torch.from_numpy(run_main(z, used)[0] if family == "gan" else run_main(z)[0])


def _sample_parity(family: str, model: nn.Module, config, runners: dict[str, Runner]) -> list[dict]:
    """ParityReports (as dicts), one per format: seeded requests through its main part against eager sample()."""
    worst, shapes = dict.fromkeys(runners, 0.0), []
    for labels, seed, kw in _request_cases(family, config):
        expected = generative.sample(family, model, config, labels, seed, **dict(kw))
        for fmt, run in runners.items():
            got = served_sample(family, config, run, labels, seed, **dict(kw))
            worst[fmt] = max(worst[fmt], max_abs_error(expected.numpy(), got.numpy()))
        shapes.append([labels.shape[0]])
    tolerance = SAMPLE_TOLERANCE
    return [export._check({"format": fmt, "max_abs_error": w, "tolerance": tolerance, "passed": w <= tolerance,
                           "shapes_checked": shapes}) for fmt, w in worst.items()]


def _public_golden(family: str, model: nn.Module, config) -> dict[str, np.ndarray]:
    """The first request case with its eager answer: input.label, input.seed, output.image (+ output.label)."""
    labels, seed, _ = _request_cases(family, config)[0]
    tensors = {"input.label": labels.numpy(), "input.seed": np.array([seed], np.int64),
               "output.image": generative.sample(family, model, config, labels, seed).numpy()}
    if family == "gan":
        tensors["output.label"] = generative.draw_latents(family, config, labels, seed)[1].numpy()
    return tensors


def export_parts(family: str, model: nn.Module, config, out: Path, formats) -> tuple[list[dict], dict, dict, dict]:
    """Export every part of a generative model into `out`; (end-to-end parity reports, public
    signature, golden tensors, parts as PartSpec dicts with the main part first)."""
    specs, tensors, main_runners = {}, {}, None
    for name, (module, output_names, make_inputs) in parts(family, model, config).items():
        spec, runners, golden = _export_part(name, module, output_names, make_inputs, out, formats)
        specs[name] = spec
        tensors.update(golden)
        main_runners = main_runners or runners
    reports = _sample_parity(family, model, config, main_runners)
    tensors.update(_public_golden(family, model, config))
    return reports, signature(family, config), tensors, specs
