"""Token models over KServe v2 gRPC (issue 16 §2), as Triton serves LLMs: the stock
`tritonclient.grpc` against a real server over the token registry, with Triton's vLLM backend's
tensors (`text_input`, `stream`, `sampling_parameters`, `exclude_input_in_output` -> `text_output`).
ModelInfer answers what /v1/completions answers; ModelStreamInfer is decoupled (one response per
chunk, the last flagged `triton_final_response`); seeds repeat; bad settings are INVALID_ARGUMENT
naming them; a cancelled stream aborts its sequences and the server goes on; a full engine is
UNAVAILABLE with retry-after."""

from __future__ import annotations

import json
import queue
import time

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceStub
from tritonclient.utils import InferenceServerException

from model_registry import Registry
from serve.api.grpc_codec import bytes_tensor
from tests.conftest import ServerProcess, free_port

pytestmark = pytest.mark.slow
PROMPT = "ROMEO. What light through yonder window"
GREEDY = {"max_tokens": 16, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(token_registry):
    grpc_port = free_port()
    server = ServerProcess(token_registry, ["--grpc-port", str(grpc_port)])
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


def text_inputs(prompt: str = PROMPT, stream: bool | None = None, sampling: dict | None = None,
                exclude: bool | None = None) -> list[tgrpc.InferInput]:
    """The inputs a client of Triton's vLLM backend sends (its samples/client.py)."""
    def tensor(name: str, value, datatype: str) -> tgrpc.InferInput:
        t = tgrpc.InferInput(name, [1], datatype)
        t.set_data_from_numpy(np.array([value], dtype=bool if datatype == "BOOL" else np.object_))
        return t
    inputs = [tensor("text_input", prompt.encode(), "BYTES")]
    if stream is not None:
        inputs.append(tensor("stream", stream, "BOOL"))
    if sampling is not None:
        inputs.append(tensor("sampling_parameters", json.dumps(sampling).encode(), "BYTES"))
    if exclude is not None:
        inputs.append(tensor("exclude_input_in_output", exclude, "BOOL"))
    return inputs


def text_of(result) -> str | None:
    out = result.as_numpy("text_output")
    return None if out is None else b"".join(out.ravel()).decode()


def is_final(result) -> bool:
    return result.get_response().parameters["triton_final_response"].bool_param


def http_text(server, model: str, **body) -> str:
    response = httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": PROMPT, **body}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def metric(server, name: str, **labels) -> float:
    text = httpx.get(f"{server.url}/metrics").text
    return sum(s.value for family in text_string_to_metric_families(text) for s in family.samples
               if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))


def grpc_error(call) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as info:
        call()
    return info.value


def stream_until_final(client, requests: list[dict], errors: int = 0, timeout: float = 60) -> tuple[dict, list]:
    """Send `requests` (async_stream_infer's keyword arguments, each with a request_id) on one stream:
    ({request id: its results until the final one}, the `errors` errors expected). The stock client
    hands a stream's error to the callback without its request's id."""
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    got: dict[str, list] = {r["request_id"]: [] for r in requests}
    finished, failed = set(), []
    try:
        for r in requests:
            client.async_stream_infer(**r)
        deadline = time.monotonic() + timeout
        while len(finished) + len(failed) < len(requests):
            result, error = answers.get(timeout=max(0.1, deadline - time.monotonic()))
            if error is not None:
                failed.append(error)
                continue
            rid = result.get_response().id
            got[rid].append(result)
            if is_final(result):
                finished.add(rid)
    finally:
        client.stop_stream()
    assert len(failed) == errors, [e.message() for e in failed]
    return got, failed


# ---- metadata and configuration ----------------------------------------------------------------

def test_metadata_lists_the_text_tensors_and_config_says_decoupled(server, client):
    meta = client.get_model_metadata("decoder-tiny")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("text_input", "BYTES", [1]), ("stream", "BOOL", [1]), ("sampling_parameters", "BYTES", [1]),
        ("exclude_input_in_output", "BOOL", [1])]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("text_output", "BYTES")]
    config = client.get_model_config("mamba-tiny").config
    assert config.model_transaction_policy.decoupled and config.max_batch_size == 0
    assert [(t.name, t.optional) for t in config.input] == [("text_input", False), ("stream", True),
                                                           ("sampling_parameters", True),
                                                           ("exclude_input_in_output", True)]
    assert [t.name for t in config.output] == ["text_output"]
    assert httpx.get(f"{server.url}/v2/models/mamba-tiny/config").json()["model_transaction_policy"] == \
           {"decoupled": True}
    assert httpx.get(f"{server.url}/v2/models/mlp-digits/config").json()["model_transaction_policy"] == \
           {"decoupled": False}
    assert not client.get_model_config("mlp-digits").config.model_transaction_policy.decoupled


