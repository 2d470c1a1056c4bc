"""Denoise and classify on the device (issue 18, points 3 and 5), checked on the CPU: the denoise
engine's torch loop (serve/engines/denoise_device.py, torch tensors on `cpu`) gives the CPU loop's
images for the same seeds within 1e-5 (DDPM and DDIM, guided and not, alone and in batches that
requests join and leave, both noise sources), also through a real server; the classify path's
pinned staging buffers are reused and grown as they should be. The `gpu` tests run the same
comparisons on CUDA when a GPU is lent (skipped without one)."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from pydantic import ValidationError

from model_registry import Registry
from serve.engines.denoise import HostLoop, choose_loop, runtime_denoiser
from serve.engines.denoise_device import DeviceLoop
from serve.engines.sample import make_generative_engine, open_parts
from serve.metrics import Metrics
from serve.runtimes import PinnedTorchRuntime, StagingBuffers, TorchScriptRuntime, with_device_io
from serve.sample_request import sample_request
from serve.settings import ServeSettings

MODEL = "diffusion-digits"
TOLERANCE = 1e-5            # the device loop against the CPU loop, same seeds, on the CPU
CUDA_TOLERANCE = 1e-4       # on CUDA against the CPU (the export's parity tolerance)
needs_cuda = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ON_DEVICE = "ZOOSERVE_DENOISE_ON_DEVICE"

# sampler parameters: DDIM (the config's defaults: 50 steps, eta 0, guidance 1.5), DDIM with
# noise and stronger guidance, DDPM (noise on every step but the last), and unguided DDIM
CASES = {
    "ddim-guided": ([3, -1, 7], 5, {}),
    "ddim-eta": ([0, 9], 6, {"eta": 0.5, "guidance": 3.0}),
    "ddpm-guided": ([2, -1], 7, {"sampler": "ddpm", "steps": 100, "guidance": 2.0}),
    "ddim-unguided": ([4, 4], 8, {"guidance": 1.0, "steps": 20}),
}


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ts_registry(generative_registry, tmp_path_factory) -> Path:
    """diffusion-digits version 1 republished with TorchScript as its serving format."""
    work = tmp_path_factory.mktemp("device-denoise")
    src = work / "package"
    shutil.copytree(generative_registry / MODEL / "1", src)
    manifest = json.loads((src / "manifest.json").read_text())
    (src / "manifest.json").write_text(json.dumps({**manifest, "format": "torchscript"}))
    registry = Registry(work / "registry")
    registry.publish(MODEL, src)
    return registry.root


def build(registry: Path, device: str = "cpu", on_device: str | None = None, noise: str | None = None):
    """The diffusion engine as the server builds it (goldens replayed through its own loop)."""
    reg = Registry(registry)
    with pytest.MonkeyPatch.context() as mp:
        for name, value in ((ON_DEVICE, on_device), ("ZOOSERVE_DENOISE_NOISE", noise)):
            if value is None:
                mp.delenv(name, raising=False)
            else:
                mp.setenv(name, value)
        return make_generative_engine(MODEL, 1, reg.manifest(MODEL, 1), reg.version_dir(MODEL, 1),
                                      reg.model_config(MODEL).batching, ServeSettings(device=device), Metrics())


@pytest.fixture(scope="module")
def engines(ts_registry) -> dict:
    """The CPU loop and the device loop (torch on cpu) with each noise source, over one TorchScript version."""
    return {"cpu-loop": build(ts_registry), "device-host-noise": build(ts_registry, on_device="1"),
            "device-device-noise": build(ts_registry, on_device="1", noise="device")}


def request(engine, labels, seed, **parameters):
    return sample_request(engine.manifest, {"label": np.array(labels, np.int64), "seed": np.array([seed], np.int64)},
                          parameters)


def worst(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.abs(a - b).max())


# ---- which loop -------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_device_loop_runs_where_the_runtime_is_torch_and_it_is_asked_for(ts_registry, generative_registry,
                                                                              engines, monkeypatch):
    assert isinstance(engines["cpu-loop"].loop, HostLoop)            # the CPU default does not change
    for key in ("device-host-noise", "device-device-noise"):
        loop = engines[key].loop
        assert isinstance(loop, DeviceLoop) and loop.device == torch.device("cpu")
        assert engines[key].golden_error <= 1e-4                     # the public golden, through the device loop
    assert engines["device-device-noise"].loop.noise == "device" and engines["device-host-noise"].loop.noise == "host"
    reg, settings = Registry(generative_registry), ServeSettings(device="cpu")
    onnx = reg.manifest(MODEL, 1)
    assert onnx.format == "onnx"
    denoiser = runtime_denoiser(open_parts(onnx, reg.version_dir(MODEL, 1), settings)["denoiser"], onnx)
    config = engines["cpu-loop"].config
    assert isinstance(choose_loop(denoiser, config, 10, on_device=True), HostLoop)   # ONNX keeps the CPU loop (§4)
    ts = Registry(ts_registry).manifest(MODEL, 1)
    ts_denoiser = runtime_denoiser(open_parts(ts, Registry(ts_registry).version_dir(MODEL, 1), settings)["denoiser"], ts)
    assert isinstance(choose_loop(ts_denoiser, config, 10, on_device=True), DeviceLoop)
    assert isinstance(choose_loop(ts_denoiser, config, 10, on_device=False), HostLoop)
    assert isinstance(choose_loop(ts_denoiser, config, 10), HostLoop)                  # unset: only on CUDA
    monkeypatch.setenv(ON_DEVICE, "1")
    assert ServeSettings().denoise_on_device is True                                   # the environment's name
    monkeypatch.setenv(ON_DEVICE, "yes please")
    with pytest.raises(ValidationError, match="denoise_on_device"):
        ServeSettings()
    monkeypatch.setenv(ON_DEVICE, "1")
    monkeypatch.setenv("ZOOSERVE_DENOISE_NOISE", "gpu")
    with pytest.raises(ValidationError, match="denoise_noise"):
        ServeSettings()


# ---- the same images --------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_a_request_alone_gives_the_cpu_loops_images(engines, case):
    labels, seed, parameters = CASES[case]
    expected = engines["cpu-loop"].sample_now(request(engines["cpu-loop"], labels, seed, **parameters))["image"]
    assert expected.shape == (len(labels), 1, 8, 8) and np.isfinite(expected).all()
    for key in ("device-host-noise", "device-device-noise"):
        got = engines[key].sample_now(request(engines[key], labels, seed, **parameters))["image"]
        assert worst(got, expected) <= TOLERANCE, key


def run_schedule(engine, arrivals: dict[int, list], abort: dict[int, int] | None = None) -> dict[int, np.ndarray]:
    """Step the engine's scheduler on this thread: arrivals[step] = requests joining before that
    step; abort[i] = the step before which request i leaves. Images by arrival order."""
    results, jobs, step = {}, [], 0
    abort = abort or {}
    while step == 0 or engine.scheduler.has_jobs() or any(s >= step for s in arrivals):
        for req in arrivals.get(step, []):
            job = engine.job(req)
            i = len(jobs)
            job.deliver = lambda images, i=i: results.__setitem__(i, images)
            jobs.append(job)
            engine._add(job)
        for i, when in abort.items():
            if when == step:
                engine._abort(jobs[i])
        engine._step()
        step += 1
    assert all(not isinstance(r, BaseException) for r in results.values()), results
    return results


@pytest.mark.slow
def test_requests_that_join_and_leave_a_batch_give_the_cpu_loops_images(engines):
    """DDPM, DDIM with eta and unguided DDIM requests joining at different steps (one leaving
    half-way): every finished request's images equal the CPU loop's in the same schedule and the
    device loop's for the request alone."""
    def arrivals(engine):
        return {0: [request(engine, [1, 2], 21, sampler="ddpm", steps=40, guidance=2.0)],
                3: [request(engine, [3, -1, 8], 22, steps=15, eta=0.5)],
                5: [request(engine, [6], 23, steps=30, guidance=1.0), request(engine, [0, -1], 24, steps=4)],
                9: [request(engine, [5, 5], 25, steps=12, eta=1.0, guidance=4.0)]}
    leaves = {2: 12}                                 # the unguided DDIM request leaves after 7 of its 30 steps
    expected = run_schedule(engines["cpu-loop"], arrivals(engines["cpu-loop"]), leaves)
    assert sorted(expected) == [0, 1, 3, 4]
    for key in ("device-host-noise", "device-device-noise"):
        engine = engines[key]
        got = run_schedule(engine, arrivals(engine), leaves)
        assert sorted(got) == [0, 1, 3, 4]
        alone = [r for s in sorted(arrivals(engine)) for r in arrivals(engine)[s]]
        for i in got:
            assert worst(got[i], expected[i]) <= TOLERANCE, (key, i)
            assert worst(got[i], engine.sample_now(alone[i])["image"]) <= TOLERANCE, (key, i)
    assert engines["device-host-noise"].metrics.shared_steps > 0


