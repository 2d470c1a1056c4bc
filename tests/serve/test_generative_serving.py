"""The samplers behind the real server (gan, vae, diffusion over KServe v2, and PNG grids): served
images equal training.generative.sample (eager) for the same seed, seeded requests repeat bit for
bit, the VAE reconstructs and encodes, bad input is a 400 naming the field, and the denoise engine
steps requests that arrived at different times in shared UNet batches, each answering exactly as
it would alone (its metrics say so). Plus the denoise engine's books with a fake denoiser."""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from model_registry import Manifest, Registry
from serve.batching import Closed, DeadlineExceeded, QueueFull
from serve.engines.denoise import DenoiseEngine, DenoiseJob, DenoiseScheduler
from serve.metrics import Metrics
from serve.sample_request import sample_request
from training import checkpoint, generative
from training.families import family_module, make_config

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
MAX_SAMPLES = 32
FAMILIES = ("gan", "vae", "diffusion")


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(generative_registry, start_server):
    with start_server(generative_registry, env={"ZOOSERVE_MAX_SAMPLES_PER_REQUEST": str(MAX_SAMPLES)}) as s:
        yield s


@pytest.fixture(scope="module")
def eager(generative_registry):
    """family -> (eager model, config), loaded from the published version folders."""
    return {f: checkpoint.load(generative_registry / f"{f}-digits" / "1") for f in FAMILIES}


def sampler_body(labels, seed=None, outputs=None, **parameters) -> dict:
    body = {"inputs": [{"name": "label", "shape": [len(labels)], "datatype": "INT64", "data": list(labels)}]}
    if seed is not None:
        body["inputs"].append({"name": "seed", "shape": [1], "datatype": "INT64", "data": [seed]})
    if outputs:
        body["outputs"] = [{"name": n} for n in outputs]
    if parameters:
        body["parameters"] = parameters
    return body


def post(server, model: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}/v2/models/{model}/infer", json=body, timeout=60)


def tensors(response: httpx.Response) -> dict[str, np.ndarray]:
    assert response.status_code == 200, response.text
    dtypes = {"FP32": np.float32, "INT64": np.int64}
    return {o["name"]: np.array(o["data"], dtypes[o["datatype"]]).reshape(o["shape"])
            for o in response.json()["outputs"]}


def metric(server, name: str, model: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == name and s.labels.get("model") == model
               and all(s.labels.get(k) == v for k, v in labels.items()))


def digits_unit(n: int) -> np.ndarray:
    return generative.digits_unit(seed=0).test[0][:n].numpy()


# ---- the manifest -------------------------------------------------------------------------------

def test_manifests_list_parts_with_parity_and_old_manifests_still_load(generative_registry):
    parts = {"gan": ["generator"], "vae": ["decoder", "encoder"], "diffusion": ["denoiser"]}
    for family in FAMILIES:
        manifest = Registry(generative_registry).manifest(f"{family}-digits", 1)
        assert list(manifest.parts) == parts[family]
        for name, part in manifest.parts.items():
            assert set(part.artifacts) == {"onnx", "torchscript"}
            assert all(r.passed and r.max_abs_error <= 1e-4 for r in part.parity)
            assert all((generative_registry / f"{family}-digits" / "1" / f).is_file() for f in part.artifacts.values())
        # end to end (seeded requests through the exported part vs generative.sample) in `parity`
        assert all(r.passed and r.max_abs_error <= r.tolerance for r in manifest.parity)
        assert [s.name for s in manifest.signature.inputs][:2] == ["label", "seed"]
    old = Manifest.model_validate({"family": "mlp", "kind": "classify", "format": "onnx",
                                   "artifacts": {"onnx": "model.onnx"},
                                   "signature": {"inputs": [], "outputs": []}})
    assert old.parts is None


# ---- v2 infer against eager -------------------------------------------------------------------

