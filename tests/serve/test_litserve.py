"""`zooserve serve --frontend litserve` against the native front end: both real servers on loopback
ports over one registry (mlp-digits, resnet-digits, decoder-tiny), the same requests to each, the
same answers: v2 infer (plain and versioned), completions (whole and streamed), every bad input's
4xx JSON, our /metrics; options LitServe cannot honour refused in one line; SIGTERM stops every
process it started.
"""

from __future__ import annotations

import json
import os
import signal
import time

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits

from model_registry import Registry
from serve.cli import main

pytestmark = pytest.mark.slow

# small, so that a body over it is cheap to send; every good request here is under 1 KB
MAX_BODY = 4096
PROMPT = "ROMEO. What light through yonder window"
DIGITS = load_digits().images[:4].reshape(-1, 1, 8, 8).astype(np.float32)


@pytest.fixture(scope="module")
def registry(demo_registry, token_registry, tmp_path_factory):
    """The two classifiers and one token model, one version each."""
    registry = Registry(tmp_path_factory.mktemp("litserve") / "registry")
    for name in ("mlp-digits", "resnet-digits"):
        registry.publish(name, demo_registry / name / "1")
    registry.publish("decoder-tiny", token_registry / "decoder-tiny" / "1")
    return registry.root


@pytest.fixture(scope="module")
def servers(registry, start_server):
    """(native, litserve) over the same registry and settings."""
    env = {"ZOOSERVE_MAX_BODY_BYTES": str(MAX_BODY)}
    with start_server(registry, env=env) as native, \
            start_server(registry, ["--frontend", "litserve"], env=env) as litserve:
        yield native, litserve


def digits_body(rows: int = 1, **extra) -> dict:
    return {"inputs": [{"name": "image", "shape": [rows, 1, 8, 8], "datatype": "FP32",
                        "data": DIGITS[:rows].flatten().tolist()}], **extra}


def both(servers, method: str, path: str, **kwargs) -> list[httpx.Response]:
    return [httpx.request(method, server.url + path, timeout=30, **kwargs) for server in servers]


def assert_alike(answers: list[httpx.Response], volatile: tuple[str, ...] = ()) -> dict:
    """Same status, content type, model headers and JSON body (but the `volatile` top-level keys)."""
    native, litserve = answers
    assert litserve.status_code == native.status_code, (native.text, litserve.text)
    for header in ("content-type", "x-model-version", "x-model-alias"):
        assert litserve.headers.get(header) == native.headers.get(header), header
    bodies = [{k: v for k, v in a.json().items() if k not in volatile} for a in answers]
    assert bodies[1] == bodies[0]
    return bodies[0]


@pytest.mark.parametrize("path", ["/v2/models/mlp-digits/infer", "/v2/models/mlp-digits/versions/1/infer",
                                  "/v2/models/resnet-digits/infer"])
def test_v2_infer_answers_alike(servers, path):
    body = assert_alike(both(servers, "POST", path, json=digits_body(2, id="r-1")))
    assert body["id"] == "r-1" and body["outputs"][0]["shape"] == [2, 10]


def test_the_binary_tensor_extension_travels_as_sent(servers):
    header = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 256}}]}).encode()
    answers = both(servers, "POST", "/v2/models/mlp-digits/infer", content=header + DIGITS[0].tobytes(),
                   headers={"inference-header-content-length": str(len(header)),
                            "content-type": "application/octet-stream"})
    assert answers[0].status_code == 200
    assert_alike(answers)


def test_a_request_id_comes_back_from_either(servers):
    for answer in both(servers, "POST", "/v2/models/mlp-digits/infer", json=digits_body(),
                       headers={"x-request-id": "trace-42"}):
        assert answer.headers["x-request-id"] == "trace-42"


BAD_V2 = [
    ("/v2/models/mlp-digits/infer", {"content": b"{not json"}, 400),
    ("/v2/models/mlp-digits/infer", {"json": {"inputs": [{"name": "image", "shape": [1, 64], "datatype": "FP32",
                                                          "data": [0.0] * 64}]}}, 400),
    ("/v2/models/mlp-digits/infer", {"json": digits_body(parameters={"temperature": 1})}, 400),
    ("/v2/models/mlp-digits/infer", {"json": {"inputs": []}}, 400),
    ("/v2/models/no-such-model/infer", {"json": digits_body()}, 404),
    ("/v2/models/mlp-digits/versions/9/infer", {"json": digits_body()}, 404),
    ("/v2/models/decoder-tiny/infer", {"json": digits_body()}, 400),
    ("/v2/models/mlp-digits/infer", {"content": b" " * (MAX_BODY + 1)}, 413),                 # Content-Length
    ("/v2/models/mlp-digits/infer", {"chunks": [b" " * MAX_BODY, b" " * 10]}, 413),       # chunked
]


