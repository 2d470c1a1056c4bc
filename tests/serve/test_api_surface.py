"""The API's surface against real servers: one auth rule for every admin route, what a bad model
name or timeout gets, the OpenAPI document (a body for every POST and PUT, each loaded model's
inputs, a fuzzer that reaches the models), and the x-request-id of every answer with the one log
line of every refusal (in the server's log and in a batch job's records)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import orjson
import pytest
from sklearn.datasets import load_digits

from serve.batch import record_ids, run
from serve.settings import ServeSettings

pytestmark = pytest.mark.slow

TOKEN = "surface-admin-token"
DIGIT = load_digits().images[0].astype(np.float32).flatten().tolist()
# a value that must never reach a log line: the body is the user's
SECRET = "secret-body-marker-7f3a"


def digit_body(**extra) -> dict:
    return {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": DIGIT}], **extra}


# resnet-digits does not load: ready all the same, so that the other model serves
LENIENT = {"ZOOSERVE_READINESS": "lenient"}


@pytest.fixture(scope="module")
def registry(demo_registry, tmp_path_factory) -> Path:
    """The demo registry with resnet-digits' weights tampered: it loads UNAVAILABLE (503)."""
    root = tmp_path_factory.mktemp("surface") / "registry"
    shutil.copytree(demo_registry, root)
    with open(root / "resnet-digits" / "1" / "model.onnx", "ab") as f:
        f.write(b"tampered")
    return root


@pytest.fixture(scope="module")
def server(registry, start_server):
    with start_server(registry, ["--admin-token", TOKEN], env=LENIENT) as running:
        yield running


def error_message(r: httpx.Response) -> str:
    """`{"error": "..."}`, or OpenAI's `{"error": {"message": ...}}` on /v1."""
    error = r.json()["error"]
    return error["message"] if isinstance(error, dict) else error


def refusal_lines(server) -> list[str]:
    """The messages of the server's "zooserve.http" refusal log lines."""
    entries = [json.loads(line) for line in server.logs().splitlines() if line.startswith("{")]
    return [e["message"] for e in entries if e["logger"] == "zooserve.http" and e["message"].startswith("refused")]


# ---- who may call the admin routes ---------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_unload_and_load_take_the_bearer_scheme_in_any_case(server, scheme):
    base, admin = f"{server.url}/v2/repository/models/mlp-digits", {"Authorization": f"{scheme} {TOKEN}"}
    assert httpx.post(f"{base}/unload", headers=admin, timeout=30).status_code == 200
    assert httpx.post(f"{base}/load", headers=admin, timeout=30).status_code == 200
    assert httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=digit_body()).status_code == 200


@pytest.mark.parametrize("route", ["load", "unload"])
def test_load_and_unload_refuse_as_every_admin_route(server, route):
    url = f"{server.url}/v2/repository/models/mlp-digits/{route}"
    for headers in ({}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}):
        r = httpx.post(url, headers=headers)
        assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", r.text
        assert "Authorization: Bearer" in r.json()["error"]
    r = httpx.post(url, headers={"Authorization": f"Bearer {TOKEN}-not"})
    assert r.status_code == 403 and "wrong admin token" in r.json()["error"]


def test_without_a_token_every_admin_route_is_404_with_one_message(registry, start_server):
    with start_server(registry, env=LENIENT) as server:
        base = f"{server.url}/v2/repository/models/mlp-digits"
        answers = [httpx.post(f"{base}/load"), httpx.post(f"{base}/unload"), httpx.get(f"{base}/routing")]
        assert [r.status_code for r in answers] == [404, 404, 404]
        messages = {r.json()["error"] for r in answers}
        assert len(messages) == 1 and "off" in messages.pop()