CASES = [("gan", [0, 7, -1, 3], {}), ("gan", list(range(-1, 10)) * 2, {}),   # 22 rows: batcher slices of 8
         ("vae", [-1, -1, -1], {}),
         ("diffusion", [0, 7, -1], {}),                                       # manifest defaults: DDIM 50, g 1.5
         ("diffusion", [2, -1], {"sampler": "ddpm", "steps": 40}),
         ("diffusion", [5, 5, 9], {"sampler": "ddim", "steps": 12, "eta": 0.8, "guidance": 3.0})]


@pytest.mark.parametrize("family,labels,params", CASES)
def test_served_images_equal_eager_sample_and_repeat_bit_for_bit(server, eager, family, labels, params):
    first = post(server, f"{family}-digits", sampler_body(labels, 11, **params))
    assert first.headers["x-model-version"] == "1" and first.headers["x-seed"] == "11"
    got = tensors(first)
    model, config = eager[family]
    expected = generative.sample(family, model, config, torch.tensor(labels), 11, **dict(params)).numpy()
    assert got["image"].shape == (len(labels), 1, 8, 8)
    assert np.abs(got["image"] - expected).max() <= 1e-4          # measured: ~1e-6
    again = tensors(post(server, f"{family}-digits", sampler_body(labels, 11, **params)))
    assert all(np.array_equal(again[k], got[k]) for k in got)
    other = tensors(post(server, f"{family}-digits", sampler_body(labels, 12, **params)))
    assert not np.array_equal(other["image"], got["image"])
    if family == "gan":     # -1 drew a class from the request's generator, reported in `label`
        _, used = generative.draw_latents("gan", config, torch.tensor(labels), 11)
        asked = np.array(labels)
        assert got["label"].tolist() == used.tolist() and np.array_equal(got["label"][asked >= 0], asked[asked >= 0])
        assert ((got["label"] >= 0) & (got["label"] < 10)).all()


def test_stock_triton_client_with_binary_tensors(server, eager):
    import tritonclient.http as triton

    client = triton.InferenceServerClient(server.url.removeprefix("http://"))
    label, seed = triton.InferInput("label", [3], "INT64"), triton.InferInput("seed", [1], "INT64")
    label.set_data_from_numpy(np.array([1, -1, 4], np.int64))
    seed.set_data_from_numpy(np.array([5], np.int64))
    result = client.infer("diffusion-digits", [label, seed], parameters={"steps": 6, "guidance": 2.0})
    model, config = eager["diffusion"]
    expected = generative.sample("diffusion", model, config, torch.tensor([1, -1, 4]), 5, steps=6, guidance=2.0)
    assert np.abs(result.as_numpy("image") - expected.numpy()).max() <= 1e-4
    client.close()


def test_unseeded_requests_report_their_seed(server, eager):
    response = post(server, "gan-digits", sampler_body([4, 4]))
    seed = int(response.headers["x-seed"])
    model, config = eager["gan"]
    expected = generative.sample("gan", model, config, torch.tensor([4, 4]), seed).numpy()
    assert np.abs(tensors(response)["image"] - expected).max() <= 1e-4


def test_vae_reconstructs_and_encodes_images(server, eager):
    model, _ = eager["vae"]
    images = digits_unit(5)

    def image_body(outputs=None):
        body = {"inputs": [{"name": "image", "shape": list(images.shape), "datatype": "FP32",
                            "data": images.ravel().tolist()}]}
        if outputs:
            body["outputs"] = [{"name": n} for n in outputs]
        return body
    out = tensors(post(server, "vae-digits", image_body()))
    assert set(out) == {"image", "latent_mean", "latent_log_var"}
    with torch.no_grad():
        mean, log_var = model.encoder(torch.from_numpy(images))
        recon = model.reconstruct(torch.from_numpy(images))
    assert np.abs(out["latent_mean"] - mean.numpy()).max() <= 1e-4
    assert np.abs(out["latent_log_var"] - log_var.numpy()).max() <= 1e-4
    assert np.abs(out["image"] - recon.numpy()).max() <= 1e-4
    only = tensors(post(server, "vae-digits", image_body(["latent_mean"])))   # embeddings: the encoder alone
    assert list(only) == ["latent_mean"] and np.array_equal(only["latent_mean"], out["latent_mean"])


