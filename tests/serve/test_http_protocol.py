"""serve/api/http_protocol.py: a v2 infer request its queue refuses is answered 429 by the HTTP
protocol from its headers (serve/api/early_refusal.py), with the answer the ASGI route gives, and
everything else goes on to the app as before; the infer handler's answers go out in one write,
byte for byte what uvicorn's own `send` writes.

In process: the real app (create_app, its lifespan, a real registry and batcher) behind uvicorn's
httptools protocol and ours, each fed raw HTTP bytes through a transport that keeps what is
written. The queue is made full by holding places in it (`engine.admit`, the route's own verb),
with model.json's max_queue_size 1. The same paths run through a real server in
tests/serve/test_overload.py."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from sklearn.datasets import load_digits
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from model_registry import Registry
from serve.api.http_protocol import ZooserveHttpProtocol
from serve.app import create_app
from serve.errors import ServeError
from serve.settings import ServeSettings

MODEL = "mlp-digits"
BODY = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                               "data": load_digits().images[0].astype(np.float32).flatten().tolist()}]}).encode()


def request(body: bytes = BODY, extra: bytes = b"", path: bytes = b"/v2/models/mlp-digits/infer") -> bytes:
    return (b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"X-Request-Id: probe-1\r\n" + extra + b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)


class Transport(asyncio.Transport):
    """A socket's write side that keeps what was written (the answers), for one connection."""

    def __init__(self, port: int = 40000):
        super().__init__()
        self.port = port                # the client's: the pacer knows a connection by it
        self.written = bytearray()
        self.writes = 0
        self.closed = False

    def write(self, data) -> None:
        self.written += data
        self.writes += 1

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name, default=None):
        return {"peername": ("127.0.0.1", self.port), "sockname": ("127.0.0.1", 8000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def answers(written: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    """Every HTTP answer in `written`: (status, headers, body)."""
    out, rest = [], bytes(written)
    while rest:
        head, rest = rest.split(b"\r\n\r\n", 1)
        lines = head.decode().split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers["content-length"])
        out.append((int(lines[0].split()[1]), headers, rest[:length]))
        rest = rest[length:]
    return out


class Harness:
    """The app started, and connections made to it through a protocol class."""

    def __init__(self, app, settings):
        self.app, self.settings = app, settings
        self.state = ServerState()

    def connect(self, protocol_class=ZooserveHttpProtocol, port: int = 40000):
        config = Config(self.app, http=protocol_class, access_log=False, log_config=None)
        config.load()
        protocol = protocol_class(config=config, server_state=self.state, app_state={})
        transport = Transport(port)
        protocol.connection_made(transport)
        return protocol, transport

    def engine(self):
        return self.app.state.repository.resolve(MODEL, None).engine


async def started(registry, model: str = MODEL, **settings) -> tuple[Harness, asyncio.Task, asyncio.Queue]:
    app = create_app(ServeSettings(registry=registry, rollout_controller=False, **settings))
    inbox, outbox = asyncio.Queue(), asyncio.Queue()
    await inbox.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(app({"type": "lifespan", "asgi": {"version": "3.0"}}, inbox.get, outbox.put))
    assert (await outbox.get())["type"] == "lifespan.startup.complete"
    for _ in range(600):                    # models load in the background after start-up
        try:
            app.state.repository.resolve(model, None)
            break
        except ServeError:
            await asyncio.sleep(0.05)
    else:
        raise AssertionError(f"{model} did not load")
    return Harness(app, settings), lifespan, inbox


async def stopped(lifespan: asyncio.Task, inbox: asyncio.Queue) -> None:
    await inbox.put({"type": "lifespan.shutdown"})
    await asyncio.wait_for(lifespan, 30)


@pytest.fixture
def one_place_registry(registry_copy):
    """mlp-digits with a queue of one request (a held place fills it)."""
    reg = Registry(registry_copy)
    cfg = reg.model_config(MODEL)
    cfg.batching.max_queue_size = 1
    reg.write_model_config(cfg)
    return registry_copy


def refusals_counted(harness: Harness) -> float:
    version = str(harness.app.state.repository.resolve(MODEL, None).version)
    return harness.app.state.metrics.registry.get_sample_value(
        "zooserve_requests_total", {"model": MODEL, "version": version, "status": "429"}) or 0.0


async def refused_by_the_app(harness: Harness) -> None:
    """A 429 from the app, on a connection of its own (the queue must be full): the server has
    refused lately, so the protocol judges refusals from the headers from now on (the pacer's
    `refusing`)."""
    plain, transport = harness.connect(HttpToolsProtocol, port=40999)
    plain.data_received(request())
    assert harness.state.tasks                          # the app answers it
    await settle(transport, 1)
    assert answers(transport.written)[0][0] == 429


async def settle(transport: Transport, count: int) -> None:
    for _ in range(400):
        if len(answers(transport.written)) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"fewer than {count} answers: {bytes(transport.written)[:300]!r}")


def test_a_refused_request_is_answered_from_its_headers_as_the_route_answers_it(one_place_registry):
    async def run():
        harness, lifespan, inbox = await started(one_place_registry)
        try:
            with harness.engine().admit(None):                  # the queue's one place, held
                plain, plain_transport = harness.connect(HttpToolsProtocol, port=40001)
                plain.data_received(request())
                assert harness.state.tasks                      # the route's answer comes from a task
                await settle(plain_transport, 1)
                early, early_transport = harness.connect()
                early.data_received(request())
                # answered inside data_received: no ASGI task was made for it
                assert not harness.state.tasks
                assert len(answers(early_transport.written)) == 1
            (status, headers, body), = answers(early_transport.written)
            (route_status, route_headers, route_body), = answers(plain_transport.written)
            assert status == route_status == 429
            assert body == route_body and b"queue is full" in body
            for name in ("content-type", "x-model-version", "retry-after", "x-request-id", "content-length"):
                assert headers[name] == route_headers[name], name
            assert headers["x-request-id"] == "probe-1"
            assert set(headers) == set(route_headers)
            # the connection stays usable: the next request (room now) is admitted and answered 200
            early.data_received(request())
            await settle(early_transport, 2)
            assert answers(early_transport.written)[1][0] == 200
            assert not early_transport.closed
            assert refusals_counted(harness) == 2               # the early 429 and the route's
        finally:
            await stopped(lifespan, inbox)
    asyncio.run(run())


def test_the_body_of_a_refused_request_is_dropped_as_it_arrives(one_place_registry):
    async def run():
        harness, lifespan, inbox = await started(one_place_registry, max_refusal_hold_s=0)
        try:
            protocol, transport = harness.connect()
            with harness.engine().admit(None):
                await refused_by_the_app(harness)
                raw = request()
                head, body = raw.split(b"\r\n\r\n", 1)
                protocol.data_received(head + b"\r\n\r\n")      # the headers alone: refused at once
                assert answers(transport.written)[0][0] == 429
                for i in range(0, len(body), 100):              # the body after the answer, in pieces
                    protocol.data_received(body[i:i + 100])
                protocol.data_received(request())               # and a second request, still refused
                assert [a[0] for a in answers(transport.written)] == [429, 429]
            protocol.data_received(request())
            await settle(transport, 3)
            assert [a[0] for a in answers(transport.written)] == [429, 429, 200]
        finally:
            await stopped(lifespan, inbox)
    asyncio.run(run())


def test_a_retry_at_once_is_held_and_a_request_pipelined_behind_it_waits_its_turn(one_place_registry):
    async def run():
        harness, lifespan, inbox = await started(one_place_registry, max_refusal_hold_s=0.3)
        try:
            protocol, transport = harness.connect()
            place = harness.engine().admit(None)
            await refused_by_the_app(harness)
            protocol.data_received(request())
            assert answers(transport.written)[0][0] == 429               # a first 429: at once
            # a retry at once and a request pipelined behind it, in one segment
            protocol.data_received(request() + request())
            assert len(answers(transport.written)) == 1                   # the retry's 429 is held
            await asyncio.sleep(0.1)
            assert len(answers(transport.written)) == 1
            place.release()                                               # room for the pipelined one
            await settle(transport, 3)
            # in the order asked: the held 429 first (~0.3 s), then the pipelined request, admitted
            assert [a[0] for a in answers(transport.written)] == [429, 429, 200]
        finally:
            await stopped(lifespan, inbox)
    asyncio.run(run())


@pytest.mark.parametrize("extra", [b"X-Forwarded-For: 10.0.0.9\r\n", b"Expect: 100-continue\r\n"])
def test_requests_this_path_does_not_judge_go_to_the_app(one_place_registry, extra):
    async def run():
        harness, lifespan, inbox = await started(one_place_registry, max_refusal_hold_s=0)
        try:
            protocol, transport = harness.connect()
            with harness.engine().admit(None):
                await refused_by_the_app(harness)           # judged from the headers, were the request plain
                protocol.data_received(request(extra=extra))
                assert harness.state.tasks                      # the app answers it
                await settle(transport, 1)
            assert answers(transport.written)[0][0] == 429
        finally:
            await stopped(lifespan, inbox)
    asyncio.run(run())


def test_an_admitted_request_and_a_connection_close_refusal(one_place_registry):
    async def run():
        harness, lifespan, inbox = await started(one_place_registry, max_refusal_hold_s=0)
        try:
            protocol, transport = harness.connect()
            protocol.data_received(request())                   # room: the app takes it
            assert harness.state.tasks
            await settle(transport, 1)
            assert answers(transport.written)[0][0] == 200
            closing, closing_transport = harness.connect()
            with harness.engine().admit(None):
                await refused_by_the_app(harness)
                closing.data_received(request(extra=b"Connection: close\r\n"))
            (status, headers, _), = answers(closing_transport.written)
            assert status == 429 and headers["connection"] == "close" and closing_transport.closed
        finally:
            await stopped(lifespan, inbox)
    asyncio.run(run())


def test_refusals_are_judged_from_the_headers_only_within_a_second_of_the_last_one(one_place_registry):
    async def run():
        harness, lifespan, inbox = await started(one_place_registry, max_refusal_hold_s=0)
        try:
            pacer = harness.app.state.pacer
            protocol, transport = harness.connect()
            with harness.engine().admit(None):
                protocol.data_received(request())       # nothing refused yet: the app refuses it
                assert harness.state.tasks
                await settle(transport, 1)
                protocol.data_received(request())       # refused lately: answered from the headers
                assert len(answers(transport.written)) == 2
                pacer.last_refusal_s -= 1.5             # as if the last 429 were 1.5 s old
                protocol.data_received(request())
                assert len(answers(transport.written)) == 2   # the app's again, from a task
                await settle(transport, 3)
            assert [a[0] for a in answers(transport.written)] == [429] * 3
            assert refusals_counted(harness) == 3
        finally:
            await stopped(lifespan, inbox)
    asyncio.run(run())


def test_answers_go_out_in_one_write_byte_for_byte_as_uvicorn_writes_them(registry_copy):
    bad = json.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                  "data": [1.0]}]}).encode()

    async def run():
        harness, lifespan, inbox = await started(registry_copy)
        try:
            ours, ours_transport = harness.connect()
            theirs, theirs_transport = harness.connect(HttpToolsProtocol)
            for body in (BODY, bad):
                for protocol in (ours, theirs):
                    protocol.data_received(request(body))
            # and two requests pipelined in one segment: answered in order
            ours.data_received(request(bad) + request(BODY))
            theirs.data_received(request(bad) + request(BODY))
            await settle(ours_transport, 4)
            await settle(theirs_transport, 4)
        finally:
            await stopped(lifespan, inbox)
        assert [a[0] for a in answers(ours_transport.written)] == [200, 400, 400, 200]
        assert bytes(ours_transport.written) == bytes(theirs_transport.written)
        assert ours_transport.writes == 4 and theirs_transport.writes == 8     # one write an answer, not two
        assert not ours_transport.closed
    asyncio.run(run())