# ---- ModelInfer: the whole completion ----------------------------------------------------------

@pytest.mark.parametrize("model", ["decoder-tiny", "mamba-tiny", "lstm-charlm"])
def test_greedy_infer_answers_what_v1_completions_answers(server, client, model):
    expected = http_text(server, model, **GREEDY)
    ok_before = metric(server, "zooserve_requests_total", model=model, status="200")
    # the settings as request parameters (vLLM reads them there without a sampling_parameters tensor)
    result = client.infer(model, text_inputs(exclude=True), parameters=GREEDY, request_id="g-1")
    assert text_of(result) == expected and len(expected) > 0
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (model, "1", "g-1")
    # vLLM's default: the prompt goes first unless exclude_input_in_output; settings in the tensor
    whole = client.infer(model, text_inputs(sampling=GREEDY), outputs=[tgrpc.InferRequestedOutput("text_output")])
    assert text_of(whole) == PROMPT + expected
    assert metric(server, "zooserve_requests_total", model=model, status="200") == ok_before + 2


def test_a_seeded_sample_answers_the_same_twice_and_as_http(server, client):
    sampled = {"temperature": 1.0, "top_p": 0.9, "seed": 1234, "max_tokens": 12, "ignore_eos": True}
    first = text_of(client.infer("decoder-tiny", text_inputs(sampling=sampled, exclude=True)))
    # as vLLM's sample client sends them: strings, in the parameters and the tensor alike
    as_strings = {key: str(value) for key, value in sampled.items() if key != "ignore_eos"}
    again = text_of(client.infer("decoder-tiny", text_inputs(sampling={**as_strings, "ignore_eos": True}, exclude=True),
                                 parameters=as_strings))
    assert first == again == http_text(server, "decoder-tiny", **sampled)


# ---- ModelStreamInfer: decoupled -----------------------------------------------------------------

def test_stream_sends_chunks_that_concatenate_to_the_completion_then_a_final_response(server, client):
    expected = http_text(server, "decoder-tiny", **{**GREEDY, "max_tokens": 24})
    settings = {**GREEDY, "max_tokens": 24}
    got, _ = stream_until_final(client, [
        # Triton's flags-only final response, asked for as the stock client asks
        {"model_name": "decoder-tiny", "inputs": text_inputs(stream=True), "parameters": settings,
         "request_id": "empty-final", "enable_empty_final_response": True},
        # without it the last chunk carries the flag; and one answer with stream false, in the same stream
        {"model_name": "decoder-tiny", "inputs": text_inputs(stream=True, sampling=settings), "request_id": "flagged"},
        {"model_name": "decoder-tiny", "inputs": text_inputs(stream=False, sampling=settings, exclude=True),
         "request_id": "whole"},
    ])
    chunks = got["empty-final"]
    assert len(chunks) > 2 and [is_final(r) for r in chunks] == [False] * (len(chunks) - 1) + [True]
    assert text_of(chunks[-1]) is None and not chunks[-1].get_response().outputs      # empty, flag only
    assert all(text_of(r) for r in chunks[:-1])                                       # each a new piece
    assert "".join(text_of(r) for r in chunks[:-1]) == expected

    flagged = got["flagged"]
    assert len(flagged) > 2 and [is_final(r) for r in flagged] == [False] * (len(flagged) - 1) + [True]
    assert "".join(text_of(r) for r in flagged) == expected
    (whole,) = got["whole"]
    assert is_final(whole) and text_of(whole) == expected


def test_stream_errors_are_the_request_s_and_the_stream_goes_on(server, client):
    got, (error,) = stream_until_final(client, [
        {"model_name": "decoder-tiny", "inputs": text_inputs(stream=True), "parameters": {"temprature": 0.5},
         "request_id": "bad"},
        {"model_name": "decoder-tiny", "inputs": text_inputs(stream=True), "parameters": GREEDY, "request_id": "good"},
    ], errors=1)
    assert "'temprature'" in error.message() and got["bad"] == []
    assert "".join(text_of(r) for r in got["good"]) == http_text(server, "decoder-tiny", **GREEDY)


# ---- errors --------------------------------------------------------------------------------------