@pytest.mark.parametrize("name", ["Bad%20Name%21", "%2E%2E", "UPPER"])
@pytest.mark.parametrize("method, route", [("POST", "load"), ("POST", "unload"), ("GET", "routing")])
def test_an_invalid_model_name_in_an_admin_route_is_400(server, name, method, route):
    r = httpx.request(method, f"{server.url}/v2/repository/models/{name}/{route}",
                      headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 400, r.text
    assert "invalid model name" in r.json()["error"]


# ---- the infer timeout -----------------------------------------------------------------------------

@pytest.mark.parametrize("timeout, words", [(True, ["'timeout'", "bool"]), (False, ["'timeout'", "bool"]),
                                            ("5000", ["'timeout'", "str"]), (None, ["'timeout'", "NoneType"]),
                                            ([5000], ["'timeout'", "list"]), (0, ["'timeout'", "positive"]),
                                            (-5, ["'timeout'", "positive"]), (-0.5, ["'timeout'", "positive"])])
def test_a_timeout_that_is_not_a_positive_number_is_400_naming_it(server, timeout, words):
    r = httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=digit_body(parameters={"timeout": timeout}))
    assert r.status_code == 400, r.text
    for word in words:
        assert word in r.json()["error"]


@pytest.mark.parametrize("timeout", [5_000_000, 2.5e6])
def test_a_positive_timeout_is_the_deadline(server, timeout):
    r = httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=digit_body(parameters={"timeout": timeout}))
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("stop", [5, -1.5, True, {"a": "b"}])
def test_a_stop_that_is_neither_text_nor_a_list_is_400_naming_it(server, stop):
    # found by the fuzzer below: a number here was a 500
    r = httpx.post(f"{server.url}/v1/chat/completions",
                   json={"model": "mlp-digits", "messages": [{"role": "user", "content": "hi"}], "stop": stop})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "stop" and "stop takes" in r.json()["error"]["message"]


# ---- the OpenAPI document ----------------------------------------------------------------------------