def test_torchscript_parts_load_golden_check_and_sample_the_same(generative_registry, eager):
    """The second format: every part opened through TorchScript, golden-checked (parts and the public
    request) and sampling as eager does (in process: the engines without HTTP)."""
    from serve.engines.sample import make_generative_engine
    from serve.settings import ServeSettings

    for family in ("vae", "diffusion"):
        vdir = generative_registry / f"{family}-digits" / "1"
        manifest = Registry(generative_registry).manifest(f"{family}-digits", 1).model_copy(
            update={"format": "torchscript"})
        engine = make_generative_engine(f"{family}-digits", 1, manifest, vdir, Registry(generative_registry)
                                        .model_config(f"{family}-digits").batching, ServeSettings(), Metrics())
        assert engine.golden_error <= 1e-4
        labels = [-1, -1] if family == "vae" else [3, -1]
        req = sample_request(manifest, {"label": np.array(labels), "seed": np.array([4])}, {})
        model, config = eager[family]
        expected = generative.sample(family, model, config, torch.tensor(labels), 4).numpy()
        assert np.abs(engine.sample_now(req)["image"] - expected).max() <= 1e-4


# ---- PNG -------------------------------------------------------------------------------------

def test_png_route_and_png_parameter_draw_the_v2_images(server):
    from PIL import Image

    url = f"{server.url}/v1/images/diffusion-digits?label=7&n=4&seed=1&steps=5&per_row=2"
    grid = httpx.get(url, timeout=60)
    assert grid.status_code == 200 and grid.headers["content-type"] == "image/png"
    assert grid.headers["x-seed"] == "1" and grid.headers["x-model-version"] == "1"
    as_png = post(server, "diffusion-digits", sampler_body([7] * 4, 1, steps=5, response_format="png"))
    assert as_png.headers["content-type"] == "image/png" and as_png.content == grid.content
    images = tensors(post(server, "diffusion-digits", sampler_body([7] * 4, 1, steps=5)))["image"]
    expected = generative.grid_png(torch.from_numpy(images), per_row=2)
    with Image.open(io.BytesIO(grid.content)) as got, Image.open(io.BytesIO(expected)) as want:
        assert got.size == (2 * 33 + 1, 2 * 33 + 1) and np.array_equal(np.asarray(got), np.asarray(want))
    labelled = httpx.get(f"{server.url}/v1/images/gan-digits?label=0,1,2,3,4,5,6,7,8,9&seed=3&version=stable")
    assert labelled.status_code == 200 and labelled.content[:8] == b"\x89PNG\r\n\x1a\n"


# ---- bad input --------------------------------------------------------------------------------

