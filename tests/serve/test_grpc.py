"""KServe v2 over gRPC (issue 16 §2): the stock `tritonclient.grpc` against a real server started
with --grpc-port, beside its HTTP port. Health, metadata, config, statistics and the repository
answer as over HTTP; ModelInfer answers what HTTP answers for the same input; errors carry the gRPC
code of the HTTP status and the same message; Triton's sequence parameters drive a stateful
forecaster; ModelStreamInfer answers each request; the metrics count gRPC requests; SIGTERM lets
calls in flight finish."""

from __future__ import annotations

import asyncio
import queue
import shutil
import signal
import time

import grpc
import httpx
import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.grpc.aio as tgrpc_aio
import tritonclient.http as thttp
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub
from tritonclient.utils import InferenceServerException

from model_registry import Registry
from tests.conftest import ServerProcess, free_port
from tests.faulty_models import build_slow_canary
from training import checkpoint, export
from training.import_model import import_model
from training.models import rnn

pytestmark = pytest.mark.slow
ADMIN = "grpc-admin-token"
CO2 = np.array([361.2, 361.5, 361.9, 362.3, 362.9, 363.1], np.float32)


@pytest.fixture(scope="module")
def grpc_registry(demo_registry, tmp_path_factory):
    """The demo models, `forecast` (an untrained 1-layer LSTM forecaster: the sequence engine's
    answers, not their quality) and `slow-digits` (~50 ms a batch, one row, a 400 ms wait bound)."""
    torch.set_num_threads(1)
    work = tmp_path_factory.mktemp("grpc")
    root = work / "registry"
    shutil.copytree(demo_registry, root)
    registry = Registry(root)
    torch.manual_seed(1)
    lstm = rnn.Model(rnn.Config(cell="lstm", hidden=16, layers=1, mean=360.0, std=10.0, step_std=1.0)).eval()
    checkpoint.save(work / "lstm", lstm, lstm.config, {"family": "rnn"})
    export.package(work / "lstm", work / "lstm-package", formats=("torchscript",), serve_format="torchscript")
    registry.set_alias("forecast", "stable", registry.publish("forecast", work / "lstm-package"))
    ts = next(p for p in (root / "mlp-digits" / "1").iterdir() if p.suffix in (".pt", ".ts"))
    import_model(registry, "slow-digits", build_slow_canary(ts, work / "slow.pt"), input_shape="1,1,8,8",
                 input_name="image", output_name="logits")
    cfg = registry.model_config("slow-digits")
    cfg.batching.max_batch_size, cfg.batching.max_queue_delay_ms, cfg.batching.max_queue_wait_ms = 1, 0, 400
    cfg.instance_group.count = 1            # one batch at a time, whatever the machine's cores
    registry.write_model_config(cfg)
    return root


@pytest.fixture(scope="module")
def server(grpc_registry):
    grpc_port = free_port()
    server = ServerProcess(grpc_registry, ["--grpc-port", str(grpc_port), "--admin-token", ADMIN])
    server.grpc = f"127.0.0.1:{grpc_port}"
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def client(server):
    with tgrpc.InferenceServerClient(server.grpc) as c:
        yield c


def digits(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 17, (n, 1, 8, 8)).astype(np.float32)


def grpc_input(name: str, array: np.ndarray, datatype: str = "FP32") -> tgrpc.InferInput:
    tensor = tgrpc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def http_infer(server, model: str, name: str, array: np.ndarray, output: str, **kwargs) -> np.ndarray:
    tensor = thttp.InferInput(name, list(array.shape), "FP32")
    tensor.set_data_from_numpy(array)
    with thttp.InferenceServerClient(server.url.removeprefix("http://")) as c:
        return c.infer(model, [tensor], **kwargs).as_numpy(output)


def grpc_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def http_error(server, model: str, body: dict) -> tuple[int, str]:
    response = httpx.post(f"{server.url}/v2/models/{model}/infer", json=body)
    return response.status_code, response.json()["error"]


def metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


# ---- health, metadata, configuration, statistics ---------------------------------------------

