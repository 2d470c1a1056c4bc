"""The sampler engines' shared side: opening a model served in parts, its load-time checks, the
GAN/VAE engine, and the binding of a sampler request for the v2 handler.

A generative version is several artifacts (`manifest.parts`, training/export_generative.py), each
opened as its own runtime. Loading replays every part's golden pair, then the public golden
request (labels + seed -> the eager sampler's images) through the engine's own sampling path, so
a version whose sampling drifts from eager never becomes ready.

GAN / VAE (`SampleEngine`): each request draws its latents from its own seeded generator exactly
as `training.generative.sample` does (`draw_latents`), then the rows of many requests share the
part's dynamic batcher (one batcher per part: the GAN generator; the VAE decoder and encoder). A
VAE request with an `image` input runs the encoder (latent mean and log-variance) and, when its
`image` output is wanted, the decoder on the mean: the reconstruction.
The diffusion engine is serve/engines/denoise.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from model_registry import Batching, Manifest
from serve.batching import BatchRecord, DynamicBatcher, Reservation
from serve.golden import GoldenMismatch
from serve.metrics import EngineStats, Metrics, ModelMetrics
from serve.runtimes import Runtime, open_runtime
from serve.sample_request import SampleRequest, decode_sample_request, sample_request
from serve.settings import ServeSettings
from serve.v2_codec import RequestedOutput, encode_infer_response
from training.parity import describe_error, max_abs_error

log = logging.getLogger("zooserve.sample")


def _config(manifest: Manifest, version_dir: Path):
    """The family's Config from the version's config.json (the samplers need the trained settings)."""
    from training.families import config_from_dict

    return config_from_dict(manifest.family, json.loads((version_dir / "config.json").read_text()))


def open_parts(manifest: Manifest, version_dir: Path, settings: ServeSettings) -> dict[str, Runtime]:
    """One runtime per part, in the manifest's format."""
    if not manifest.parts:
        raise RuntimeError(f"a {manifest.kind!r} model's manifest must list its parts (manifest.parts)")
    return {name: open_runtime(version_dir, manifest.format, part.artifacts[manifest.format],
                               [s.name for s in part.inputs], [s.name for s in part.outputs],
                               settings.intra_op_threads, settings.device)
            for name, part in manifest.parts.items()}


def _compare(what: str, got: np.ndarray, expected: np.ndarray, tolerance: float) -> float:
    if got.shape != expected.shape:
        raise GoldenMismatch(f"{what} has shape {got.shape}, the golden output {expected.shape}")
    worst = max_abs_error(expected, got)
    if not worst <= tolerance:
        raise GoldenMismatch(f"{what} differs from the golden output by {describe_error(worst)} "
                             f"(tolerance {tolerance})")
    return worst


def check_parts(manifest: Manifest, runtimes: dict[str, Runtime], tensors: dict[str, np.ndarray]) -> float:
    """Replay each part's golden pair; the worst abs error, or GoldenMismatch."""
    worst = 0.0
    for name, part in manifest.parts.items():
        got = runtimes[name].run({s.name: tensors[f"part.{name}.input.{s.name}"] for s in part.inputs})
        tolerance = max((p.tolerance for p in part.parity), default=1e-4)
        for spec in part.outputs:
            worst = max(worst, _compare(f"part {name!r} output {spec.name!r}", got[spec.name],
                                        tensors[f"part.{name}.output.{spec.name}"], tolerance))
    return worst


def check_public(manifest: Manifest, engine, tensors: dict[str, np.ndarray]) -> float:
    """Replay the public golden request (labels + seed) through the engine's sampling path."""
    inputs = {n: tensors[f"input.{n}"] for n in ("label", "seed")}
    got = engine.sample_now(sample_request(manifest, inputs, {}))
    tolerance = max((p.tolerance for p in manifest.parity), default=1e-4)
    return max(_compare(f"sampled output {name!r}", got[name], tensors[f"output.{name}"], tolerance)
               for name in got if f"output.{name}" in tensors)


