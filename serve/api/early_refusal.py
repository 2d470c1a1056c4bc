"""A v2 infer request that its queue refuses, answered 429 by the HTTP protocol from its headers,
before uvicorn makes an ASGI request of it.

Why: under overload most requests are refused. Through ASGI a refusal still costs a request cycle,
a task, the app's layers and two `send` calls whose headers uvicorn checks one by one with regular
expressions: ~0.1 ms of the event loop each, and 1024 clients bring ~850 of them a second, a tenth
of the loop the accepted requests need (py-spy, bench/overload.py). Here the decision is made when
the request's headers are parsed (path -> model and version -> the queue's `admit`), and the answer
(the same status, headers, body, metrics, log line and pacing as serve/api/v2.py's) is written to
the socket in one call. The body that follows is dropped as it arrives, as uvicorn drops the body of
any request answered before it was read.

Anything this path does not judge goes on to the ASGI app unchanged, which answers as it always
has: a request pipelined behind one not yet answered, `Expect: 100-continue`, a path with escapes,
a request through a proxy (`X-Forwarded-For` / `Forwarded`: the pacer keys on the client the app
sees), a route that fails (unknown model, no ready version) or a queue that admits it, and every
request while the access log is on.
"""

from __future__ import annotations

import time

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from serve.api.deps import request_id
from serve.api.v2 import INFER_PATH, _scope_header
from serve.errors import QueueFull, engine_refusal, error_body, log_refusal

_PROXY_HEADERS = (b"x-forwarded-for", b"forwarded")


class Refusal:
    """One early 429: what to write, and how long the pacer holds it (serve/api/pacing.py)."""

    __slots__ = ("headers", "body", "retry_after_s")

    def __init__(self, headers: list[tuple[bytes, bytes]], body: bytes, retry_after_s: float):
        self.headers, self.body, self.retry_after_s = headers, body, retry_after_s

    def encode(self, default_headers, keep_alive: bool) -> bytes:
        """The whole HTTP answer: uvicorn's status line and default headers (date, server), then ours."""
        parts = [STATUS_LINE[429]]
        for name, value in (*default_headers, *self.headers):
            parts += (name, b": ", value, b"\r\n")
        if not keep_alive:
            parts.append(b"connection: close\r\n")
        parts += (b"\r\n", self.body)
        return b"".join(parts)


def refusal(state, path: str, headers: list[tuple[bytes, bytes]]) -> Refusal | None:
    """The 429 the infer route would answer to this request now, counted and logged; None when this
    path does not decide it (the ASGI app then does). `headers`: the request's, names lower-case."""
    match = INFER_PATH.fullmatch(path)
    if match is None:
        return None
    started = time.perf_counter()
    model = match["model"]
    try:
        lv, _ = state.repository.route(model, match["version"], _scope_header(headers))
        with lv.engine.admit(started + state.settings.request_timeout_s):
            return None             # admitted: the app admits it again, holding its place while it reads
    except QueueFull as exc:
        error = engine_refusal(exc, model)
    except Exception:               # noqa: BLE001 - a route that fails, Closed: the app answers those
        return None
    given = next((value for name, value in headers if name == b"x-request-id"), None)
    rid = request_id(given)
    version = str(lv.version)
    retry_after = error.headers["Retry-After"]
    body = error_body(error.message)
    lv.engine.metrics.request_done(429, time.perf_counter() - started)
    log_refusal("POST", path, 429, error.message, model, version, rid)
    return Refusal([(b"content-type", b"application/json"), (b"x-model-version", version.encode()),
                    (b"retry-after", retry_after.encode()), (b"x-request-id", rid.encode()),
                    (b"content-length", str(len(body)).encode())], body, float(retry_after))


class _Answered:
    """What uvicorn's protocol reads of a request cycle (serve/api/early_refusal.py answers the
    request itself): complete once the 429 is written, so the body that follows is dropped and a
    request pipelined behind it waits until then."""

    __slots__ = ("response_complete", "disconnected", "keep_alive", "more_body", "body", "message_event")

    def __init__(self, keep_alive: bool):
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = keep_alive
        self.more_body = True
        self.body = _Sink()
        self.message_event = _NoEvent()


class _Sink:
    """A request body that keeps nothing (`cycle.body += chunk` while a refusal is held)."""

    __slots__ = ()

    def __iadd__(self, chunk: bytes) -> "_Sink":
        return self

    def __len__(self) -> int:
        return 0


class _NoEvent:
    __slots__ = ()

    def set(self) -> None:
        pass


class EarlyRefusalProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol; a v2 infer request its queue refuses is answered here."""

    def on_headers_complete(self) -> None:
        if self._refused_here():
            return
        super().on_headers_complete()

    def _refused_here(self) -> bool:
        front = self.config.app                     # serve.app.InferFastPath
        if getattr(front, "access_log", True) or self.expect_100_continue:
            return False
        if self.cycle is not None and not self.cycle.response_complete:
            return False                            # pipelined behind an unanswered request
        if self.parser.get_method() != b"POST" or not self.url.endswith(b"/infer"):
            return False
        raw_path = httptools.parse_url(self.url).path
        if b"%" in raw_path or any(name in _PROXY_HEADERS for name, _ in self.headers):
            return False
        answer = refusal(front.state, raw_path.decode("ascii"), self.headers)
        if answer is None:
            return False
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        self.cycle = cycle = _Answered(keep_alive)
        pacer = front.state.pacer
        hold = pacer.hold_s(self.client)
        if hold > 0:                                # a client that did not wait its last Retry-After
            self.loop.call_later(hold, self._write, cycle, answer, pacer)
        else:
            self._write(cycle, answer, pacer)
        return True

    def _write(self, cycle: _Answered, answer: Refusal, pacer) -> None:
        if cycle.disconnected or self.transport.is_closing():
            return
        self.transport.write(answer.encode(self.server_state.default_headers, cycle.keep_alive))
        cycle.response_complete = True
        pacer.refused(self.client, answer.retry_after_s)
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()       # uvicorn's: the keep-alive timer, or the next pipelined request
