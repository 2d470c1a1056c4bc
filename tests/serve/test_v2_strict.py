"""Issue 14, the KServe v2 routes: nothing a client sends is silently ignored, and every 404 of a
model or version says why and what brings it back.

- an unknown key of `parameters` (request-level, per input, per output), an unknown field of the
  body, of an input or of an output: 400 naming it and what is known; every key the stock
  `tritonclient` sends keeps working;
- a missing `datatype` (or `name`, `shape`) says "missing";
- a version that the registry holds but the server has not loaded: the 404 says why (the version
  policy, or published since the last load) and the call that loads it;
- after an unload: "model X is unloaded (load it with ...)", and the repository index shows its
  versions UNAVAILABLE with the reason "unloaded", as Triton's does;
- an unknown model: the 404 lists the registry's models (not only those served now).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from sklearn.datasets import load_digits

from model_registry import Registry
from serve.errors import ServeError

TOKEN = "strict-admin-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
DIGITS = load_digits()
IMAGE = DIGITS.images[0].astype(np.float32).flatten().tolist()


def image(**fields) -> dict:
    spec = {"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": IMAGE}
    spec.update(fields)
    return {k: v for k, v in spec.items() if v is not ...}


def body(*inputs, **extra) -> dict:
    return {"inputs": list(inputs) or [image()], **extra}


def error(r: httpx.Response) -> str:
    return r.json()["error"]


def copy_registry(demo_registry: Path, into: Path) -> Path:
    root = into / "registry"
    shutil.copytree(demo_registry, root)
    return root


@pytest.fixture(scope="module")
def server(demo_registry, tmp_path_factory, start_server):
    root = copy_registry(demo_registry, tmp_path_factory.mktemp("strict"))
    with start_server(root, ["--admin-token", TOKEN]) as running:
        yield running


def infer(server, payload, path="/v2/models/mlp-digits/infer", **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=payload, timeout=30, **kw)


# ---- unknown keys and fields: 400 naming them ----------------------------------------------------

@pytest.mark.slow
def test_an_unknown_request_parameter_is_400_naming_it_and_the_known_keys(server):
    r = infer(server, body(parameters={"timeout_us": 5000}))
    assert r.status_code == 400, r.text
    message = error(r)
    assert "'timeout_us'" in message
    for known in ("binary_data_output", "priority", "timeout"):
        assert known in message
    # a key of another kind of model is unknown to this one (a classifier has no sequences)
    r = infer(server, body(parameters={"sequence_id": "s1", "sequence_start": True}))
    assert r.status_code == 400 and "'sequence_id'" in error(r) and "classify" in error(r)
    # the keys it knows still work
    r = infer(server, body(parameters={"timeout": 5_000_000, "priority": 1, "binary_data_output": False}))
    assert r.status_code == 200, r.text


@pytest.mark.slow
@pytest.mark.parametrize("payload, words", [
    (body(image(parameters={"binary_data": True})), ["input 'image'", "'binary_data'", "binary_data_size"]),
    (body(image(parameters={"content_type": "x"})), ["input 'image'", "'content_type'", "binary_data_size"]),
    (body(outputs=[{"name": "logits", "parameters": {"binary": True}}]),
     ["output 'logits'", "'binary'", "binary_data"]),
])
def test_an_unknown_input_or_output_parameter_is_400_naming_it(server, payload, words):
    r = infer(server, payload)
    assert r.status_code == 400, r.text
    for word in words:
        assert word in error(r)


@pytest.mark.slow
@pytest.mark.parametrize("payload, words", [
    ({"input": [image()]}, ["'input'", "did you mean 'inputs'", "id, inputs, outputs, parameters"]),
    (body(params={"timeout": 5}), ["'params'", "parameters"]),
    (body(image(dtype="FP32", datatype=...)), ["input 'image'", "'dtype'", "datatype"]),
    (body(image(value=[1])), ["input 'image'", "'value'", "name, shape, datatype, parameters, data"]),
    (body(outputs=[{"name": "logits", "binary_data": True}]), ["output 'logits'", "'binary_data'", "parameters"]),
])
def test_an_unknown_field_of_the_body_an_input_or_an_output_is_400_naming_it(server, payload, words):
    r = infer(server, payload)
    assert r.status_code == 400, r.text
    for word in words:
        assert word in error(r), error(r)


@pytest.mark.slow
def test_every_key_the_stock_tritonclient_sends_still_works(server):
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    images = DIGITS.images[:4].astype(np.float32)[:, None]
    try:
        for binary_in in (True, False):
            for binary_out in (True, False, None):        # None: no outputs named -> binary_data_output
                inp = triton.InferInput("image", list(images.shape), "FP32")
                inp.set_data_from_numpy(images, binary_data=binary_in)
                outputs = (None if binary_out is None else
                           [triton.InferRequestedOutput("logits", binary_data=binary_out)])
                result = client.infer("mlp-digits", [inp], outputs=outputs, request_id="r-1", priority=1,
                                      timeout=10_000_000, request_compression_algorithm="gzip")
                assert result.as_numpy("logits").shape == (4, 10)
                assert result.get_response()["id"] == "r-1"
        # a custom parameter the model does not take is refused, not ignored
        inp = triton.InferInput("image", list(images.shape), "FP32")
        inp.set_data_from_numpy(images)
        with pytest.raises(triton.InferenceServerException, match="'temperature'"):
            client.infer("mlp-digits", [inp], parameters={"temperature": 0.5})
    finally:
        client.close()


@pytest.mark.slow
def test_the_openapi_document_says_what_the_infer_route_takes(server):
    document = httpx.get(f"{server.url}/openapi.json").json()
    generic = document["paths"]["/v2/models/{model}/infer"]["post"]["requestBody"]["content"]["application/json"]
    assert generic["schema"]["additionalProperties"] is False
    assert generic["schema"]["properties"]["inputs"]["items"]["additionalProperties"] is False
    mlp = document["paths"]["/v2/models/mlp-digits/infer"]["post"]["requestBody"]["content"]["application/json"]
    parameters = mlp["schema"]["properties"]["parameters"]
    assert parameters["additionalProperties"] is False
    assert set(parameters["properties"]) == {"binary_data_output", "priority", "timeout"}
    (image_input,) = mlp["schema"]["properties"]["inputs"]["items"]["anyOf"]
    assert set(image_input["properties"]["parameters"]["properties"]) == {"binary_data_size"}


def test_each_kind_takes_its_own_request_parameters():
    from serve.api.v2 import check_request_parameters

    check_request_parameters("forecast", "sequence", {"sequence_id": 3, "sequence_start": True, "sequence_end": False,
                                                      "timeout": 5, "priority": 0, "binary_data_output": True})
    check_request_parameters("diffusion-digits", "denoise", {"sampler": "ddim", "steps": 5, "eta": 0.0,
                                                             "guidance": 1.0, "response_format": "png"})
    check_request_parameters("gan-digits", "sample", {"response_format": "tensor"})
    check_request_parameters("mlp-digits", "classify", {})
    with pytest.raises(ServeError) as info:
        check_request_parameters("diffusion-digits", "denoise", {"step": 5})
    assert info.value.status == 400
    assert "'step'" in info.value.message and "steps" in info.value.message and "sampler" in info.value.message
    with pytest.raises(ServeError, match="'steps'.*model 'mlp-digits' is of kind classify"):
        check_request_parameters("mlp-digits", "classify", {"steps": 5})
    for priority in (-1, 1.5, True, "1"):
        with pytest.raises(ServeError, match="'priority' must be a non-negative integer"):
            check_request_parameters("mlp-digits", "classify", {"priority": priority})


# ---- a missing datatype ----------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("field, words", [
    ("datatype", ["input 'image'", "'datatype' is missing", "FP32"]),
    ("shape", ["input 'image'", "'shape' is missing"]),
    ("name", ["inputs[0]", "'name' is missing"]),
])
def test_a_missing_datatype_shape_or_name_says_missing(server, field, words):
    r = infer(server, body(image(**{field: ...})))
    assert r.status_code == 400, r.text
    for word in words:
        assert word in error(r), error(r)


# ---- unknown models and versions: why, and what brings them back -----------------------------------

@pytest.mark.slow
def test_a_version_the_registry_holds_but_the_server_has_not_loaded_says_how_to_load_it(
        demo_registry, tmp_path, start_server):
    root = copy_registry(demo_registry, tmp_path)
    registry = Registry(root)
    source = root / "mlp-digits" / "1"
    assert [registry.publish("mlp-digits", source) for _ in range(2)] == [2, 3]
    # stable -> 1 and the default policy (latest 1): versions 1 and 3 load, 2 does not
    with start_server(root, ["--admin-token", TOKEN], env={"ZOOSERVE_WATCH_INTERVAL_S": "0"}) as server:
        r = infer(server, body(), path="/v2/models/mlp-digits/versions/2/infer")
        assert r.status_code == 404
        message = error(r)
        assert "version 2 of model 'mlp-digits' is in the registry but not loaded" in message
        assert "version_policy" in message and "latest 1" in message
        assert "PUT /v2/repository/models/mlp-digits/aliases/" in message
        # a version the registry does not hold
        r = infer(server, body(), path="/v2/models/mlp-digits/versions/9/infer")
        assert r.status_code == 404 and "no version 9" in error(r) and "1, 2, 3" in error(r)
        # published after the server loaded, with the watch off: served once loaded
        assert registry.publish("mlp-digits", source) == 4
        r = infer(server, body(), path="/v2/models/mlp-digits/versions/4/infer")
        assert r.status_code == 404
        assert "published after" in error(r) and "POST /v2/repository/models/mlp-digits/load" in error(r)
        # the unversioned request still goes to stable
        assert infer(server, body()).headers["x-model-version"] == "1"
        assert httpx.post(f"{server.url}/v2/repository/models/mlp-digits/load", headers=ADMIN,
                          timeout=60).status_code == 200
        r = infer(server, body(), path="/v2/models/mlp-digits/versions/4/infer")
        assert r.status_code == 200 and r.headers["x-model-version"] == "4"


@pytest.mark.slow
def test_with_the_watch_a_published_version_serves_without_a_reload(demo_registry, tmp_path, start_server):
    """What the watch does today: a published version loads within a poll; an unversioned request
    goes to it once no `stable` alias holds the model at another version."""
    root = copy_registry(demo_registry, tmp_path)
    registry = Registry(root)
    with start_server(root) as server:
        assert infer(server, body()).headers["x-model-version"] == "1"
        assert registry.publish("mlp-digits", root / "mlp-digits" / "1") == 2
        wait_for(lambda: infer(server, body(), path="/v2/models/mlp-digits/versions/2/infer").status_code == 200)
        assert infer(server, body()).headers["x-model-version"] == "1"       # stable -> 1
        registry.remove_alias("mlp-digits", "stable")
        wait_for(lambda: infer(server, body()).headers.get("x-model-version") == "2")   # the newest ready


def wait_for(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "not within the timeout"
        time.sleep(0.1)


@pytest.mark.slow
def test_after_an_unload_requests_say_how_to_load_it_and_the_index_shows_it_unavailable(
        demo_registry, tmp_path, start_server):
    root = copy_registry(demo_registry, tmp_path)
    with start_server(root, ["--admin-token", TOKEN]) as server:
        base = f"{server.url}/v2/repository/models/mlp-digits"
        assert httpx.post(f"{base}/unload", headers=ADMIN, timeout=60).status_code == 200
        for r in (infer(server, body()), httpx.get(f"{server.url}/v2/models/mlp-digits"),
                  httpx.get(f"{server.url}/v2/models/mlp-digits/versions/1/ready")):
            assert r.status_code == 404
            assert "model 'mlp-digits' is unloaded (load it with POST /v2/repository/models/mlp-digits/load" \
                in error(r), error(r)
        index = httpx.post(f"{server.url}/v2/repository/index").json()
        assert {"name": "mlp-digits", "version": "1", "state": "UNAVAILABLE", "reason": "unloaded"} in index
        # an unknown model lists the registry's models, not only those served now
        r = infer(server, body(), path="/v2/models/mlp-digit/infer")
        assert r.status_code == 404 and "unknown model 'mlp-digit'" in error(r)
        assert "the registry's models: mlp-digits, resnet-digits" in error(r), error(r)
        assert {"name": "resnet-digits", "version": "1", "state": "READY"} in index
        assert httpx.post(f"{base}/load", headers=ADMIN, timeout=60).status_code == 200
        assert {"name": "mlp-digits", "version": "1", "state": "READY"} in \
            httpx.post(f"{server.url}/v2/repository/index").json()
        assert infer(server, body()).status_code == 200


# ---- the codec alone: every decoder (samplers' too) refuses what it does not know -----------------

def test_the_codec_and_the_sampler_decoder_refuse_unknown_keys():
    import orjson

    from model_registry.manifest import Signature, TensorSpec
    from serve.sample_request import decode_sample_request
    from serve.v2_codec import V2Error, decode_infer_request

    spec, out = TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8]), \
        TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])

    def refused(request: dict) -> str:
        with pytest.raises(V2Error) as info:
            decode_infer_request(orjson.dumps(request), None, [spec], [out], 32)
        assert info.value.status == 400
        return info.value.message

    assert refused({"input": [image()]}) == ("unknown field 'input' (did you mean 'inputs'?); known: id, inputs, "
                                             "outputs, parameters (an infer request's fields)")
    assert refused(body(image(datatype=...))) == "input 'image': 'datatype' is missing (the model's is FP32)"
    assert refused(body(image(parameters={"binary_data_size": 4, "foo": 1}))) == (
        "input 'image': unknown parameters key 'foo'; known: binary_data_size")
    assert refused(body(image(parameters={"shared_memory_byte_size": 4}))) == (
        "input 'image': shared memory is not supported")
    assert refused(body(outputs=[{"name": "logits", "parameters": {"binary_data": True, "binary_data_size": 1}}])) \
        == "output 'logits': unknown parameters key 'binary_data_size' (did you mean 'binary_data'?); " \
           "known: binary_data, classification"
    sampler = Signature(inputs=[TensorSpec(name="label", datatype="INT64", shape=[-1])],
                        outputs=[TensorSpec(name="image", datatype="FP32", shape=[-1, 1, 8, 8])])
    with pytest.raises(ServeError, match="unknown field 'input'"):
        decode_sample_request(orjson.dumps({"input": []}), None, sampler, 8)
    with pytest.raises(ServeError, match="input 'label': unknown field 'dtype'"):
        decode_sample_request(orjson.dumps({"inputs": [{"name": "label", "shape": [1], "dtype": "INT64",
                                                        "data": [1]}]}), None, sampler, 8)