class SampleEngine:
    """A GAN or VAE version: seeded latents per request, one dynamic batcher per part."""

    api = "v2"
    cancellable = False

    def __init__(self, name: str, version: int, manifest: Manifest, runtimes: dict[str, Runtime], config,
                 batching: Batching, metrics: ModelMetrics):
        self.name, self.version, self.manifest, self.metrics = name, version, manifest, metrics
        self.runtimes, self.config = runtimes, config
        self.family = manifest.family
        self.main = next(iter(manifest.parts))            # generator (GAN) or decoder (VAE)
        self.device = runtimes[self.main].device
        self.batchers = {part: DynamicBatcher(rt.run, batching.max_batch_size, batching.max_queue_delay_ms,
                                              batching.max_queue_size, on_batch=self._record,
                                              max_queue_wait_ms=batching.max_queue_wait_ms,
                                              name=f"{name}-{version}-{part}")
                         for part, rt in runtimes.items()}
        metrics.queue_depth.set_function(lambda: sum(b.queue_depth for b in self.batchers.values()))

    def _record(self, batch: BatchRecord) -> None:
        self.metrics.batch_done(batch.rows, batch.compute_s, batch.queue_waits)

    def start(self) -> None:
        """Start every part's batcher on the running loop."""
        for batcher in self.batchers.values():
            batcher.start()

    def _latents(self, req: SampleRequest) -> dict[str, np.ndarray]:
        """The main part's feeds, drawn exactly as training.generative.sample draws them."""
        import torch

        from training.generative import draw_latents

        z, labels = draw_latents(self.family, self.config, torch.from_numpy(req.labels), req.seed)
        return {"z": z.numpy(), "label": labels.numpy()} if self.family == "gan" else {"z": z.numpy()}

    async def sample(self, req: SampleRequest, deadline: float | None) -> dict[str, np.ndarray]:
        """The request's public outputs, its rows batched with other requests' per part."""
        if req.images is not None:                                    # VAE: encode, then reconstruct
            out = dict(await self._run("encoder", {"image": req.images}, deadline))
            if "image" in req.outputs:
                out.update(await self._run("decoder", {"z": out["latent_mean"]}, deadline))
            return {n: out[n] for n in req.outputs}
        feeds = self._latents(req)
        out = {**feeds, **await self._run(self.main, feeds, deadline)}
        return {n: out[n] for n in req.outputs}

    def admit(self, deadline: float) -> Reservation:
        return self.batchers[self.main].admit(deadline)      # a request starts on the main part (the VAE encoder too)

    def reconfigure(self, batching: Batching) -> None:
        for batcher in self.batchers.values():
            batcher.reconfigure(batching.max_batch_size, batching.max_queue_delay_ms, batching.max_queue_size,
                                batching.max_queue_wait_ms)

    def bind(self, body: bytes, header_length: str | None, settings: ServeSettings, batching: Batching) -> SampleCall:
        return bind_sample_request(self, body, header_length, settings)

    async def infer(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None,
                    parameters: dict | None = None) -> dict[str, np.ndarray]:
        """Decoded inputs (+ request parameters) -> the default outputs."""
        return await self.sample(sample_request(self.manifest, inputs, parameters or {}), deadline)

    def sample_now(self, req: SampleRequest) -> dict[str, np.ndarray]:
        """The same answer computed on the calling thread without batching (the load-time check)."""
        feeds = self._latents(req)
        out = {**feeds, **self.runtimes[self.main].run(feeds)}
        return {n: out[n] for n in req.outputs}

    async def _run(self, part: str, feeds: dict[str, np.ndarray], deadline: float | None) -> dict[str, np.ndarray]:
        """Through the part's batcher, in slices of at most its max_batch_size rows."""
        batcher = self.batchers[part]
        rows, cap = len(next(iter(feeds.values()))), batcher.max_batch_size
        if rows <= cap:
            return await batcher.submit(feeds, rows, deadline)
        slices = [{k: v[i:i + cap] for k, v in feeds.items()} for i in range(0, rows, cap)]
        # all slices queue at once or the request is refused whole (429): no orphan slice computes
        outs = await asyncio.gather(*batcher.submit_all([(s, len(next(iter(s.values())))) for s in slices], deadline))
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}

    def stats(self) -> EngineStats:
        """Cumulative counters for the statistics endpoint."""
        return self.metrics.stats

    @property
    def in_flight(self) -> int:
        """Requests queued or running, over every part."""
        return sum(b.in_flight for b in self.batchers.values())

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Drain every part's batcher."""
        for batcher in self.batchers.values():
            await batcher.close(drain_timeout_s)