@pytest.mark.slow
def test_host_noise_is_drawn_in_blocks_with_the_same_numbers(engines):
    """A request whose noise does not fit one block (here: 3 steps a block) draws block after block
    from its own generator: the same images as one block for all its steps."""
    engine = engines["device-host-noise"]
    loop = engine.loop
    small = DeviceLoop(loop.denoiser, loop.device, loop.alphas_cumprod, loop.null_label, "host",
                       max_noise_elements=3 * 2 * 64)
    req = request(engine, [2, 7], 31, sampler="ddpm", steps=10)
    job = engine.job(req)
    small.start(job.request, engine.shape)
    assert job.request.noise.block_steps == 3
    while not job.request.done:
        small.step([job.request])
    assert worst(small.images(job.request), engines["cpu-loop"].sample_now(req)["image"]) <= TOLERANCE


@pytest.mark.slow
def test_an_engine_restart_forgets_the_device_batch(engines):
    """A denoiser failure mid-way restarts the engine (503 to what it held); the next requests
    run in a fresh device batch and give the CPU loop's images."""
    from serve.engines.denoise import DenoiseEngine
    from serve.engines.step_loop import EngineFault

    base = engines["device-host-noise"]
    calls = []

    def flaky(x_t, t, label):
        calls.append(x_t.shape[0])
        if len(calls) == 6:
            raise RuntimeError("the device fell over")
        return base.loop.denoiser(x_t, t, label)
    loop = DeviceLoop(flaky, base.loop.device, base.loop.alphas_cumprod, base.null_label, "host")
    engine = DenoiseEngine(MODEL, 1, base.manifest, base.denoiser, base.config, Metrics().for_denoise_model(MODEL, 1),
                           loop=loop)
    first, second = request(engine, [1, 2], 41, steps=20), request(engine, [3, -1], 42, steps=10, eta=0.5)

    async def run():
        engine.start()
        try:
            with pytest.raises(EngineFault):
                await engine.sample(first, None)
            return await asyncio.gather(engine.sample(second, None), engine.sample(first, None))
        finally:
            await engine.close(1)
    got = asyncio.run(run())
    assert engine.metrics.engine_restarts == 1 and len(calls) > 6
    for req, out in zip((second, first), got):
        assert worst(out["image"], engines["cpu-loop"].sample_now(req)["image"]) <= TOLERANCE


