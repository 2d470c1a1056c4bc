"""The denoise engine (KIND "denoise": the diffusion UNet): the diffusion loop as a scheduler.

    admitted, expired = scheduler.schedule(now)     # books: who joins, who timed out (rows bounded)
    step_requests(denoiser, running, null_label)    # ONE (guided) UNet call over every running row,
                                                    # then one sampler step per request
    finished = scheduler.take_finished()            # leave at once; their images go back

Each request carries its own sampler state (`training.schedulers.pipeline.DenoiseRequest`: DDPM or
DDIM, its steps, eta, guidance and a generator seeded exactly as `training.generative.sample`
seeds it), so requests at different timesteps and with different samplers share one UNet batch
per step, and a seeded request draws the same noise whatever it shares its steps with. New
requests join between steps; finished ones leave between steps. The loop runs on the engine's
own thread (ONNX Runtime releases the GIL); requests arrive through a thread-safe inbox and
their results go back to the asyncio loop with call_soon_threadsafe.

Where the loop runs (`engine.loop`): `HostLoop`, the CPU loop above over any runtime (its
denoiser call goes through numpy), or `serve.engines.denoise_device.DeviceLoop`, every tensor on
the runtime's torch device from x_T to the images (`choose_loop`: a TorchScript version on CUDA,
or on the CPU with the setting denoise_on_device true; false keeps the CPU loop on CUDA too).

Bounds: at most `max_rows` UNet rows per step (a sample is one row, two when guidance needs its
unconditional twin; a request larger than that runs alone), at most `max_waiting` requests
waiting (then 429). A request whose deadline passes is answered 504: while waiting it is never
computed, while running it leaves at the next step boundary.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import numpy as np

from model_registry import Manifest
from serve.batching import Closed, DeadlineExceeded, QueueFull
from serve.engines.step_loop import StepLoop
from serve.metrics import DenoiseMetrics, EngineStats
from serve.runtimes import Runtime
from serve.sample_request import SampleRequest, sample_request
from serve.engines.sample import SampleCall, bind_sample_request


log = logging.getLogger("zooserve.denoise")

Denoiser = Callable  # (x_t (B, C, H, W) float32, t (B,) int64, label (B,) int64) -> eps, torch tensors

def runtime_denoiser(runtime: Runtime, manifest: Manifest) -> Denoiser:
    """The exported denoiser part as a torch-in, torch-out function (tensors on the CPU, through
    numpy). It carries `runtime` and `part`, from which `choose_loop` may build a device loop."""
    import torch

    part = manifest.parts["denoiser"]
    names, out = [s.name for s in part.inputs], part.outputs[0].name

    def denoise(x_t, t, label):
        feeds = dict(zip(names, (x_t.numpy(), t.numpy(), label.numpy())))
        return torch.from_numpy(runtime.run(feeds)[out])
    denoise.runtime, denoise.part = runtime, part
    return denoise


class HostLoop:
    """The CPU loop (training.schedulers.pipeline): torch tensors on the CPU, a denoiser of any runtime."""

    where = "host"

    def __init__(self, denoiser: Denoiser, null_label: int):
        self.denoiser, self.null_label = denoiser, null_label

    def private(self) -> "HostLoop":
        return self                                             # no state between steps

    def request(self, sampler, labels, guidance: float, seed: int | None):
        from training.schedulers.pipeline import DenoiseRequest

        return DenoiseRequest(sampler, labels, guidance)

    def start(self, request, shape: tuple[int, ...]) -> None:
        request.start(shape)                                    # x_T from the request's own generator

    def step(self, requests: list) -> None:
        from training.schedulers.pipeline import step_requests

        step_requests(self.denoiser, requests, self.null_label)

    def images(self, request) -> np.ndarray:
        return request.x.numpy()

    def reset(self) -> None:
        pass


def _on_device_wanted(runtime, on_device: bool | None) -> bool:
    """ServeSettings.denoise_on_device: None = on CUDA, True = on any device, False = never; only
    for a torch runtime (ONNX Runtime's CUDA provider is another path)."""
    torch_runtime = getattr(runtime, "format", None) == "torchscript" and hasattr(runtime, "module")
    return torch_runtime and (on_device is True or (on_device is None and runtime.device == "cuda"))


def choose_loop(denoiser: Denoiser, config, null_label: int, on_device: bool | None = None, noise: str = "host"):
    """The device loop for a TorchScript denoiser on CUDA (or on any device when `on_device`), else
    the CPU loop; `noise`: where the device loop draws it (ServeSettings.denoise_noise)."""
    runtime = getattr(denoiser, "runtime", None)
    if runtime is None or not _on_device_wanted(runtime, on_device):
        return HostLoop(denoiser, null_label)
    import torch

    from serve.engines.denoise_device import DeviceLoop, device_denoiser
    from training.schedulers.schedule import NoiseSchedule

    schedule = NoiseSchedule(config.num_train_timesteps, config.beta_schedule, config.beta_start, config.beta_end)
    return DeviceLoop(device_denoiser(runtime, denoiser.part), torch.device(runtime.device), schedule.alphas_cumprod,
                      null_label, noise)


@dataclass(eq=False)
class DenoiseJob:
    """One request inside the engine: its sampler state and its way back to the caller."""

    request: object                  # the loop's request: pipeline.DenoiseRequest or denoise_device.DeviceRequest
    rows: int                        # UNet rows per step: one per sample, two when guided
    arrival: float                   # perf_counter at submit
    deadline: float | None           # perf_counter after which it must not run on
    deliver: Callable[[object], None] = lambda result: None   # result: images (n, 1, H, W) or an exception
    steps: int = 0                   # steps run
    shared_steps: int = 0            # steps whose UNet batch also carried another request's rows
    admitted: bool = False


class DenoiseScheduler:
    """Books only (no model): FIFO admission within `max_rows` UNet rows per step, deadlines,
    finished requests out. A request larger than max_rows is admitted when nothing else runs."""

    def __init__(self, max_rows: int):
        self.max_rows = max_rows
        self.waiting: deque[DenoiseJob] = deque()
        self.running: list[DenoiseJob] = []

    @property
    def rows_running(self) -> int:
        return sum(j.rows for j in self.running)

    def has_jobs(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, job: DenoiseJob) -> None:
        self.waiting.append(job)

    def remove(self, job: DenoiseJob) -> bool:
        """Forget a job (its caller left); False when it was not here."""
        if job in self.running:
            self.running.remove(job)
            return True
        if job in self.waiting:
            self.waiting.remove(job)
            return True
        return False

    def schedule(self, now: float) -> tuple[list[DenoiseJob], list[DenoiseJob]]:
        """(jobs admitted for the next step, jobs whose deadline passed; both removed from waiting,
        the expired also from running)."""
        expired = [j for j in (*self.running, *self.waiting) if j.deadline is not None and now > j.deadline]
        for job in expired:
            self.remove(job)
        admitted, used = [], self.rows_running
        while self.waiting and (used + self.waiting[0].rows <= self.max_rows or not self.running):
            job = self.waiting.popleft()
            job.admitted = True
            self.running.append(job)
            admitted.append(job)
            used += job.rows
        return admitted, expired

    def take_finished(self) -> list[DenoiseJob]:
        """Running jobs whose sampler has taken its last step, removed."""
        done = [j for j in self.running if j.request.done]
        self.running = [j for j in self.running if not j.request.done]
        return done


class DenoiseEngine(StepLoop):
    """One (model, version) of kind `denoise`: scheduler + the batched diffusion loop on one thread."""

    api = "v2"
    cancellable = True   # a request runs many steps: the routes cancel it when its client leaves

    def __init__(self, name: str, version: int, manifest: Manifest, denoiser: Denoiser, config,
                 metrics: DenoiseMetrics, max_rows: int = 256, max_waiting: int = 1024, loop=None,
                 on_device: bool | None = None, noise: str = "host"):
        super().__init__()
        self.name, self.version, self.manifest, self.metrics = name, version, manifest, metrics
        self.denoiser, self.config = denoiser, config
        self.null_label = int(manifest.generation.get("null_label", config.null_label))
        self.shape = tuple(manifest.generation.get("sample_shape", (1, config.image_size, config.image_size)))
        self.scheduler = DenoiseScheduler(max_rows)
        self.max_waiting = max_waiting
        self.device = "cpu"
        self._running = 0              # jobs running after the last schedule (written by the thread)
        self.loop = loop or choose_loop(denoiser, config, self.null_label, on_device, noise)
        if self.loop.where != "host":
            log.info("%s/%s: denoising on %s", name, version, self.loop.where)

    # ---- asyncio side -------------------------------------------------------------------------
    def job(self, req: SampleRequest, deadline: float | None = None) -> DenoiseJob:
        """The engine's state for one request: its sampler (seeded as training.generative.sample
        seeds it), labels (-1 -> the null label) and guidance; x_T is drawn at admission."""
        import torch

        from training.families import family_module

        sampler = family_module("diffusion").make_sampler(self.config, sampler=req.sampler, steps=req.steps,
                                                          eta=req.eta, seed=req.seed)
        labels = torch.from_numpy(np.where(req.labels < 0, self.null_label, req.labels).astype(np.int64))
        guided = int((labels != self.null_label).sum()) if req.guidance != 1 else 0
        return DenoiseJob(self.loop.request(sampler, labels, req.guidance, req.seed), len(labels) + guided,
                          time.perf_counter(), deadline)

    async def sample(self, req: SampleRequest, deadline: float | None) -> dict[str, np.ndarray]:
        """Queue one request; its images once its last step has run."""
        if self._closing:
            raise Closed("model is shutting down")
        if self._pending - self._running >= self.max_waiting:
            raise QueueFull(retry_after_s=1.0)
        job = self.job(req, deadline)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        job.deliver = lambda result: loop.call_soon_threadsafe(_settle, future, result)
        self._pending += 1
        self._inbox.put(("add", job))
        try:
            return {"image": await future}
        except asyncio.CancelledError:                # the caller went away: free its rows
            self._inbox.put(("abort", job))
            raise
        finally:
            self._pending -= 1

    def admit(self, deadline: float) -> contextlib.nullcontext:
        """Requests step together: the queue bound is a count of waiting requests."""
        if self._closing:
            raise Closed("model is shutting down")
        if self._pending - self._running >= self.max_waiting:
            raise QueueFull(retry_after_s=1.0)
        return contextlib.nullcontext()

    def reconfigure(self, batching) -> None:
        """Requests step together, not in batches: only the queue bound applies."""
        self.max_waiting = batching.max_queue_size

    def bind(self, body: bytes, header_length: str | None, settings, batching) -> SampleCall:
        return bind_sample_request(self, body, header_length, settings)

    async def infer(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None,
                    parameters: dict | None = None) -> dict[str, np.ndarray]:
        """Every engine's verb: decoded inputs (+ request parameters) -> images."""
        return await self.sample(sample_request(self.manifest, inputs, parameters or {}), deadline)

    def sample_now(self, req: SampleRequest) -> dict[str, np.ndarray]:
        """The request alone, computed on the calling thread (the load-time check; tests)."""
        loop = self.loop.private()                      # not the engine thread's batch
        job = self.job(req)
        loop.start(job.request, self.shape)
        while not job.request.done:
            loop.step([job.request])
        return {"image": loop.images(job.request)}

    def stats(self) -> EngineStats:
        """Cumulative counters for the statistics endpoint."""
        return self.metrics.stats

    # ---- engine thread (StepLoop hooks) ---------------------------------------------------------
    def _has_work(self) -> bool:
        return self.scheduler.has_jobs()

    def _add(self, job: DenoiseJob) -> None:
        self.scheduler.add(job)

    def _abort(self, job: DenoiseJob) -> None:
        self.scheduler.remove(job)

    def _reset(self) -> None:
        super()._reset()
        self.loop.reset()

    def _fail_running(self, exc: Exception) -> None:
        for job in list(self.scheduler.running):
            self.scheduler.remove(job)
            job.deliver(RuntimeError(f"denoising failed: {exc}"))

    def _fail_everything(self, exc: Exception) -> None:
        for job in [*self.scheduler.running, *self.scheduler.waiting]:
            job.deliver(exc)

    def _step(self) -> None:
        """Admit, run one batched step over every running request, hand back the finished."""
        now = time.perf_counter()
        admitted, expired = self.scheduler.schedule(now)
        for job in expired:
            job.deliver(DeadlineExceeded(f"deadline passed after {job.steps} of {len(job.request.sampler.timesteps)} "
                                         f"steps; {'the rest was' if job.admitted else 'it was'} not computed"))
        for job in admitted:
            self.loop.start(job.request, self.shape)  # x_T from the request's own generator
            self.metrics.admitted(now - job.arrival)
        jobs = self.scheduler.running
        self._running = len(jobs)
        self.metrics.scheduler_state(len(jobs), len(self.scheduler.waiting))
        if not jobs:
            return
        started = time.perf_counter()
        self.loop.step([j.request for j in jobs])
        rows = sum(j.rows for j in jobs)
        self.metrics.step_done(rows, len(jobs), time.perf_counter() - started)
        for job in jobs:
            job.steps += 1
            job.shared_steps += len(jobs) > 1
        for job in self.scheduler.take_finished():
            self.metrics.finished_steps(job.steps)
            job.deliver(self.loop.images(job.request))
        self._running = len(self.scheduler.running)
        self.metrics.scheduler_state(self._running, len(self.scheduler.waiting))


def _settle(future: asyncio.Future, result) -> None:
    """On the event loop: answer a waiting caller (unless it left)."""
    if future.done():
        return
    if isinstance(result, BaseException):
        future.set_exception(result)
    else:
        future.set_result(result)