def make_generative_engine(name: str, version: int, manifest: Manifest, version_dir: Path, batching: Batching,
                           settings: ServeSettings, metrics: Metrics):
    """Open the parts, build the engine for the kind, replay the part and public goldens (the
    worst error is the engine's `golden_error`); raises on any failure."""
    import torch

    torch.set_num_threads(settings.intra_op_threads)   # the samplers' own math; one pool per process
    runtimes = open_parts(manifest, version_dir, settings)
    tensors = load_file(str(version_dir / manifest.golden))
    config = _config(manifest, version_dir)
    if manifest.kind == "denoise":
        from serve.engines.denoise import DenoiseEngine, runtime_denoiser

        engine = DenoiseEngine(name, version, manifest, runtime_denoiser(runtimes["denoiser"], manifest),
                               config, metrics.for_denoise_model(name, version), settings.denoise_max_rows,
                               batching.max_queue_size, on_device=settings.denoise_on_device,
                               noise=settings.denoise_noise)
        engine.device = runtimes["denoiser"].device
    else:
        engine = SampleEngine(name, version, manifest, runtimes, config, batching, metrics.for_model(name, version))
    engine.golden_error = max(check_parts(manifest, runtimes, tensors), check_public(manifest, engine, tensors))
    return engine


@dataclass(frozen=True, slots=True)
class SampleCall:
    """A decoded, validated sampler request bound to its engine (GAN, VAE or diffusion)."""

    engine: Any
    request: SampleRequest
    request_id: str | None
    parameters: dict
    binary: dict[str, bool]
    shadowable = True       # the request carries its seed: the shadow samples from the same noise

    def pinned_version(self) -> tuple[int, str] | None:
        return None

    def bound_to(self, engine) -> "SampleCall":
        return replace(self, engine=engine)

    async def run(self, deadline: float) -> dict[str, np.ndarray]:
        return await self.engine.sample(self.request, deadline)

    def response(self, model: str, version: str, outputs: dict[str, np.ndarray]) -> tuple[bytes, dict[str, str]]:
        """(body, headers): the v2 JSON/binary answer, or a PNG grid (response_format png); both
        carry the seed used in `x-seed`, so an unseeded request can be repeated."""
        headers = {"x-seed": str(self.request.seed)}
        if self.request.png:
            return png_grid(outputs["image"]), {"Content-Type": "image/png", **headers}
        wanted = [RequestedOutput(n, self.binary.get(n, False)) for n in self.request.outputs]
        datatypes = {s.name: s.datatype for s in self.engine.manifest.signature.outputs}
        body, extra = encode_infer_response(model, version, self.request_id, outputs, wanted, datatypes,
                                            on_nonfinite=self.engine.metrics.nonfinite_answer)
        return body, {**extra, **headers}


def bind_sample_request(engine, body: bytes, header_length: str | None, settings: ServeSettings) -> SampleCall:
    """A v2 infer body sent to a sampler, decoded and bound; 400 when invalid."""
    decoded = decode_sample_request(body, header_length, engine.manifest.signature, settings.max_samples_per_request,
                                    settings.allow_non_finite)
    named = [o.name for o in decoded.outputs] if decoded.outputs_named else None
    req = sample_request(engine.manifest, decoded.inputs, decoded.parameters, named)
    return SampleCall(engine, req, decoded.id, decoded.parameters, {o.name: o.binary for o in decoded.outputs})


def png_grid(images: np.ndarray, per_row: int | None = None, scale: int = 4) -> bytes:
    """A PNG of images (N, 1, H, W) in [-1, 1]: dark ink on white, about square unless per_row is given."""
    import torch

    from training.generative import grid_png

    per_row = per_row or math.ceil(math.sqrt(len(images)))
    return grid_png(torch.from_numpy(np.ascontiguousarray(images)), per_row=per_row, scale=scale)
