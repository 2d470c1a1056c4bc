"""Requests to the sampler models (kinds `sample` and `denoise`): decoding and validation.

The public signature of a sampler (training/export_generative.py):

    inputs   label  INT64 [n]   one sample per entry; -1 = unconditional (diffusion: its null label;
                                the GAN draws a uniform class; the VAE is unconditional and takes -1 only)
             seed   INT64 [1]   optional; the same seed gives the same images, bit for bit (absent: random)
             image  FP32 [n, 1, H, W]   VAE only, instead of `label`: encode (and reconstruct) these
    outputs  image  FP32 [n, 1, H, W] in [-1, 1]   (GAN: + `label`, the class each image was drawn for;
                                VAE with `image`: + `latent_mean`, `latent_log_var`)
    parameters (diffusion)  sampler "ddpm" | "ddim", steps, eta (ddim), guidance; defaults from the
                manifest's `generation`;  (any)  response_format "tensor" | "png"

The v2 codec's request decoder requires every signature input and one batch size shared by all of
them; a sampler's inputs have different leading dims and some are optional, so they are decoded
here with the codec's own per-input checks. Everything is validated before anything is queued,
and a bad request is a 400 naming the field.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np

from model_registry import Manifest
from model_registry.manifest import Signature
from serve.errors import ServeError
# the codec's per-input steps, reused so that samplers validate tensors exactly as every model does
from serve.v2_codec import (V2Error, _check_shape, _from_binary, _from_json, _input_header, _load_json,
                            _request_parameters, _resolve_outputs, _split_body, _type_name)

GENERATIVE_KINDS = ("sample", "denoise")
SAMPLERS = ("ddpm", "ddim")
DIFFUSION_PARAMETERS = ("sampler", "steps", "eta", "guidance")
RESPONSE_FORMATS = ("tensor", "png")
ENCODER_OUTPUTS = ("latent_mean", "latent_log_var")


@dataclass(slots=True)
class DecodedRequest:
    """A sampler's v2 request after decoding (the fields the infer handler reads, as InferRequest)."""

    id: str | None
    parameters: dict
    inputs: dict[str, np.ndarray]        # only the inputs the request carries
    outputs: list                        # RequestedOutput, all of the signature's when none named
    outputs_named: bool                  # the request chose its outputs
    batch_size: int


@dataclass(slots=True)
class SampleRequest:
    """A validated request to a sampler, whichever route it came by; defaults resolved."""

    labels: np.ndarray | None            # (n,) int64 as asked, -1 = unconditional; None when encoding
    seed: int
    images: np.ndarray | None = None     # VAE: (n, 1, H, W) float32 to encode, instead of labels
    outputs: tuple[str, ...] = ("image",)   # public outputs to compute and send
    sampler: str | None = None           # diffusion: "ddpm" | "ddim"
    steps: int | None = None             # diffusion: denoising steps (1..num_train_timesteps)
    eta: float | None = None             # ddim: 0 deterministic .. 1 DDPM-like
    guidance: float | None = None        # diffusion: classifier-free guidance scale (>= 0)
    png: bool = False                    # answer with a PNG grid instead of tensors

    @property
    def n(self) -> int:
        """Images this request makes."""
        return len(self.labels) if self.labels is not None else len(self.images)


def _bad(message: str) -> ServeError:
    return ServeError(400, message)


def decode_sample_request(body: bytes, header_length: str | None, signature: Signature, max_samples: int,
                          allow_non_finite: bool = False) -> DecodedRequest:
    """Decode a v2 infer body against a sampler's signature: each input checked on its own (name,
    datatype, rank, fixed dims, element count, at most `max_samples` rows), any of them optional."""
    try:
        header, binary = _split_body(bytes(body), header_length)
        request = _load_json(header)
        raw_inputs = request.get("inputs")
        if type(raw_inputs) is not list:
            raise _bad(f"'inputs' must be a list, got {_type_name(raw_inputs)}")
        by_name = {s.name: s for s in signature.inputs}
        arrays: dict[str, np.ndarray] = {}
        offset = 0
        for index, item in enumerate(raw_inputs):
            name, spec, shape, binary_size, data = _input_header(item, index, by_name, arrays)
            if name != "seed" and shape and shape[0] > max_samples:
                raise _bad(f"input '{name}': {shape[0]} samples asked, this server makes at most {max_samples} "
                           f"per request (ZOOSERVE_MAX_SAMPLES_PER_REQUEST)")
            _check_shape(name, spec, shape, None, max_samples)
            if binary_size is None:
                arrays[name] = _from_json(name, spec.datatype, data, shape, header)
            else:
                arrays[name], offset = _from_binary(name, spec.datatype, binary, offset, binary_size, shape)
                if not allow_non_finite and arrays[name].dtype.kind == "f" and not np.isfinite(arrays[name]).all():
                    raise _bad(f"input '{name}' contains NaN or Inf")
        if binary is not None and offset != len(binary):
            raise _bad(f"binary section holds {len(binary)} bytes but the inputs' binary_data_size add up to {offset}")
        parameters = _request_parameters(request)
        outputs = _resolve_outputs(request.get("outputs"), signature.outputs, parameters)
        request_id = request.get("id")
        if request_id is not None and type(request_id) is not str:
            raise _bad(f"'id' must be a string, got {_type_name(request_id)}")
    except V2Error as exc:
        raise ServeError(exc.status, exc.message) from None
    rows = next((len(a) for n, a in arrays.items() if n != "seed"), 0)
    return DecodedRequest(request_id, parameters, arrays, outputs, bool(request.get("outputs")), rows)