def test_openapi_declares_a_body_for_every_post_and_put_and_each_loaded_models_inputs(server):
    document = httpx.get(f"{server.url}/openapi.json").json()
    writes = [(method, path, op) for path, ops in document["paths"].items() for method, op in ops.items()
              if method in ("post", "put")]
    assert {"/v1/completions", "/v1/chat/completions", "/v2/repository/models/{model}/load",
            "/v2/repository/models/{model}/unload"} <= {path for _, path, _ in writes}
    without = [f"{method.upper()} {path}" for method, path, op in writes if "requestBody" not in op]
    assert without == []
    # a reference points into the document (pydantic's own `$defs` would not resolve there)
    for ref in re.findall(r'"\$ref": ?"([^"]+)"', json.dumps(document)):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in document["components"]["schemas"]
    chat = document["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"model", "messages"} <= set(chat["required"]) and "role" in json.dumps(chat)
    completion = document["paths"]["/v1/completions"]["post"]["requestBody"]["content"]["application/json"]
    assert {"model", "prompt"} <= set(completion["schema"]["required"])

    infer = document["paths"]["/v2/models/mlp-digits/infer"]["post"]["requestBody"]["content"]["application/json"]
    (image,) = infer["schema"]["properties"]["inputs"]["items"]["anyOf"]
    assert image["properties"]["name"]["enum"] == ["image"]
    assert image["properties"]["datatype"]["enum"] == ["FP32"]
    assert [d.get("enum") for d in image["properties"]["shape"]["prefixItems"]] == [None, [1], [8], [8]]
    # the example is a request the model answers
    r = httpx.post(f"{server.url}/v2/models/mlp-digits/infer", json=infer["example"])
    assert r.status_code == 200, r.text
    # a model with no ready version has no inputs to tell
    assert "/v2/models/resnet-digits/infer" not in document["paths"]


def test_schemathesis_reaches_the_models_and_never_gets_a_server_error(registry_copy, start_server, tmp_path):
    pytest.importorskip("schemathesis")
    # a request's own `timeout` (µs) may pass before its batch runs: 504, as Triton answers; any
    # other 5xx is a bug
    config = tmp_path / "schemathesis.toml"
    config.write_text('[checks.not_a_server_error]\nexpected-statuses = ["1xx", "2xx", "3xx", "4xx", "504"]\n')
    with start_server(registry_copy, ["--admin-token", TOKEN]) as server:
        done = subprocess.run(
            [str(Path(sys.executable).with_name("schemathesis")), "--config-file", str(config), "run",
             f"{server.url}/openapi.json", "--checks", "not_a_server_error", "--phases", "examples,fuzzing",
             "--max-examples", "15", "--seed", "1", "--workers", "1", "-H", f"Authorization: Bearer {TOKEN}"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)    # its own files go there
        assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
        stats = httpx.get(f"{server.url}/v2/models/mlp-digits/stats").json()["model_stats"][0]
        assert stats["inference_stats"]["success"]["count"] > 0      # the fuzzer's requests reached the model


# ---- request ids and the refusal log -------------------------------------------------------------------

def test_every_answer_carries_a_request_id_and_each_refusal_is_logged_once(server):
    def call(method: str, path: str, request_id: str | bytes | None, **kw) -> httpx.Response:
        headers = {"x-request-id": request_id} if request_id is not None else {}
        return httpx.request(method, f"{server.url}{path}", headers=headers, timeout=30, **kw)

    answers = {   # request id -> (answer, status, model, version) of the refusal line it must leave
        "rid-infer-404": (call("POST", "/v2/models/nope/infer", "rid-infer-404", json=digit_body(id=SECRET)),
                          404, "nope", None),
        "rid-meta-404": (call("GET", "/v2/models/nope/versions/3", "rid-meta-404"), 404, "nope", "3"),
        "rid-infer-400": (call("POST", "/v2/models/mlp-digits/infer", "rid-infer-400",
                               json=digit_body(id=SECRET, parameters={"timeout": True})), 400, "mlp-digits", "1"),
        "rid-openai-400": (call("POST", "/v1/completions", "rid-openai-400",
                                json={"model": "mlp-digits", "prompt": SECRET}), 400, None, None),
        "rid-infer-503": (call("POST", "/v2/models/resnet-digits/infer", "rid-infer-503", json=digit_body()),
                          503, "resnet-digits", None),
    }
    for rid, (r, status, _, _) in answers.items():
        assert r.status_code == status and r.headers["x-request-id"] == rid, (rid, r.status_code, r.text)

    ok = call("POST", "/v2/models/mlp-digits/infer", "client-id-200", json=digit_body(id=SECRET))
    assert ok.status_code == 200 and ok.headers["x-request-id"] == "client-id-200"
    made = [call("GET", "/v2/models/mlp-digits", None), call("POST", "/v2/models/mlp-digits/infer", None,
                                                             json=digit_body())]
    insane = [call("GET", "/v2/models/mlp-digits", "has spaces"), call("GET", "/v2/models/nope", "x" * 129),
              call("POST", "/v2/models/nope/infer", "caf\u00e9".encode("latin-1"), json=digit_body())]
    for r in made + insane:
        assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), r.headers["x-request-id"]
    assert len({r.headers["x-request-id"] for r in made + insane}) == len(made + insane)

    lines = refusal_lines(server)
    for rid, (r, status, model, version) in answers.items():
        (line,) = [x for x in lines if f" request_id={rid} " in x]
        assert f"status={status} " in line
        assert f"model={json.dumps(model) if model else '-'} " in line
        assert f"version={json.dumps(version) if version else '-'} " in line
        assert f"reason={json.dumps(error_message(r))}" in line
    assert not [x for x in lines if "request_id=client-id-200" in x]     # a 200 is not a refusal
    for r in insane[1:]:                                                   # logged under the id it was given
        assert len([x for x in lines if f" request_id={r.headers['x-request-id']} " in x]) == 1
    assert SECRET not in server.logs()


def test_a_batch_record_carries_the_request_id_its_refusal_was_logged_with(demo_registry, tmp_path, caplog):
    source, output = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_bytes(b"".join(orjson.dumps(line) + b"\n" for line in (
        {"custom_id": "ok", "method": "POST", "url": "/v2/models/mlp-digits/infer", "body": digit_body()},
        {"custom_id": "missing", "method": "POST", "url": "/v2/models/nope/infer", "body": digit_body(id=SECRET)})))
    caplog.set_level(logging.WARNING, logger="zooserve.http")
    run(ServeSettings(registry=demo_registry, log_level="warning"), source, output, progress=False)
    records = {r["custom_id"]: r for r in map(orjson.loads, output.read_bytes().splitlines())}
    assert records["ok"]["response"]["status_code"] == 200
    assert records["missing"]["response"]["status_code"] == 404
    rid = records["missing"]["response"]["request_id"]
    assert rid == record_ids("custom_id:missing")[1]
    refusals = [r.getMessage() for r in caplog.records if r.name == "zooserve.http"]
    assert len(refusals) == 1 and f" request_id={rid} " in refusals[0] and "status=404" in refusals[0]
    assert SECRET not in caplog.text