def test_a_connection_close_request_is_answered_and_closed(registry_copy):
    async def run():
        harness, lifespan, inbox = await started(registry_copy)
        try:
            protocol, transport = harness.connect()
            protocol.data_received(request(extra=b"Connection: close\r\n"))
            await settle(transport, 1)
        finally:
            await stopped(lifespan, inbox)
        (status, headers, _), = answers(transport.written)
        assert status == 200 and headers["connection"] == "close" and transport.closed
    asyncio.run(run())


def test_a_request_leaves_nothing_for_the_cyclic_collector(one_place_registry):
    """Every object of an answered request is freed by its reference count. A cycle through the
    request (a closure over uvicorn's cycle put in its own scope did that) leaves each request to the
    cyclic collector: its full collections then stall the event loop under load (p99 +50 % at 1024
    clients, bench/overload.py)."""
    import gc

    async def run():
        harness, lifespan, inbox = await started(one_place_registry, max_refusal_hold_s=0)
        try:
            protocol, transport = harness.connect()
            bad = request(b'{"inputs": 3}')
            for _ in range(5):                                      # warm: first-use caches
                protocol.data_received(request())
                protocol.data_received(bad)
                await settle(transport, len(answers(transport.written)) + 1)
            found = {}
            for kind in ("accepted", "refused early", "bad request"):
                if kind == "refused early":
                    with harness.engine().admit(None):
                        await refused_by_the_app(harness)       # what makes the next ones early
                gc.collect()
                gc.disable()
                try:
                    for _ in range(100):
                        count = len(answers(transport.written))
                        if kind == "refused early":
                            with harness.engine().admit(None):
                                protocol.data_received(request())
                        else:
                            protocol.data_received(request() if kind == "accepted" else bad)
                        await settle(transport, count + 1)
                    await asyncio.sleep(0.05)
                    found[kind] = gc.collect()
                finally:
                    gc.enable()
            statuses = [a[0] for a in answers(transport.written)[-300:]]
            assert statuses == [200] * 100 + [429] * 100 + [400] * 100
        finally:
            await stopped(lifespan, inbox)
        # a few objects of the loop's own (timers, the settle polls) may turn up; a request's are dozens
        assert all(n < 20 for n in found.values()), found
    asyncio.run(run())