def sample_request(manifest: Manifest, inputs: dict[str, np.ndarray], parameters: dict,
                   outputs: list[str] | None = None) -> SampleRequest:
    """Validate a decoded request against the model: labels, seed, sampler parameters, outputs.
    `outputs` None = the default outputs of the request's task."""
    generation = manifest.generation
    labels, images = inputs.get("label"), inputs.get("image")
    if labels is not None and images is not None:
        raise _bad("send either input 'label' (sample new images) or input 'image' (encode and reconstruct "
                   "them), not both")
    if labels is None and images is None:
        wanted = "'label' (one entry per sample, -1 = unconditional)" + (
            " or 'image' (to encode)" if any(s.name == "image" for s in manifest.signature.inputs) else "")
        raise _bad(f"missing input {wanted}")
    if labels is not None:
        _check_labels(manifest, labels)
    seed = _seed(inputs.get("seed"))
    req = SampleRequest(labels, seed, images, png=_response_format(parameters))
    if manifest.kind == "denoise":
        _diffusion_settings(req, parameters, generation)
    else:
        given = [p for p in DIFFUSION_PARAMETERS if p in parameters]
        if given:
            raise _bad(f"parameters.{given[0]} applies to diffusion models only; {manifest.family!r} draws an "
                       f"image in one network call")
    req.outputs = _outputs(manifest, req, outputs)
    return req


def _check_labels(manifest: Manifest, labels: np.ndarray) -> None:
    if "n_classes" not in manifest.generation:
        if (labels != -1).any():
            bad = int(labels[labels != -1][0])
            raise _bad(f"input 'label': {manifest.family!r} is unconditional, every label must be -1, got {bad}")
        return
    n_classes = int(manifest.generation["n_classes"])
    outside = (labels < -1) | (labels >= n_classes)
    if outside.any():
        raise _bad(f"input 'label': {int(labels[outside][0])} is not a label of this model; labels are "
                   f"0..{n_classes - 1}, or -1 for unconditional")


def _seed(seed: np.ndarray | None) -> int:
    if seed is None:
        return secrets.randbits(63)
    return int(seed.reshape(-1)[0])


def _response_format(parameters: dict) -> bool:
    fmt = parameters.get("response_format", "tensor")
    if fmt not in RESPONSE_FORMATS:
        raise _bad(f"parameters.response_format must be one of {', '.join(RESPONSE_FORMATS)}, got {fmt!r}")
    return fmt == "png"


def _number(parameters: dict, name: str, default: Any, lo: float, hi: float, integer: bool, why: str) -> Any:
    value = parameters.get(name, default)
    kinds = (int,) if integer else (int, float)
    if type(value) not in kinds or (not integer and not math.isfinite(value)) or not lo <= value <= hi:
        span = f"in {lo}..{hi}" if integer else (f"in [{lo}, {hi}]" if math.isfinite(hi) else f">= {lo}")
        kind = "an integer" if integer else "a number"
        raise _bad(f"parameters.{name} must be {kind} {span}{why}, got {value!r}")
    return value


def _diffusion_settings(req: SampleRequest, parameters: dict, generation: dict) -> None:
    """Sampler, steps, eta and guidance, each checked against the trained model and defaulted."""
    sampler = parameters.get("sampler", generation.get("sampler", "ddim"))
    if sampler not in SAMPLERS:
        raise _bad(f"parameters.sampler must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    horizon = int(generation["num_train_timesteps"])
    default_steps = horizon if sampler == "ddpm" else int(generation.get("steps", 50))
    req.sampler = sampler
    req.steps = _number(parameters, "steps", default_steps, 1, horizon, True,
                        " (at most num_train_timesteps, the trained horizon)")
    if sampler == "ddim":
        req.eta = float(_number(parameters, "eta", generation.get("eta", 0.0), 0.0, 1.0, False, ""))
    elif "eta" in parameters:
        raise _bad("parameters.eta applies to the ddim sampler only (ddpm's step variance is fixed)")
    req.guidance = float(_number(parameters, "guidance", generation.get("guidance", 1.0), 0.0, math.inf, False, ""))


def _outputs(manifest: Manifest, req: SampleRequest, named: list[str] | None) -> tuple[str, ...]:
    public = [s.name for s in manifest.signature.outputs]
    if req.images is not None:
        default = [n for n in public if n == "image" or n in ENCODER_OUTPUTS]
    else:
        default = [n for n in public if n not in ENCODER_OUTPUTS]
    chosen = list(named) if named else default
    for name in chosen:
        if name not in default:
            raise _bad(f"output '{name}' comes from the encoder: send input 'image' to get it")
    if req.png and "image" not in chosen:
        raise _bad("parameters.response_format png sends the 'image' output; request it")
    return tuple(chosen)


def query_request(manifest: Manifest, label: str, n: int | None, seed: int | None, parameters: dict,
                  max_samples: int) -> SampleRequest:
    """A sampler request from GET query parameters (the PNG route): `label` one integer (repeated n
    times, n default 16) or a comma-separated list; the same checks as a v2 request."""
    try:
        values = [int(v) for v in label.split(",")]
    except ValueError:
        raise _bad(f"query label must be an integer or comma-separated integers, got {label!r}") from None
    if len(values) > 1 and n is not None and n != len(values):
        raise _bad(f"query n={n} disagrees with the {len(values)} labels given")
    count = len(values) if len(values) > 1 else (16 if n is None else n)
    if not 1 <= count <= max_samples:
        raise _bad(f"query n must be in 1..{max_samples} (ZOOSERVE_MAX_SAMPLES_PER_REQUEST), got {count}")
    labels = np.array(values if len(values) > 1 else values * count, np.int64)
    inputs = {"label": labels} if seed is None else {"label": labels, "seed": np.array([seed], np.int64)}
    return sample_request(manifest, inputs, {k: v for k, v in parameters.items() if v is not None}, ["image"])