BAD = [
    ("diffusion-digits", sampler_body([1], 1, steps=0), "parameters.steps"),
    ("diffusion-digits", sampler_body([1], 1, steps=1001), "num_train_timesteps"),
    ("diffusion-digits", sampler_body([1], 1, steps=2.5), "parameters.steps"),
    ("diffusion-digits", sampler_body([1], 1, guidance=-0.5), "parameters.guidance"),
    ("diffusion-digits", sampler_body([1], 1, eta=1.5), "parameters.eta"),
    ("diffusion-digits", sampler_body([1], 1, sampler="ddpm", eta=0.5), "parameters.eta"),
    ("diffusion-digits", sampler_body([1], 1, sampler="euler"), "parameters.sampler"),
    ("diffusion-digits", sampler_body([10], 1), "input 'label': 10"),
    ("gan-digits", sampler_body([-2], 1), "input 'label': -2"),
    ("vae-digits", sampler_body([3], 1), "every label must be -1"),
    ("gan-digits", sampler_body([1], 1, steps=10), "parameters.steps applies to diffusion"),
    ("gan-digits", sampler_body([1] * (MAX_SAMPLES + 1), 1), "at most 32"),
    ("diffusion-digits", sampler_body([1], 1, response_format="gif"), "parameters.response_format"),
    ("vae-digits", sampler_body([-1], 1, outputs=["latent_mean"]), "output 'latent_mean'"),
    ("gan-digits", {"inputs": [{"name": "seed", "shape": [1], "datatype": "INT64", "data": [1]}]},
     "missing input 'label'"),
    ("gan-digits", {"inputs": [{"name": "label", "shape": [1], "datatype": "INT64", "data": [1]},
                               {"name": "seed", "shape": [2], "datatype": "INT64", "data": [1, 2]}]}, "input 'seed'"),
    ("gan-digits", {"inputs": [{"name": "label", "shape": [1], "datatype": "INT64", "data": [1]},
                               {"name": "seed", "shape": [], "datatype": "INT64", "data": [1]}]}, "input 'seed'"),
    ("gan-digits", {"inputs": [{"name": "label", "shape": [1], "datatype": "FP32", "data": [1.0]}]}, "input 'label'"),
    ("vae-digits", {"inputs": [{"name": "label", "shape": [1], "datatype": "INT64", "data": [-1]},
                               {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [0.0] * 64}]},
     "not both"),
]


def test_bad_input_is_a_400_naming_the_field_and_the_server_stays_up(server):
    for model, body, field in BAD:
        response = post(server, model, body)
        assert response.status_code == 400, (body, response.text)
        assert field in response.json()["error"], (field, response.json())
    for query, field in (("label=7&n=33", "query n"), ("label=x", "query label"), ("label=1,2&n=3", "disagrees"),
                         ("label=7&steps=0", "parameters.steps"), ("label=7&n=abc", "query.n")):
        response = httpx.get(f"{server.url}/v1/images/diffusion-digits?{query}")
        assert response.status_code == 400 and field in response.json()["error"], (query, response.text)
    assert httpx.get(f"{server.url}/v1/images/nope").status_code == 404
    timed_out = post(server, "diffusion-digits", sampler_body([1], 1, timeout=1))   # 1 microsecond
    assert timed_out.status_code == 504 and "deadline" in timed_out.json()["error"]
    assert httpx.get(f"{server.url}/v2/health/ready").status_code == 200
    assert post(server, "diffusion-digits", sampler_body([1], 1, steps=2)).status_code == 200


def test_a_full_sampler_queue_answers_429_and_loses_nothing(generative_registry, start_server, tmp_path):
    """gan-digits with room for one waiting request, 16 large requests at once: those beyond the
    room get 429 with a JSON error and Retry-After; every accepted one answers 200 with all its
    images (sliced across batches: admitted whole or refused whole); the server stays ready."""
    root = tmp_path / "registry"
    shutil.copytree(generative_registry, root)
    registry = Registry(root)
    cfg = registry.model_config("gan-digits")
    cfg.batching.max_batch_size, cfg.batching.max_queue_size, cfg.batching.max_queue_delay_ms = 256, 1, 0.0
    registry.write_model_config(cfg)
    labels = [i % 10 for i in range(1024)]                               # 4 slices of 256 rows each
    with start_server(root, env={"ZOOSERVE_MAX_SAMPLES_PER_REQUEST": "1024"}) as s:
        with ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(lambda seed: post(s, "gan-digits", sampler_body(labels, seed)), range(16)))
        codes = sorted(r.status_code for r in responses)
        assert 429 in codes and 200 in codes and set(codes) == {200, 429}, codes
        for seed, r in enumerate(responses):
            if r.status_code == 429:
                assert "queue is full" in r.json()["error"] and int(r.headers["Retry-After"]) >= 1
            else:
                images = tensors(r)["image"]
                assert images.shape == (1024, 1, 8, 8) and np.isfinite(images).all()
        assert httpx.get(f"{s.url}/v2/health/ready").status_code == 200
        assert tensors(post(s, "gan-digits", sampler_body([3], 1)))["image"].shape == (1, 1, 8, 8)
        assert metric(s, "zooserve_requests_total", "gan-digits", status="429") == codes.count(429)