def test_bad_settings_are_invalid_argument_naming_them(server, client):
    def refused(**kwargs) -> str:
        error = grpc_error(lambda: client.infer("decoder-tiny", kwargs.pop("inputs", text_inputs()), **kwargs))
        assert error.status() == "StatusCode.INVALID_ARGUMENT", error
        return error.message()

    assert "temperature" in refused(parameters={"temperature": 5})
    assert "temperature" in refused(inputs=text_inputs(sampling={"temperature": -1}))
    assert "'temprature'" in refused(parameters={"temprature": 0.5})
    assert "'n'" in refused(inputs=text_inputs(sampling={"n": 2}))
    assert "top_p" in refused(parameters={"top_p": "lots"})
    assert "disagree" in refused(inputs=text_inputs(sampling={"seed": 1}), parameters={"seed": 2})
    assert "ModelStreamInfer" in refused(inputs=text_inputs(stream=True))
    assert "max_tokens" in refused(parameters={"max_tokens": 100000})          # beyond the context
    image = tgrpc.InferInput("ids", [1, 1], "INT64")
    image.set_data_from_numpy(np.ones((1, 1), np.int64))
    assert "'ids'" in refused(inputs=[image]) and "text_input" in refused(inputs=[image])
    assert "'logits'" in refused(outputs=[tgrpc.InferRequestedOutput("logits")])
    # Triton's timeout (µs) bounds the whole completion
    error = grpc_error(lambda: client.infer("decoder-tiny", text_inputs(), parameters={"max_tokens": 64}, timeout=1))
    assert error.status() == "StatusCode.DEADLINE_EXCEEDED" and "deadline exceeded" in error.message()


# ---- cancellation --------------------------------------------------------------------------------

def test_a_cancelled_stream_aborts_its_sequences_and_the_server_goes_on(server, client):
    labels = {"model": "decoder-tiny", "version": "1"}
    aborted_before = metric(server, "zooserve_requests_total", status="499", **labels)
    context = next(m for m in httpx.get(f"{server.url}/v1/models").json()["data"] if m["id"] == "decoder-tiny")
    long = {"max_tokens": context["max_model_len"] - 20, "ignore_eos": True}      # to the context's end
    first: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: first.put((result, error)))
    try:
        for k in range(4):           # long sequences, in the same continuous batch
            client.async_stream_infer("decoder-tiny", text_inputs(stream=True), request_id=f"long-{k}",
                                      parameters=long)
        result, error = first.get(timeout=60)
        assert error is None and not is_final(result)
    finally:
        client.stop_stream(cancel_requests=True)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        running = metric(server, "zooserve_requests_running", **labels)
        if running == 0:
            break
        time.sleep(0.05)
    assert running == 0
    assert metric(server, "zooserve_requests_total", status="499", **labels) > aborted_before
    generated = metric(server, "zooserve_generated_tokens_total", **labels)
    time.sleep(0.3)
    assert metric(server, "zooserve_generated_tokens_total", **labels) == generated    # nothing goes on
    result = client.infer("decoder-tiny", text_inputs(exclude=True), parameters=GREEDY)
    assert text_of(result) == http_text(server, "decoder-tiny", **GREEDY)


# ---- overload ------------------------------------------------------------------------------------

def test_a_full_token_engine_is_unavailable_with_retry_after_and_counted(token_registry, tmp_path, start_server):
    """lstm-charlm with one row and a waiting queue of one: a long stream holds the row, a second waits,
    and a ModelInfer is refused as /v1 refuses it (429), UNAVAILABLE with retry-after, counted."""
    model = "lstm-charlm"
    registry = Registry(tmp_path / "registry")
    registry.set_alias(model, "stable", registry.publish(model, token_registry / model / "1"))
    cfg = registry.model_config(model)
    cfg.batching.max_queue_size, cfg.batching.max_queue_wait_ms = 1, 3_600_000.0
    registry.write_model_config(cfg)
    grpc_port = free_port()
    with start_server(registry.root, ["--grpc-port", str(grpc_port)], env={"ZOOSERVE_MAX_NUM_SEQS": "1"}) as server, \
            tgrpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
        context = next(m for m in httpx.get(f"{server.url}/v1/models").json()["data"] if m["id"] == model)
        long = {"max_tokens": min(20000, context["max_model_len"] - 20), "ignore_eos": True}
        labels = {"model": model, "version": "1"}
        client.start_stream(callback=lambda result, error: None)
        try:
            for k in range(2):
                client.async_stream_infer(model, text_inputs(stream=True), request_id=f"hold-{k}", parameters=long)
            deadline = time.monotonic() + 30
            while (metric(server, "zooserve_requests_running", **labels),
                   metric(server, "zooserve_requests_waiting", **labels)) != (1, 1):
                assert time.monotonic() < deadline, "the two streams never filled the row and the queue"
                time.sleep(0.02)
            request = pb.ModelInferRequest(model_name=model, raw_input_contents=[bytes_tensor([PROMPT.encode()])])
            request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel, pytest.raises(grpc.RpcError) as info:
                GRPCInferenceServiceStub(channel).ModelInfer(request)
        finally:
            client.stop_stream(cancel_requests=True)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "retry later" in info.value.details()
        trailing = dict(info.value.trailing_metadata())
        assert int(trailing["retry-after"]) >= 1 and trailing["x-model-version"] == "1"
        assert metric(server, "zooserve_requests_total", status="429", **labels) >= 1
