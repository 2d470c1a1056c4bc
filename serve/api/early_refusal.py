"""A v2 infer request that its queue refuses, answered 429 by the HTTP protocol from its headers
(serve/api/http_protocol.py), before uvicorn makes an ASGI request of it.

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

from serve.api.deps import request_id
from serve.api.v2 import INFER_PATH, _scope_header, error_answer
from serve.errors import QueueFull, engine_refusal, log_refusal


class Refusal:
    """One early 429: its headers and body, and the Retry-After the pacer holds the next one by
    (serve/api/pacing.py)."""

    __slots__ = ("headers", "body", "retry_after_s")

    def __init__(self, headers: list[tuple[bytes, bytes]], body: bytes, retry_after_s: float):
        self.headers, self.body, self.retry_after_s = headers, body, retry_after_s


def refusal(state, path: str, headers: list[tuple[bytes, bytes]], client) -> Refusal | None:
    """The 429 the infer route would answer to this request now, counted and logged, with the
    Retry-After the pacer gives `client` (the connection's address); None when this path does not
    decide it (the ASGI app then does). `headers`: the request's, names lower-case."""
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
        exc.retry_after_s = state.pacer.retry_after_s(client, exc.retry_after_s)
        error = engine_refusal(exc, model)
    except Exception:               # noqa: BLE001 - a route that fails, Closed: the app answers those
        return None
    given = next((value for name, value in headers if name == b"x-request-id"), None)
    rid = request_id(given)
    version = str(lv.version)
    error.headers = {"x-model-version": version, **error.headers}    # as the route's RequestOutcome names it
    body, answer_headers = error_answer(error, rid)
    lv.engine.metrics.request_done(429, time.perf_counter() - started)
    log_refusal("POST", path, 429, error.message, model, version, rid)
    return Refusal(answer_headers, body, float(error.headers["Retry-After"]))