# ---- the denoise engine: requests at different timesteps in one UNet batch ----------------------

def test_requests_started_apart_share_unet_steps_and_answer_as_alone(server):
    """A (DDPM, 300 steps) runs; B (DDIM, 30 steps) arrives while A is mid-way: every step of B's
    carried A's rows too (the engine's shared-step counter), and both answers are bit-identical to
    the same requests run alone."""
    model = "diffusion-digits"
    a_body = sampler_body([1, 2], 21, sampler="ddpm", steps=300)
    b_body = sampler_body([3, -1, 8], 22, sampler="ddim", steps=30, eta=0.5)
    steps0, shared0 = (metric(server, f"zooserve_denoise_{n}_total", model) for n in ("steps", "shared_steps"))
    results: dict[str, httpx.Response] = {}
    a = threading.Thread(target=lambda: results.__setitem__("a", post(server, model, a_body)))
    a.start()
    deadline = time.monotonic() + 10
    while metric(server, "zooserve_denoise_steps_total", model) < steps0 + 20:   # A is mid-way
        assert time.monotonic() < deadline
        time.sleep(0.01)
    results["b"] = post(server, model, b_body)
    b_done = metric(server, "zooserve_denoise_steps_total", model)
    a.join()
    assert b_done < steps0 + 300, "A had finished before B did: nothing to share"
    assert metric(server, "zooserve_denoise_shared_steps_total", model) - shared0 == 30
    assert metric(server, "zooserve_denoise_steps_total", model) - steps0 == 300
    alone = {"a": post(server, model, a_body), "b": post(server, model, b_body)}
    for key in ("a", "b"):
        together, by_itself = tensors(results[key])["image"], tensors(alone[key])["image"]
        assert np.array_equal(together, by_itself), np.abs(together - by_itself).max()


@pytest.mark.parametrize("route", ["v2", "png"])
def test_a_client_that_leaves_mid_denoise_frees_its_rows(server, route):
    """A DDPM request of 1,000 steps whose client closes the connection after ~20 steps: the
    engine stops stepping it (the step counter stands still well before 1,000), the request counts
    as 499 and nothing stays running; the next request is answered normally."""
    model = "diffusion-digits"
    if route == "v2":
        body = json.dumps(sampler_body([1, 2], 5, sampler="ddpm", steps=1000)).encode()
        request = (f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    else:
        request = f"GET /v1/images/{model}?label=3&n=2&seed=5&sampler=ddpm&steps=1000 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    steps0, left0 = metric(server, "zooserve_denoise_steps_total", model), metric(
        server, "zooserve_requests_total", model, status="499")
    host, port = server.url.removeprefix("http://").split(":")
    client = socket.create_connection((host, int(port)))
    client.sendall(request)
    deadline = time.monotonic() + 20
    while metric(server, "zooserve_denoise_steps_total", model) < steps0 + 20:      # it is running
        assert time.monotonic() < deadline
        time.sleep(0.01)
    client.close()
    deadline = time.monotonic() + 10
    while metric(server, "zooserve_requests_total", model, status="499") < left0 + 1:
        assert time.monotonic() < deadline, "the request was not counted as abandoned"
        time.sleep(0.02)
    stopped = metric(server, "zooserve_denoise_steps_total", model)
    time.sleep(0.3)
    assert metric(server, "zooserve_denoise_steps_total", model) == stopped < steps0 + 1000
    assert metric(server, "zooserve_requests_running", model) == 0
    assert tensors(post(server, model, sampler_body([4], 1, steps=5)))["image"].shape == (1, 1, 8, 8)