# ---- through a real server --------------------------------------------------------------------

def infer(server, labels, seed, **parameters) -> np.ndarray:
    body = {"inputs": [{"name": "label", "shape": [len(labels)], "datatype": "INT64", "data": list(labels)},
                       {"name": "seed", "shape": [1], "datatype": "INT64", "data": [seed]}],
            "parameters": parameters}
    r = httpx.post(f"{server.url}/v2/models/{MODEL}/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    out = r.json()["outputs"][0]
    return np.array(out["data"], np.float32).reshape(out["shape"])


@pytest.mark.slow
def test_a_server_with_the_device_loop_answers_as_the_default_server(ts_registry, start_server):
    from PIL import Image

    bodies = [([3, -1, 7], 11, {}), ([1], 12, {"sampler": "ddpm", "steps": 60, "guidance": 2.0}),
              ([0, 5], 13, {"eta": 0.7, "steps": 25})]
    png = f"/v1/images/{MODEL}?label=7&n=4&seed=1&steps=10&per_row=2"
    with start_server(ts_registry) as default:
        expected = [infer(default, *b[:2], **b[2]) for b in bodies]
        expected_png = httpx.get(default.url + png, timeout=60)
        assert "denoising on" not in default.logs()
    with start_server(ts_registry, env={ON_DEVICE: "1"}) as device:
        assert "denoising on cpu (torch loop, noise from the host)" in device.logs()
        for body, want in zip(bodies, expected):
            assert worst(infer(device, *body[:2], **body[2]), want) <= TOLERANCE
        with ThreadPoolExecutor(len(bodies)) as pool:                       # together: one batch per step
            together = list(pool.map(lambda b: infer(device, *b[:2], **b[2]), bodies))
        for got, want in zip(together, expected):
            assert worst(got, want) <= TOLERANCE
        got_png = httpx.get(device.url + png, timeout=60)
    assert got_png.status_code == expected_png.status_code == 200
    with Image.open(io.BytesIO(got_png.content)) as a, Image.open(io.BytesIO(expected_png.content)) as b:
        assert np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() <= 1


# ---- classify: pinned staging buffers ------------------------------------------------------------

def test_staging_buffers_are_reused_and_grow_for_a_bigger_batch():
    staging = StagingBuffers(pin=False)
    a = np.arange(3 * 4, dtype=np.float32).reshape(3, 4)
    first = staging.stage("x", a)
    assert staging.allocations == 1 and staging.rows("x") == 4 and np.array_equal(first.numpy(), a)
    again = staging.stage("x", a[:2] + 1)                               # fewer rows: the same buffer
    assert staging.allocations == 1 and again.data_ptr() == first.data_ptr() and again.shape == (2, 4)
    assert np.array_equal(again.numpy(), a[:2] + 1)
    big = np.ones((9, 4), np.float32)
    grown = staging.stage("x", big)                                     # more rows: the next power of two
    assert staging.allocations == 2 and staging.rows("x") == 16 and np.array_equal(grown.numpy(), big)
    staging.stage("x", np.ones((16, 4), np.float32))                    # up to its capacity: no new buffer
    staging.stage("x", np.ones((17, 4), np.float32))                    # past it: at least twice the rows
    assert staging.allocations == 3 and staging.rows("x") == 32
    staging.stage("x", np.ones((2, 5), np.float32))                     # another row shape: a new buffer
    assert staging.allocations == 4 and staging.rows("x") == 2
    ids = staging.stage("ids", np.array([[1, 2]], np.int64))            # per key, with its own dtype
    assert ids.dtype == torch.int64 and staging.allocations == 5 and not ids.is_pinned()
    assert [StagingBuffers.capacity(n) for n in (0, 1, 2, 3, 4, 5, 33)] == [1, 1, 2, 4, 4, 8, 64]


@pytest.fixture
def classifier(tmp_path):
    """A small traced TorchScript classifier (conv + linear) and its runtime on the CPU."""
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 8 * 8, 10)).eval()
    path = tmp_path / "model.ts"
    with torch.no_grad():
        torch.jit.trace(model, torch.zeros(2, 1, 8, 8)).save(str(path))
    return TorchScriptRuntime(path, ["image"], ["logits"], threads=1, device="cpu")


