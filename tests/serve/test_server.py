"""The real server on a free loopback port, over HTTP: every endpoint, every bad input, batching
seen in the metrics, the stock tritonclient, hash checks at load, versions and aliases, admin.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import shutil

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits

from model_registry import Registry

pytestmark = pytest.mark.slow

DIGITS = load_digits()


def digit_request(indices=(0,), **extra) -> dict:
    images = DIGITS.images[list(indices)].astype(np.float32)
    body = {"inputs": [{"name": "image", "shape": [len(indices), 1, 8, 8], "datatype": "FP32",
                        "data": images.flatten().tolist()}]}
    body.update(extra)
    return body


def metric_samples(text: str, name: str, **labels) -> list:
    return [s for fam in text_string_to_metric_families(text) for s in fam.samples
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())]


def metric_value(text: str, name: str, **labels) -> float:
    return sum(s.value for s in metric_samples(text, name, **labels))


# ---- endpoints --------------------------------------------------------------------------------

def test_health_and_server_metadata(demo_server):
    assert httpx.get(f"{demo_server.url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{demo_server.url}/v2/health/ready").json() == {"ready": True}
    meta = httpx.get(f"{demo_server.url}/v2").json()
    assert meta["name"] == "zooserve" and "binary_tensor_data" in meta["extensions"]


@pytest.mark.parametrize("path", ["/v2/models/mlp-digits", "/v2/models/mlp-digits/versions/1"])
def test_model_metadata(demo_server, path):
    r = httpx.get(demo_server.url + path)
    assert r.status_code == 200 and r.headers["x-model-version"] == "1"
    meta = r.json()
    assert meta["name"] == "mlp-digits" and meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 10]}]
    assert meta["parameters"]["labels"][3] == "3"


def test_model_ready_config_and_stats(demo_server):
    url = demo_server.url
    assert httpx.get(f"{url}/v2/models/resnet-digits/ready").json()["ready"] is True
    assert httpx.get(f"{url}/v2/models/resnet-digits/versions/1/ready").status_code == 200
    config = httpx.get(f"{url}/v2/models/resnet-digits/config").json()
    assert config["max_batch_size"] == 32 and config["input"][0] == {"name": "image", "data_type": "TYPE_FP32",
                                                                     "dims": [1, 8, 8]}
    assert httpx.get(f"{url}/v2/models/resnet-digits/versions/1/config").json() == config
    from serve.instances import usable_cores

    # no GPU here; one execution instance per usable core but the event loop's (tests/serve/test_instances.py)
    assert config["instance_group"] == [{"name": "resnet-digits_0", "kind": "KIND_CPU",
                                         "count": max(1, usable_cores() - 1)}]
    httpx.post(f"{url}/v2/models/resnet-digits/infer", json=digit_request((1, 2)))
    stats = httpx.get(f"{url}/v2/models/resnet-digits/stats").json()["model_stats"][0]
    assert stats["name"] == "resnet-digits" and stats["inference_count"] >= 2
    assert stats["inference_stats"]["success"]["count"] >= 1
    everything = httpx.get(f"{url}/v2/models/stats").json()["model_stats"]
    assert {s["name"] for s in everything} == {"mlp-digits", "resnet-digits"}


@pytest.mark.parametrize("model", ["mlp-digits", "resnet-digits"])
def test_infer_classifies_real_digits(demo_server, model):
    indices = list(range(100, 116))
    r = httpx.post(f"{demo_server.url}/v2/models/{model}/infer", json=digit_request(indices, id="req-7"))
    assert r.status_code == 200, r.text
    assert r.headers["x-model-version"] == "1"
    body = r.json()
    assert body["model_name"] == model and body["model_version"] == "1" and body["id"] == "req-7"
    (out,) = body["outputs"]
    assert out["name"] == "logits" and out["shape"] == [16, 10] and out["datatype"] == "FP32"
    predicted = np.asarray(out["data"]).reshape(16, 10).argmax(1)
    assert (predicted == DIGITS.target[indices]).mean() >= 0.9


def test_infer_accepts_gzip_bodies(demo_server):
    body = gzip.compress(json.dumps(digit_request((5,))).encode())
    r = httpx.post(f"{demo_server.url}/v2/models/mlp-digits/infer", content=body,
                   headers={"Content-Encoding": "gzip"})
    assert r.status_code == 200 and r.json()["outputs"][0]["shape"] == [1, 10]


def test_repository_index_metrics_and_openapi(demo_server):
    index = httpx.post(f"{demo_server.url}/v2/repository/index").json()
    assert {"name": "mlp-digits", "version": "1", "state": "READY"} in index
    text = httpx.get(f"{demo_server.url}/metrics").text
    assert metric_value(text, "zooserve_model_ready", model="mlp-digits", version="1") == 1.0
    for name in ("zooserve_requests_total", "zooserve_request_duration_seconds_count",
                 "zooserve_queue_duration_seconds_count", "zooserve_compute_duration_seconds_count",
                 "zooserve_inference_count_total", "zooserve_execution_count_total", "zooserve_batch_size_count"):
        assert metric_samples(text, name), name
    assert metric_samples(text, "zooserve_queue_depth", model="resnet-digits")
    spec = httpx.get(f"{demo_server.url}/openapi.json").json()
    assert "/v2/models/{model}/infer" in spec["paths"]
    assert "requestBody" in spec["paths"]["/v2/models/{model}/infer"]["post"]


# ---- bad input ----------------------------------------------------------------------------------

def _image(**overrides) -> dict:
    spec = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": [1.0] * 64}
    spec.update(overrides)
    return spec


BAD_REQUESTS = [
    ("malformed JSON", b'{"inputs": [', 400, "malformed JSON"),
    ("not an object", b"[1, 2]", 400, "object"),
    ("missing inputs", {"outputs": []}, 400, "inputs"),
    ("empty inputs", {"inputs": []}, 400, "inputs"),
    ("unknown input", {"inputs": [_image(name="pixels")]}, 400, "pixels"),
    ("missing input", {"inputs": [_image(name="image2")]}, 400, "image"),
    ("wrong datatype", {"inputs": [_image(datatype="INT64", data=[1] * 64)]}, 400, "INT64"),
    ("shape vs data", {"inputs": [_image(data=[1.0] * 63)]}, 400, "63"),
    ("shape vs signature", {"inputs": [_image(shape=[1, 1, 8, 9], data=[1.0] * 72)]}, 400, "image"),
    ("wrong rank", {"inputs": [_image(shape=[1, 64], data=[1.0] * 64)]}, 400, "image"),
    ("strings as floats", {"inputs": [_image(data=["a"] * 64)]}, 400, "image"),
    ("empty batch", {"inputs": [_image(shape=[0, 1, 8, 8], data=[])]}, 400, "empty"),
    ("batch over max", {"inputs": [_image(shape=[33, 1, 8, 8], data=[1.0] * 64 * 33)]}, 400, "32"),
    ("unknown output", {"inputs": [_image()], "outputs": [{"name": "probs"}]}, 400, "probs"),
]


@pytest.mark.parametrize("case,body,status,needle", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_input_gets_a_json_4xx_naming_the_problem(demo_server, case, body, status, needle):
    url = f"{demo_server.url}/v2/models/mlp-digits/infer"
    r = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_non_finite_values_are_refused(demo_server):
    inp = triton.InferInput("image", [1, 1, 8, 8], "FP32")
    data = np.ones((1, 1, 8, 8), np.float32)
    data[0, 0, 3, 3] = np.nan
    inp.set_data_from_numpy(data, binary_data=True)
    body, json_size = triton.InferenceServerClient.generate_request_body([inp])
    r = httpx.post(f"{demo_server.url}/v2/models/mlp-digits/infer", content=body,
                   headers={"Inference-Header-Content-Length": str(json_size)})
    assert r.status_code == 400 and "NaN" in r.json()["error"]
    # NaN is not even JSON: orjson refuses the literal, as a malformed body
    r = httpx.post(f"{demo_server.url}/v2/models/mlp-digits/infer",
                   content=b'{"inputs":[{"name":"image","shape":[1,1,8,8],"datatype":"FP32","data":[NaN]}]}')
    assert r.status_code == 400


def test_body_over_the_limit_is_413(demo_server):
    r = httpx.post(f"{demo_server.url}/v2/models/mlp-digits/infer", content=b" " * (17 * 1024 * 1024))
    assert r.status_code == 413 and "limit" in r.json()["error"]


@pytest.mark.parametrize("path,needle", [
    ("/v2/models/nope/infer", "unknown model 'nope'"),
    ("/v2/models/mlp-digits/versions/9/infer", "version 9"),
    ("/v2/models/mlp-digits/versions/canary/infer", "canary"),
    ("/v2/models/nope", "nope"),
    ("/v2/nothing-here", "no route"),
])
def test_unknown_model_version_alias_route_are_404(demo_server, path, needle):
    r = httpx.post(demo_server.url + path, json=digit_request()) if path.endswith("infer") \
        else httpx.get(demo_server.url + path)
    assert r.status_code == 404 and needle in r.json()["error"]


def test_server_survives_the_bad_input_battery(demo_server):
    for _, body, _, _ in BAD_REQUESTS:
        url = f"{demo_server.url}/v2/models/resnet-digits/infer"
        httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert httpx.post(f"{demo_server.url}/v2/models/resnet-digits/infer", json=digit_request()).status_code == 200
    text = httpx.get(f"{demo_server.url}/metrics").text
    assert metric_value(text, "zooserve_requests_total", model="resnet-digits", status="400") >= len(BAD_REQUESTS) - 1


# ---- the stock tritonclient --------------------------------------------------------------------

def test_stock_tritonclient_binary_and_json(demo_server):
    client = triton.InferenceServerClient(url=demo_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp-digits") and client.is_model_ready("mlp-digits", "1")
    assert client.get_model_metadata("mlp-digits")["inputs"][0]["shape"] == [-1, 1, 8, 8]
    assert client.get_model_config("mlp-digits")["max_batch_size"] == 32
    images = DIGITS.images[:8].astype(np.float32)[:, None]
    for binary in (True, False):
        inp = triton.InferInput("image", list(images.shape), "FP32")
        inp.set_data_from_numpy(images, binary_data=binary)
        out = triton.InferRequestedOutput("logits", binary_data=binary)
        result = client.infer("mlp-digits", [inp], outputs=[out], model_version="1")
        logits = result.as_numpy("logits")
        assert logits.shape == (8, 10) and (logits.argmax(1) == DIGITS.target[:8]).mean() >= 0.75
    # default outputs: the client asks for binary_data_output
    inp = triton.InferInput("image", list(images.shape), "FP32")
    inp.set_data_from_numpy(images)
    assert client.infer("resnet-digits", [inp]).as_numpy("logits").shape == (8, 10)
    assert client.get_inference_statistics("mlp-digits")["model_stats"][0]["inference_count"] >= 16
    assert {m["name"] for m in client.get_model_repository_index()} == {"mlp-digits", "resnet-digits"}
    with pytest.raises(triton.InferenceServerException, match="unknown model"):
        client.infer("nope", [inp])
    client.close()


# ---- batching, seen from outside -----------------------------------------------------------------

def test_concurrent_requests_are_batched_and_the_metrics_show_it(registry_copy, start_server):
    reg = Registry(registry_copy)
    cfg = reg.model_config("mlp-digits")
    cfg.batching.max_queue_delay_ms = 200    # a wide window so 8 concurrent requests surely meet
    reg.write_model_config(cfg)
    with start_server(registry_copy) as server:
        async def fire():
            async with httpx.AsyncClient(timeout=30) as client:
                return await asyncio.gather(*(client.post(f"{server.url}/v2/models/mlp-digits/infer",
                                                          json=digit_request((i,))) for i in range(8)))
        responses = asyncio.run(fire())
        assert [r.status_code for r in responses] == [200] * 8
        for i, r in enumerate(responses):   # each caller got its own row back
            assert int(np.argmax(r.json()["outputs"][0]["data"])) == DIGITS.target[i]
        text = httpx.get(f"{server.url}/metrics").text
    inferences = metric_value(text, "zooserve_inference_count_total", model="mlp-digits")
    executions = metric_value(text, "zooserve_execution_count_total", model="mlp-digits")
    assert inferences == 8
    assert executions <= 2                     # 8 rows ran in at most 2 executions
    assert metric_value(text, "zooserve_batch_size_sum", model="mlp-digits") == 8
    assert metric_value(text, "zooserve_batch_size_count", model="mlp-digits") == executions
    # at least one execution held more than 2 rows (8 rows, at most 2 executions)
    assert metric_value(text, "zooserve_batch_size_bucket", model="mlp-digits", le="2.0") < executions


# ---- integrity, versions, aliases, admin ----------------------------------------------------------

def test_a_version_whose_hash_mismatches_is_refused_and_the_rest_serves(registry_copy, start_server):
    with open(registry_copy / "resnet-digits" / "1" / "model.onnx", "ab") as f:
        f.write(b"tampered")
    # lenient readiness: strict, the server is not ready while resnet-digits has no ready version
    # (tests/serve/test_readiness.py), and this test is about the rest serving
    with start_server(registry_copy, env={"ZOOSERVE_READINESS": "lenient"}) as server:
        index = httpx.post(f"{server.url}/v2/repository/index").json()
        (resnet,) = [row for row in index if row["name"] == "resnet-digits"]
        assert resnet["state"] == "UNAVAILABLE" and "model.onnx" in resnet["reason"]
        r = httpx.post(f"{server.url}/v2/models/resnet-digits/infer", json=digit_request())
        assert r.status_code == 503 and "UNAVAILABLE" in r.json()["error"]
        assert httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=digit_request()).status_code == 200
        text = httpx.get(f"{server.url}/metrics").text
        assert metric_value(text, "zooserve_model_ready", model="resnet-digits") == 0.0


def test_versions_aliases_and_stable_default(registry_copy, start_server):
    reg = Registry(registry_copy)
    assert reg.publish("mlp-digits", registry_copy / "mlp-digits" / "1") == 2   # the same weights as v2
    reg.set_alias("mlp-digits", "stable", 1)
    reg.set_alias("mlp-digits", "canary", 2)
    with start_server(registry_copy) as server:
        url = f"{server.url}/v2/models/mlp-digits"
        assert httpx.post(f"{url}/infer", json=digit_request()).headers["x-model-version"] == "1"
        r = httpx.post(f"{url}/versions/canary/infer", json=digit_request())
        assert r.headers["x-model-version"] == "2" and r.json()["model_version"] == "2"
        assert httpx.post(f"{url}/versions/2/infer", json=digit_request()).json()["model_version"] == "2"
        assert httpx.get(f"{url}/versions/stable").json()["versions"] == ["1"]
        assert httpx.get(url).json()["versions"] == ["1", "2"]


def test_admin_load_unload_and_a_corrupt_new_version_keeps_the_old_serving(registry_copy, start_server):
    token = "a-long-admin-token"
    with start_server(registry_copy, ["--admin-token", token]) as server:
        admin = {"Authorization": f"Bearer {token}"}
        base = f"{server.url}/v2/repository/models/mlp-digits"
        assert httpx.post(f"{base}/unload").status_code == 401
        assert httpx.post(f"{base}/unload", headers={"Authorization": "Bearer wrong-token!"}).status_code == 403
        r = httpx.post(f"{base}/unload", headers=admin, json={"parameters": {"unload_dependents": False}})
        assert r.status_code == 200
        assert httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=digit_request()).status_code == 404
        assert httpx.post(f"{base}/load", headers=admin).status_code == 200
        assert httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=digit_request()).status_code == 200
        # a new version with a tampered file: refused, version 1 keeps serving
        reg = Registry(registry_copy)
        assert reg.publish("mlp-digits", registry_copy / "mlp-digits" / "1") == 2
        with open(registry_copy / "mlp-digits" / "2" / "model.safetensors", "ab") as f:
            f.write(b"x")
        r = httpx.post(f"{base}/load", headers=admin)          # the load did not do what it was asked: 409
        assert r.status_code == 409 and "version 2 was refused: IntegrityError" in r.json()["error"]
        index = {(row["name"], row.get("version")): row for row in httpx.post(f"{server.url}/v2/repository/index").json()}
        assert index[("mlp-digits", "2")]["state"] == "UNAVAILABLE"
        r = httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=digit_request())
        assert r.status_code == 200 and r.headers["x-model-version"] == "1"
        assert httpx.post(f"{server.url}/v2/repository/models/nope/load", headers=admin).status_code == 404


def test_admin_routes_are_off_without_a_token(demo_registry, tmp_path, start_server):
    registry = tmp_path / "registry"
    shutil.copytree(demo_registry, registry)
    with start_server(registry) as server:
        r = httpx.post(f"{server.url}/v2/repository/models/mlp-digits/unload")
        assert r.status_code == 404 and "off" in r.json()["error"]


def test_sigterm_finishes_accepted_requests_and_exits_cleanly(registry_copy, start_server):
    reg = Registry(registry_copy)
    cfg = reg.model_config("resnet-digits")
    cfg.batching.max_queue_delay_ms = 500     # hold the requests in the queue while the signal lands
    reg.write_model_config(cfg)
    with start_server(registry_copy) as server:
        async def burst():
            async with httpx.AsyncClient(timeout=30) as client:
                tasks = [asyncio.ensure_future(client.post(f"{server.url}/v2/models/resnet-digits/infer",
                                                           json=digit_request((i,)))) for i in range(16)]
                await asyncio.sleep(0.2)
                server.proc.send_signal(15)
                return await asyncio.gather(*tasks, return_exceptions=True)
        results = asyncio.run(burst())
        assert [getattr(r, "status_code", r) for r in results] == [200] * 16
        assert server.proc.wait(30) == 0