def test_metrics_parse_and_carry_the_sampler_families(server):
    post(server, "gan-digits", sampler_body([1, 2, 3], 1))
    post(server, "diffusion-digits", sampler_body([4], 1, steps=7))
    assert post(server, "diffusion-digits", sampler_body([4], 1, steps=0)).status_code == 400
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in (("zooserve_denoise_steps", "counter"), ("zooserve_denoise_shared_steps", "counter"),
                       ("zooserve_denoise_step_rows", "histogram"), ("zooserve_denoise_step_requests", "histogram"),
                       ("zooserve_denoise_request_steps", "histogram"),
                       ("zooserve_queue_duration_seconds", "histogram"),
                       ("zooserve_requests_running", "gauge"), ("zooserve_requests_waiting", "gauge")):
        assert families[name].type == kind
        assert any(s.labels.get("model") == "diffusion-digits" and s.labels.get("version") == "1"
                   for s in families[name].samples), name
    assert metric(server, "zooserve_denoise_request_steps_bucket", "diffusion-digits", le="10.0") >= 1
    assert metric(server, "zooserve_queue_duration_seconds_count", "diffusion-digits") >= 1
    assert metric(server, "zooserve_requests_total", "gan-digits", status="200") >= 1
    assert metric(server, "zooserve_batch_size_count", "gan-digits") >= 1
    assert metric(server, "zooserve_requests_total", "diffusion-digits", status="400") >= 1
    assert metric(server, "zooserve_model_ready", "vae-digits") == 1
    stats = httpx.get(f"{server.url}/v2/models/diffusion-digits/stats").json()["model_stats"][0]
    assert stats["execution_count"] == metric(server, "zooserve_denoise_steps_total", "diffusion-digits")