def test_health_and_server_metadata_answer_as_http(server, client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("mlp-digits") and client.is_model_ready("resnet-digits", "1")
    assert not client.is_model_ready("no-such-model") and not client.is_model_ready("mlp-digits", "9")
    with grpc.insecure_channel(server.grpc) as channel:     # Triton's false, and why (HTTP's 404 message)
        answer, call = GRPCInferenceServiceStub(channel).ModelReady.with_call(
            pb.ModelReadyRequest(name="no-such-model"))
    assert not answer.ready
    http = httpx.get(f"{server.url}/v2/models/no-such-model/ready")
    assert http.status_code == 404 and dict(call.trailing_metadata())["reason"] == http.json()["error"]
    meta = client.get_server_metadata()
    http = httpx.get(f"{server.url}/v2").json()
    assert (meta.name, meta.version, list(meta.extensions)) == (http["name"], http["version"], http["extensions"])


@pytest.mark.parametrize("model", ["mlp-digits", "resnet-digits", "forecast"])
def test_model_metadata_and_config_match_http(server, client, model):
    meta = client.get_model_metadata(model)
    http = httpx.get(f"{server.url}/v2/models/{model}").json()
    assert (meta.name, list(meta.versions), meta.platform) == (http["name"], http["versions"], http["platform"])
    for ours, theirs in ((meta.inputs, http["inputs"]), (meta.outputs, http["outputs"])):
        assert [(t.name, t.datatype, list(t.shape)) for t in ours] == \
               [(t["name"], t["datatype"], t["shape"]) for t in theirs]
    config = client.get_model_config(model).config
    http = httpx.get(f"{server.url}/v2/models/{model}/config").json()
    assert (config.name, config.max_batch_size, config.platform) == (model, http["max_batch_size"], http["platform"])
    assert [(t.name, list(t.dims)) for t in config.input] == [(t["name"], t["dims"]) for t in http["input"]]
    assert config.parameters["revision"].string_value == str(http["parameters"]["revision"]["int64_param"])
    if model == "forecast":     # the implicit state of the sequence batcher, as HTTP says it
        assert [(s.input_name, s.output_name) for s in config.sequence_batching.state] == \
               [(s["input_name"], s["output_name"]) for s in http["sequence_batching"]["state"]]
        assert config.sequence_batching.oldest.max_candidate_sequences == http["max_batch_size"]
    else:
        assert config.dynamic_batching.default_queue_policy.max_queue_size == \
               http["dynamic_batching"]["default_queue_policy"]["max_queue_size"]


def test_statistics_count_grpc_inferences(server, client):
    before = client.get_inference_statistics("resnet-digits").model_stats[0]
    client.infer("resnet-digits", [grpc_input("image", digits(4, seed=3))])
    after = client.get_inference_statistics("resnet-digits", "1").model_stats[0]
    assert after.inference_count == before.inference_count + 4
    assert after.inference_stats.success.count == before.inference_stats.success.count + 1
    http = httpx.get(f"{server.url}/v2/models/resnet-digits/stats").json()["model_stats"][0]
    assert after.inference_count == http["inference_count"]
    every = {(s.name, s.version) for s in client.get_inference_statistics().model_stats}
    assert {("mlp-digits", "1"), ("resnet-digits", "1"), ("forecast", "1")} <= every


# ---- inference ---------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["mlp-digits", "resnet-digits"])
def test_infer_answers_what_http_answers(server, client, model):
    images = digits(5, seed=1)
    result = client.infer(model, [grpc_input("image", images)], request_id="r-7")
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (model, "1", "r-7")
    logits = result.as_numpy("logits")
    assert logits.shape == (5, 10) and logits.dtype == np.float32
    np.testing.assert_array_equal(logits, http_infer(server, model, "image", images, "logits"))
    # by alias and by number, naming the output
    by_alias = client.infer(model, [grpc_input("image", images)], model_version="stable",
                            outputs=[tgrpc.InferRequestedOutput("logits")])
    assert by_alias.get_response().model_version == "1"
    np.testing.assert_array_equal(by_alias.as_numpy("logits"), logits)


def test_typed_contents_answer_as_raw_contents_and_metadata_carries_version_and_request_id(server, client):
    """A client that fills `contents.fp32_contents` instead of raw_input_contents (allowed by the
    proto; the stock client sends raw) gets the same answer; the answer's trailing metadata says the
    version, the alias that chose it and the request id, as HTTP's headers do."""
    images = digits(2, seed=4)
    request = pb.ModelInferRequest(model_name="mlp-digits")
    request.inputs.add(name="image", datatype="FP32", shape=[2, 1, 8, 8]).contents.fp32_contents.extend(
        images.ravel().tolist())
    with grpc.insecure_channel(server.grpc) as channel:
        response, call = GRPCInferenceServiceStub(channel).ModelInfer.with_call(
            request, metadata=(("x-request-id", "typed-1"),))
    trailing = dict(call.trailing_metadata())
    assert trailing == {"x-request-id": "typed-1", "x-model-version": "1", "x-model-alias": "stable"}
    typed = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(2, 10)
    np.testing.assert_array_equal(typed, client.infer("mlp-digits", [grpc_input("image", images)]).as_numpy("logits"))


def test_stream_infer_answers_each_request_and_an_error_does_not_end_the_stream(server, client):
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        for k in range(3):
            client.async_stream_infer("resnet-digits", [grpc_input("image", digits(2, seed=k))], request_id=f"ok-{k}")
        client.async_stream_infer("no-such-model", [grpc_input("image", digits(1))], request_id="bad")
        client.async_stream_infer("mlp-digits", [grpc_input("image", digits(1, seed=9))], request_id="after")
        got = [answers.get(timeout=30) for _ in range(5)]
    finally:
        client.stop_stream()
    results = {r.get_response().id: r for r, e in got if e is None}
    errors = [e for r, e in got if e is not None]
    assert sorted(results) == ["after", "ok-0", "ok-1", "ok-2"]
    assert len(errors) == 1 and "unknown model 'no-such-model'" in errors[0].message()
    for k in range(3):
        np.testing.assert_array_equal(results[f"ok-{k}"].as_numpy("logits"),
                                      client.infer("resnet-digits", [grpc_input("image", digits(2, seed=k))])
                                      .as_numpy("logits"))


def test_a_sequence_in_chunks_through_triton_parameters_answers_as_the_whole_series(server, client):
    def series(values):
        return grpc_input("series", values.reshape(1, -1, 1))

    whole = client.infer("forecast", [series(CO2)]).as_numpy("forecast")
    np.testing.assert_array_equal(whole, http_infer(server, "forecast", "series", CO2.reshape(1, -1, 1), "forecast"))
    for sequence_id in (41, "grpc-seq"):           # Triton's integer and string ids
        client.infer("forecast", [series(CO2[:2])], sequence_id=sequence_id, sequence_start=True)
        client.infer("forecast", [series(CO2[2:4])], sequence_id=sequence_id)
        last = client.infer("forecast", [series(CO2[4:])], sequence_id=sequence_id, sequence_end=True)
        np.testing.assert_allclose(last.as_numpy("forecast"), whole, rtol=0, atol=1e-4)
        error = grpc_error(lambda: client.infer("forecast", [series(CO2[:2])], sequence_id=sequence_id))
        assert error.status() == "StatusCode.INVALID_ARGUMENT" and "sequence_start" in error.message()
    # the sequence parameters are the sequence kind's: a classifier refuses them, naming them
    error = grpc_error(lambda: client.infer("mlp-digits", [grpc_input("image", digits(1))], sequence_id=5,
                                            sequence_start=True))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "'sequence_id'" in error.message()


# ---- errors ------------------------------------------------------------------------------------

def test_errors_carry_the_code_of_the_http_status_and_its_message(server, client):
    image = digits(1)
    body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": image.ravel().tolist()}]}
    error = grpc_error(lambda: client.infer("no-such-model", [grpc_input("image", image)]))
    assert error.status() == "StatusCode.NOT_FOUND"
    assert (404, error.message()) == http_error(server, "no-such-model", body)

    narrow = digits(1)[..., :7].copy()          # one column short: the shape names the input and the dim
    error = grpc_error(lambda: client.infer("mlp-digits", [grpc_input("image", narrow)]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "input 'image'" in error.message()
    wrong_shape = {"inputs": [{**body["inputs"][0], "shape": [1, 1, 8, 7], "data": narrow.ravel().tolist()}]}
    assert (400, error.message()) == http_error(server, "mlp-digits", wrong_shape)

    error = grpc_error(lambda: client.infer("mlp-digits", [grpc_input("image", image.astype(np.float64), "FP64")]))
    assert error.status() == "StatusCode.INVALID_ARGUMENT"
    assert "datatype FP64 does not match the model's FP32" in error.message()

    error = grpc_error(lambda: client.infer("mlp-digits", [grpc_input("image", image)], parameters={"temprature": 1}))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "'temprature'" in error.message()

    error = grpc_error(lambda: client.infer("mlp-digits", [grpc_input("image", image)], model_version="canary"))
    assert error.status() == "StatusCode.NOT_FOUND" and "'canary'" in error.message()

    # raw bytes that do not fill the declared shape: named before anything runs
    request = pb.ModelInferRequest(model_name="mlp-digits", raw_input_contents=[image.tobytes()[:-4]])
    request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])
    with grpc.insecure_channel(server.grpc) as channel, pytest.raises(grpc.RpcError) as info:
        GRPCInferenceServiceStub(channel).ModelInfer(request)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents[0] holds 252 bytes" in info.value.details()

    # over the body limit (16 MiB, HTTP's 413): refused by grpc itself before the server reads it
    too_big = np.zeros((70000, 1, 8, 8), np.float32)
    error = grpc_error(lambda: client.infer("mlp-digits", [grpc_input("image", too_big)]))
    assert error.status() == "StatusCode.RESOURCE_EXHAUSTED" and str(16 * 1024 * 1024) in error.message()


def test_a_passed_deadline_is_deadline_exceeded(server, client):
    error = grpc_error(lambda: client.infer("slow-digits", [grpc_input("image", digits(1))], timeout=1))
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED" and "deadline exceeded" in error.message()


def test_overload_is_unavailable_with_retry_after_and_counted_as_429(server, client):
    """Triton answers a full queue UNAVAILABLE over gRPC; so does this server, with retry-after."""
    for _ in range(4):                      # the drain rate is learned (as tests/serve/test_overload.py does)
        client.infer("slow-digits", [grpc_input("image", digits(1))])
    refused_before = metric(server, "zooserve_requests_total", model="slow-digits", status="429")
    request = pb.ModelInferRequest(model_name="slow-digits", raw_input_contents=[digits(1).tobytes()])
    request.inputs.add(name="image", datatype="FP32", shape=[1, 1, 8, 8])

    async def burst():
        async with grpc.aio.insecure_channel(server.grpc) as channel:
            stub = GRPCInferenceServiceStub(channel)

            async def one():
                call = stub.ModelInfer(request)
                try:
                    await call
                    return grpc.StatusCode.OK, "", {}
                except grpc.aio.AioRpcError as exc:
                    return exc.code(), exc.details(), dict(exc.trailing_metadata() or ())
            return await asyncio.gather(*(one() for _ in range(30)))
    answers = asyncio.run(burst())
    refused = [a for a in answers if a[0] != grpc.StatusCode.OK]
    assert refused and len(refused) < 30, [a[0] for a in answers]
    for code, details, trailing in refused:
        assert code == grpc.StatusCode.UNAVAILABLE and "queue" in details
        assert int(trailing["retry-after"]) >= 1 and trailing["x-model-version"] == "1"
    assert metric(server, "zooserve_requests_total", model="slow-digits", status="429") == \
           refused_before + len(refused)


def test_the_metrics_count_grpc_requests_by_model_and_status(server, client):
    ok_before = metric(server, "zooserve_requests_total", model="mlp-digits", status="200")
    bad_before = metric(server, "zooserve_requests_total", model="mlp-digits", status="400")
    for seed in range(3):
        client.infer("mlp-digits", [grpc_input("image", digits(1, seed))])
    grpc_error(lambda: client.infer("mlp-digits", [grpc_input("image", digits(1)[..., :7].copy())]))
    assert metric(server, "zooserve_requests_total", model="mlp-digits", status="200") == ok_before + 3
    assert metric(server, "zooserve_requests_total", model="mlp-digits", status="400") == bad_before + 1


# ---- repository --------------------------------------------------------------------------------

def test_index_load_and_unload_with_the_admin_token(server, client):
    rows = {(m.name, m.version): m.state for m in client.get_model_repository_index().models}
    assert rows[("mlp-digits", "1")] == "READY" and rows[("forecast", "1")] == "READY"
    error = grpc_error(lambda: client.unload_model("mlp-digits"))
    assert error.status() == "StatusCode.UNAUTHENTICATED" and "Authorization: Bearer" in error.message()
    error = grpc_error(lambda: client.unload_model("mlp-digits", headers={"authorization": "Bearer wrong-token"}))
    assert error.status() == "StatusCode.PERMISSION_DENIED"
    admin = {"authorization": f"Bearer {ADMIN}"}
    error = grpc_error(lambda: client.load_model("mlp-digits", headers=admin, config='{"max_batch_size": 2}'))
    assert error.status() == "StatusCode.INVALID_ARGUMENT" and "'config'" in error.message()
    client.unload_model("mlp-digits", headers=admin)
    try:
        assert not client.is_model_ready("mlp-digits")
        index = {(m.name, m.version): m for m in client.get_model_repository_index().models}
        assert (index[("mlp-digits", "1")].state, index[("mlp-digits", "1")].reason) == ("UNAVAILABLE", "unloaded")
        error = grpc_error(lambda: client.infer("mlp-digits", [grpc_input("image", digits(1))]))
        assert error.status() == "StatusCode.NOT_FOUND" and "unloaded" in error.message()
        # an unload of what is not loaded is HTTP's 404, not an internal error
        error = grpc_error(lambda: client.unload_model("mlp-digits", headers=admin))
        assert error.status() == "StatusCode.NOT_FOUND" and "already unloaded" in error.message()
    finally:
        client.load_model("mlp-digits", headers=admin)
    assert client.is_model_ready("mlp-digits")


# ---- the server's life -------------------------------------------------------------------------

def test_a_taken_port_is_refused_and_sigterm_lets_grpc_calls_in_flight_finish(grpc_registry, server):
    """A second server asked for a gRPC port already taken exits 3 naming it, instead of serving
    HTTP alone. Then calls queued on a slow model when SIGTERM comes are answered and the server
    exits 0. Last in this file: it stops the module's server (one server start less, ~10 s here)."""
    taken = ServerProcess(grpc_registry, ["--grpc-port", server.grpc.rsplit(":", 1)[1]])
    assert taken.proc.wait(60) == 3
    assert f"gRPC port {server.grpc} cannot be bound" in taken.logs()
    taken.stop()

    with tgrpc.InferenceServerClient(server.grpc) as c:   # batches that run side by side
        instances = sum(group.count for group in c.get_model_config("slow-digits").config.instance_group)

    async def calls_across_sigterm() -> tuple[list, float]:
        async with tgrpc_aio.InferenceServerClient(server.grpc) as c:
            await c.infer("slow-digits", [grpc_input("image", digits(1))])     # connected before the burst

            async def one(k: int):
                result = await c.infer("slow-digits", [grpc_input("image", digits(1, k))])
                return result.as_numpy("logits").shape, time.monotonic()
            # ~100 ms of work: two batches per instance, 50 ms each (more would meet the 400 ms wait
            # bound on a busy machine, and be refused for overload)
            work = [asyncio.ensure_future(one(k)) for k in range(2 * instances)]
            await asyncio.sleep(0.03)
            signalled = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)
            return await asyncio.gather(*work, return_exceptions=True), signalled
    answers, signalled = asyncio.run(calls_across_sigterm())
    assert all(not isinstance(a, Exception) for a in answers), answers
    assert [shape for shape, _ in answers] == [(1, 10)] * 2 * instances
    assert sum(t > signalled for _, t in answers) >= instances     # these were in flight at the signal
    assert server.proc.wait(30) == 0
