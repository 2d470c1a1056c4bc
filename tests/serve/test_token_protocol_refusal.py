"""serve/api/http_protocol.py with serve/api/token_admission.py's `refusal`: while the server is
refusing, an OpenAI generate request to a full token engine is held back by the HTTP protocol until
its body is in and answered 429 there, without an ASGI task, with the answer the early shed in the
app (`admit_or_refuse`) gives; admitted, the same request reaches the handler with its body whole.

In process, as tests/serve/test_http_protocol.py: the real app behind uvicorn's protocol and ours,
fed raw HTTP bytes. "Full" is held by count: lstm-charlm (recurrent, so a sequence can be tens of
thousands of tokens) with one row (max_num_seqs 1) and a waiting queue of one, filled by two long
generations sent through uvicorn's own protocol on connections of their own; they end when their
clients leave (connection_lost aborts them). The probe body carries a field the strict request schema
refuses with 400: a 429 for it can only come from an admission check, made before validation."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tests.serve import test_token_early_shed
from tests.serve.test_http_protocol import answers, settle, started, stopped

pytestmark = pytest.mark.slow
MODEL = "lstm-charlm"
PROBE = json.dumps({"model": MODEL, "prompt": "ROMEO.", "max_tokens": 4, "bogus_field": 1}).encode()
LONG = json.dumps({"model": MODEL, "prompt": "ROMEO.", "max_tokens": 60000, "temperature": 0,
                   "ignore_eos": True}).encode()


def generate(body: bytes, request_id: bytes = b"probe-1") -> bytes:
    return (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: " + request_id + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


one_row_lstm = test_token_early_shed.one_row_lstm      # the fixture: lstm-charlm, one waiting place


async def until(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.01)


def test_a_full_engine_refuses_a_generate_request_in_the_protocol_and_admits_it_once_idle(one_row_lstm):
    async def run():
        harness, lifespan, inbox = await started(one_row_lstm, model=MODEL, max_num_seqs=1,
                                                 max_refusal_hold_s=0)
        try:
            engine = harness.app.state.repository.resolve(MODEL, None).engine
            scheduler = engine.scheduler
            long_runs = []
            for port in (41001, 41002):                     # one runs in the only row, one waits
                protocol, _ = harness.connect(HttpToolsProtocol, port=port)
                protocol.data_received(generate(LONG, b"long-%d" % port))
                long_runs.append(protocol)
            await until(lambda: scheduler.num_running == 1 and scheduler.num_waiting == 1, "never full")

            # the app's early shed answers first (and arms the protocol's judging: the pacer's `refusing`)
            plain, plain_transport = harness.connect(HttpToolsProtocol, port=41003)
            plain.data_received(generate(PROBE))
            await settle(plain_transport, 1)
            tasks_before = len(harness.state.tasks)         # the two long generations
            ours, transport = harness.connect(port=41004)
            raw = generate(PROBE)
            head, body = raw.split(b"\r\n\r\n", 1)
            ours.data_received(head + b"\r\n\r\n" + body[:10])
            assert transport.written == b""                 # held back: its body is not in yet
            ours.data_received(body[10:])
            # answered inside data_received: no ASGI task was made for it
            assert len(harness.state.tasks) == tasks_before
            (status, headers, answer), = answers(transport.written)
            (app_status, app_headers, app_answer), = answers(plain_transport.written)
            assert status == app_status == 429, (answer, app_answer)
            assert answer == app_answer and json.loads(answer)["error"]["type"] == "rate_limit_error"
            assert set(headers) == set(app_headers)
            for name in ("content-type", "x-model-version", "retry-after", "x-request-id", "content-length"):
                assert headers[name] == app_headers[name], name
            assert headers["x-request-id"] == "probe-1" and int(headers["retry-after"]) >= 1
            assert not transport.closed

            for protocol in long_runs:                       # their clients leave: both aborted
                protocol.connection_lost(None)
            await until(lambda: scheduler.num_running == 0 and scheduler.num_waiting == 0, "never idle")
            harness.app.state.pacer.last_refusal_s = time.monotonic()    # still judging here
            ours.data_received(head + b"\r\n\r\n")
            assert len(harness.state.tasks) == 0             # held back for its body
            ours.data_received(body)
            assert len(harness.state.tasks) == 1             # admitted: the handler has it, body whole
            await settle(transport, 2)
            status, _, answer = answers(transport.written)[1]
            assert status == 400 and b"bogus_field" in answer, answer     # the handler read the body
            valid = json.dumps({"model": MODEL, "prompt": "ROMEO.", "max_tokens": 4}).encode()
            ours.data_received(generate(valid))
            await settle(transport, 3)
            status, _, answer = answers(transport.written)[2]
            assert status == 200 and json.loads(answer)["usage"]["completion_tokens"] == 4, answer
            version = str(engine.version)
            assert harness.app.state.metrics.registry.get_sample_value(
                "zooserve_requests_total", {"model": MODEL, "version": version, "status": "429"}) == 2
        finally:
            await stopped(lifespan, inbox)
    asyncio.run(run())