def test_locust_sampler_users_run_without_failures(server, tmp_path):
    env = {**os.environ, "ZOOSERVE_LOADTEST_OUT": str(tmp_path), "ZOOSERVE_LOADTEST_SAMPLES": "2",
           "ZOOSERVE_LOADTEST_DIFFUSION_STEPS": "8", "LOCUST_ARGS": "GanUser VaeUser DiffusionUser"}
    proc = subprocess.run(["bash", "loadtest/run.sh", server.url, "3", "5s"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]   # locust exits 1 on any failure
    # locust's final table (the CSV is rewritten once a second and can miss the last second)
    output = proc.stdout + proc.stderr
    ran = {(model, kind): int(count) for model, kind, count in
           re.findall(r"^POST\s+/v2/models/(\S+)/infer \((\w+)\)\s+(\d+)\s+0\(0\.00%\)", output, re.M)}
    assert {"gan-digits", "vae-digits", "diffusion-digits"} == {model for model, _ in ran}, output[-3000:]
    assert ran.get(("vae-digits", "reconstruct"), 0) + ran.get(("vae-digits", "encode"), 0) > 0
    (stats,) = tmp_path.glob("*_stats.csv")
    with stats.open() as f:
        assert next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")["Failure Count"] == "0"


# ---- the denoise engine's books, with a fake denoiser -------------------------------------------

def fake_denoiser(calls: list[int] | None = None, delay_s: float = 0.0):
    """Row-wise deterministic: eps depends on its own row's x, t and label only."""
    def denoise(x_t, t, label):
        if calls is not None:
            calls.append(x_t.shape[0])
        if delay_s:
            time.sleep(delay_s)
        return torch.tanh(x_t) * 0.5 + (t.float() / 1000 - 0.5 + 0.05 * label.float()).view(-1, 1, 1, 1)
    return denoise


def fake_engine(denoiser, max_rows: int = 256, max_waiting: int = 1024) -> DenoiseEngine:
    config = make_config("diffusion", "tiny")
    image = {"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}
    manifest = Manifest(family="diffusion", kind="denoise", format="onnx", artifacts={"onnx": "denoiser.onnx"},
                        signature={"inputs": [{"name": "label", "datatype": "INT64", "shape": [-1]},
                                              {"name": "seed", "datatype": "INT64", "shape": [1]}],
                                   "outputs": [image]},
                        generation=family_module("diffusion").generation_defaults(config))
    return DenoiseEngine("fake", 1, manifest, denoiser, config, Metrics().for_denoise_model("fake", 1),
                         max_rows, max_waiting)


def request(engine, labels, seed, **parameters):
    inputs = {"label": np.array(labels, np.int64), "seed": np.array([seed], np.int64)}
    return sample_request(engine.manifest, inputs, parameters)


def test_scheduler_admits_fifo_within_the_row_budget():
    class Done:
        done = False
    jobs = [DenoiseJob(Done(), rows, 0.0, None) for rows in (3, 2, 4, 9)]
    books = DenoiseScheduler(max_rows=6)
    for job in jobs:
        books.add(job)
    assert books.schedule(0.0) == ([jobs[0], jobs[1]], [])     # 3 + 2 fit; 4 waits, and 9 behind it
    jobs[0].request.done = True
    assert books.take_finished() == [jobs[0]] and books.rows_running == 2
    assert books.schedule(0.0) == ([jobs[2]], []) and books.rows_running == 6
    jobs[1].request.done = jobs[2].request.done = True
    books.take_finished()
    assert books.schedule(0.0) == ([jobs[3]], [])               # larger than the budget: runs alone
    late = DenoiseJob(Done(), 1, 0.0, deadline=1.0)
    books.add(late)
    assert books.schedule(2.0) == ([], [late]) and not books.waiting


def test_engine_joins_bounds_rows_and_answers_as_alone():
    calls: list[int] = []
    engine = fake_engine(fake_denoiser(calls, delay_s=0.002), max_rows=5)
    reqs = [request(engine, [1, 2], 1, steps=20, guidance=1.0),                       # 2 rows
            request(engine, [3, -1], 2, sampler="ddpm", steps=12, guidance=2.0),      # 3 rows (one guided twin)
            request(engine, [4], 3, steps=8, eta=1.0, guidance=1.0)]                  # 1 row: waits for room

    async def run():
        engine.start()
        try:
            first = asyncio.create_task(engine.sample(reqs[0], None))
            await asyncio.sleep(0.02)                           # joins a loop already at work
            rest = [asyncio.create_task(engine.sample(r, None)) for r in reqs[1:]]
            return [t["image"] for t in await asyncio.gather(first, *rest)]
        finally:
            await engine.close(1)
    together = asyncio.run(run())
    assert max(calls) == 5 and min(calls) >= 1                  # never more than max_rows rows in a step
    assert any(c == 5 for c in calls) and len(calls) < 20 + 12 + 8   # shared steps
    assert engine.metrics.shared_steps > 0 and engine.metrics.steps == len(calls)
    for req, got in zip(reqs, together):
        assert np.array_equal(got, engine.sample_now(req)["image"])


def test_engine_queue_full_deadlines_and_close():
    engine = fake_engine(fake_denoiser(delay_s=0.005), max_rows=1, max_waiting=1)

    async def run():
        engine.start()
        long = asyncio.create_task(engine.sample(request(engine, [1], 1, steps=60, guidance=1.0), None))
        await asyncio.sleep(0.05)                               # running: it holds the only row
        waiting = asyncio.create_task(engine.sample(request(engine, [2], 2, steps=2, guidance=1.0),
                                                    time.perf_counter() + 0.05))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            await engine.sample(request(engine, [3], 3, steps=2, guidance=1.0), None)
        with pytest.raises(DeadlineExceeded, match="not computed"):
            await waiting
        await long
        with pytest.raises(DeadlineExceeded, match="after"):    # expires while running: leaves mid-way
            await engine.sample(request(engine, [4], 4, steps=500, guidance=1.0), time.perf_counter() + 0.05)
        await engine.close(1)
        with pytest.raises(Closed):
            await engine.sample(request(engine, [5], 5, steps=2, guidance=1.0), None)
    asyncio.run(run())