@pytest.mark.parametrize("path,request_kwargs,status", BAD_V2)
def test_bad_v2_input_is_refused_alike(servers, path, request_kwargs, status):
    if "chunks" in request_kwargs:           # an iterator body goes chunked, without Content-Length
        answers = [httpx.post(s.url + path, content=iter(request_kwargs["chunks"]), timeout=30) for s in servers]
    else:
        answers = both(servers, "POST", path, **request_kwargs)
    assert answers[0].status_code == status
    assert set(assert_alike(answers)) == {"error"}


def test_completions_answer_alike(servers):
    request = {"model": "decoder-tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
    body = assert_alike(both(servers, "POST", "/v1/completions", json=request), volatile=("id", "created"))
    assert body["usage"]["completion_tokens"] == 12 and body["model"] == "decoder-tiny:1"


def test_streamed_completions_arrive_as_the_same_events(servers):
    request = {"model": "decoder-tiny", "prompt": PROMPT, "max_tokens": 8, "temperature": 0, "stream": True,
               "stream_options": {"include_usage": True}}
    streams = []
    for server in servers:
        with httpx.stream("POST", server.url + "/v1/completions", json=request, timeout=30) as answer:
            assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/event-stream")
            lines = [line for line in answer.iter_lines() if line]
        assert lines[-1] == "data: [DONE]"
        events = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
        streams.append([{k: v for k, v in e.items() if k not in ("id", "created")} for e in events])
    assert len(streams[0]) == 8 + 1 and streams[1] == streams[0]


@pytest.mark.parametrize("request_body,status", [
    ({"model": "decoder-tiny", "prompt": PROMPT, "temperatur": 0}, 400),
    ({"model": "mlp-digits", "prompt": PROMPT}, 400),
    ({"model": "no-such-model", "prompt": PROMPT}, 404),
    ({"model": "decoder-tiny", "prompt": PROMPT, "max_tokens": 100000}, 400),
])
def test_bad_completions_are_refused_alike(servers, request_body, status):
    answers = both(servers, "POST", "/v1/completions", json=request_body)
    assert answers[0].status_code == status
    assert set(assert_alike(answers)) == {"error"}


def test_metrics_are_ours_and_count_what_litserve_served(servers):
    _, litserve = servers
    def served(name: str, **labels) -> float:
        text = httpx.get(litserve.url + "/metrics").text
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))
    before = served("zooserve_requests_total", model="mlp-digits", status="200")
    for _ in range(3):
        assert httpx.post(litserve.url + "/v2/models/mlp-digits/infer", json=digits_body()).status_code == 200
    assert served("zooserve_requests_total", model="mlp-digits", status="200") == before + 3
    assert httpx.post(litserve.url + "/v1/completions", json={"model": "decoder-tiny", "prompt": PROMPT,
                                                              "max_tokens": 3}).status_code == 200
    assert served("zooserve_generated_tokens_total", model="decoder-tiny") >= 3
    # LitServe's own probe stays LitServe's; ours answer beside it
    assert httpx.get(litserve.url + "/health").text == "ok"
    assert httpx.get(litserve.url + "/v2/health/ready").json() == {"ready": True}


@pytest.mark.parametrize("argv,env,said", [
    (["--grpc-port", "18001"], {}, "--grpc-port 18001: gRPC is served beside the native HTTP front end only"),
    (["--port", "80"], {}, "--port 80: the LitServe front end takes a port from 1024"),
    (["--host", "localhost"], {}, "--host localhost: the LitServe front end binds only 0.0.0.0, 127.0.0.1, ::"),
    ([], {"ZOOSERVE_GRPC_PORT": "18001"}, "ZOOSERVE_GRPC_PORT=18001: gRPC is served"),
])
def test_options_litserve_cannot_honour_are_refused_in_one_line(tmp_path, monkeypatch, capsys, argv, env, said):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["serve", "--registry", str(tmp_path), "--frontend", "litserve", *argv]) == 2
    err = capsys.readouterr().err
    assert said in err and len(err.strip().splitlines()) == 1, err


def test_a_bad_zooserve_frontend_is_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ZOOSERVE_FRONTEND", "flask")
    assert main(["serve", "--registry", str(tmp_path)]) == 2
    assert "ZOOSERVE_FRONTEND='flask' is not valid: expected one of native, litserve" in capsys.readouterr().err


def test_sigterm_stops_every_process_and_exits_0(demo_registry, start_server):
    with start_server(demo_registry, ["--frontend", "litserve"]) as server:
        below = _descendants(server.proc.pid)
        assert len(below) >= 3             # LitServe's API server, queue manager and inference worker
        assert server.stop(signal.SIGTERM) == 0
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(pid) for pid in below):
        time.sleep(0.1)
    assert not [pid for pid in below if _alive(pid)]


def _descendants(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except (OSError, ValueError):
            continue
        if entry.isdigit():
            parents[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        children = [child for child, parent in parents.items() if parent == pid]
        found += children
        todo += children
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False