def test_pinned_runtime_answers_as_the_plain_one_and_reuses_its_buffers(classifier):
    assert with_device_io(classifier) is classifier             # on the CPU the classify path is as before
    pinned = PinnedTorchRuntime(classifier, pin=False)
    assert pinned.device == "cpu" and pinned.format == "torchscript"
    rng = np.random.default_rng(0)
    outputs = []
    for rows in (3, 3, 8, 5, 1, 8):
        batch = {"image": rng.standard_normal((rows, 1, 8, 8)).astype(np.float32)}
        got = pinned.run(batch)
        assert got["logits"].shape == (rows, 10)
        assert np.array_equal(got["logits"], classifier.run(batch)["logits"])
        outputs.append(got["logits"])
    assert pinned.buffers().allocations == 4                          # in and out at 4 rows, both grown once to 8
    assert not np.shares_memory(outputs[-1], outputs[-2])             # answers are not views of the reused buffer

    barrier, seen, same = threading.Barrier(2), [], []

    def instance(seed: int) -> None:                                 # execution instances: one buffer set each
        batch = {"image": np.random.default_rng(seed).standard_normal((6, 1, 8, 8)).astype(np.float32)}
        barrier.wait()
        same.extend(np.array_equal(pinned.run(batch)["logits"], classifier.run(batch)["logits"]) for _ in range(20))
        seen.append(pinned.buffers())
        barrier.wait()                                               # both alive: their buffers are distinct
    threads = [threading.Thread(target=instance, args=(seed,)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(same) == 40 and all(same) and len(seen) == 2 and seen[0] is not seen[1]


# ---- on CUDA (run when a GPU is lent) -------------------------------------------------------------

def _marks(fn):
    for mark in needs_cuda:
        fn = mark(fn)
    return fn


@_marks
@pytest.mark.slow
def test_cuda_device_loop_gives_the_cpu_loops_images(ts_registry, engines):
    """On CUDA by default (no setting): the device loop, host noise: the CPU loop's images for the
    same seeds, alone and in a joining/leaving batch; device noise: the same alone as batched."""
    cuda = build(ts_registry, device="cuda")
    assert isinstance(cuda.loop, DeviceLoop) and cuda.loop.device.type == "cuda" and cuda.loop.noise == "host"
    assert cuda.golden_error <= CUDA_TOLERANCE
    for case, (labels, seed, parameters) in CASES.items():
        expected = engines["cpu-loop"].sample_now(request(cuda, labels, seed, **parameters))["image"]
        assert worst(cuda.sample_now(request(cuda, labels, seed, **parameters))["image"], expected) <= CUDA_TOLERANCE
    arrivals = lambda e: {0: [request(e, [1, 2], 21, sampler="ddpm", steps=40, guidance=2.0)],   # noqa: E731
                          3: [request(e, [3, -1, 8], 22, steps=15, eta=0.5)],
                          5: [request(e, [6], 23, steps=30, guidance=1.0)]}
    expected = run_schedule(engines["cpu-loop"], arrivals(engines["cpu-loop"]))
    got = run_schedule(cuda, arrivals(cuda))
    for i in expected:
        assert worst(got[i], expected[i]) <= CUDA_TOLERANCE, i
    on_device = build(ts_registry, device="cuda", noise="device")
    batched = run_schedule(on_device, arrivals(on_device))
    alone = [r for s in sorted(arrivals(on_device)) for r in arrivals(on_device)[s]]
    for i, req in enumerate(alone):
        assert worst(batched[i], on_device.sample_now(req)["image"]) <= TOLERANCE, i


@_marks
def test_cuda_pinned_runtime_answers_as_the_cpu_one(classifier, tmp_path):
    cuda = TorchScriptRuntime(tmp_path / "model.ts", ["image"], ["logits"], threads=1, device="cuda")
    pinned = with_device_io(cuda)
    assert isinstance(pinned, PinnedTorchRuntime) and pinned.pin
    rng = np.random.default_rng(0)
    for rows in (3, 8, 5, 32):
        batch = {"image": rng.standard_normal((rows, 1, 8, 8)).astype(np.float32)}
        assert worst(pinned.run(batch)["logits"], classifier.run(batch)["logits"]) <= CUDA_TOLERANCE
    assert pinned.buffers().host(("in", "image"), (1, 1, 8, 8), torch.float32).is_pinned()
    started = time.perf_counter()
    for _ in range(50):
        pinned.run({"image": rng.standard_normal((32, 1, 8, 8)).astype(np.float32)})
    print(f"pinned classify batch of 32 on cuda: {(time.perf_counter() - started) / 50 * 1e3:.3f} ms")
