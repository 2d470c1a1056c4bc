"""Shedding token requests before FastAPI: a new sequence that its engine would refuse gets its 429
here, from the body's `model` (and `user`, the sticky key) alone, before routing through FastAPI,
validating the request, tokenizing the prompt and checking the context.

The v2 routes name their model in the path and shed before reading the body (serve/api/v2.py). The
OpenAI routes name it in the body, so the body (small: a prompt) is read first, parsed by orjson,
routed as the handler routes it, and the engine asked (`TokenEngine.admit`). Admitted, the handler
gets the same body through a `receive` that replays it. Under 1024 clients, a 429 through FastAPI
and pydantic cost the token engine's thread a large share of the GIL (bench/overload.py --family
tokens). Anything this path cannot judge (no Content-Length, a compressed or malformed body, a model
that is not a token model) goes on to the handler, which answers it as before.

While the server is refusing (the pacer's `refusing`: a 429 within the last second), the HTTP
protocol itself holds back a small generate request until its body is in (serve/api/http_protocol.py)
and asks `refusal` here: a 429 is then written to the socket in one call, without an ASGI request
cycle, task or `send` (the same answer, counted, logged and paced the same way). Under 1024 clients
honouring Retry-After, the ASGI refusals were ~a fifth of the event loop's samples (py-spy,
bench/overload.py --family tokens), and the loop's CPU is the engine thread's on two cores.
"""

from __future__ import annotations

import time
from typing import Callable

import orjson

from serve.api.deps import receive_body, request_id
from serve.api.early_refusal import Refusal
from serve.errors import QueueFull, ServeError, log_refusal

GENERATE_PATHS = frozenset({"/v1/completions", "/v1/chat/completions"})


async def admit_or_refuse(scope, receive, send, state) -> Callable | None:
    """The `receive` to hand the handler (it replays the body read here), or None when the request
    was answered here (429) or its client left."""
    length = encoding = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            length = value
        elif name == b"content-encoding":
            encoding = value
    if length is None or encoding is not None or not length.isdigit() \
            or int(length) > state.settings.max_body_bytes:
        return receive                       # the handler answers these as it always has
    started = time.perf_counter()
    try:
        body = await receive_body(receive, length, state.settings.max_body_bytes)
    except ServeError:
        return receive
    if body is None:
        return None                          # the client left
    lv = _routed_engine(state.repository, body, scope["headers"])
    if lv is not None:
        try:
            lv.engine.admit(started + state.settings.request_timeout_s)
        except QueueFull as exc:
            await _refuse(scope, send, state, lv, exc, started)
            return None
    return _replay(body, receive)


def _routed_engine(repo, body: bytes, raw_headers):
    """The version the handler would route this body to, when it is a token model's."""
    from serve.api.openai import _split_model      # the handler's own reading of `model`

    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    model, user = (doc.get("model"), doc.get("user")) if isinstance(doc, dict) else (None, None)
    if not isinstance(model, str) or not (user is None or isinstance(user, str)):
        return None
    name, ref = _split_model(model)
    if name not in repo.tables:
        return None

    def header(wanted: str) -> str | None:
        key = wanted.encode("latin-1")
        return next((v.decode("latin-1") for k, v in raw_headers if k == key), None)
    try:
        lv, _ = repo.route(name, ref, header, user)
    except ServeError:
        return None
    return lv if lv.engine is not None and lv.engine.api == "openai" else None


def refusal(state, path: str, headers: list[tuple[bytes, bytes]], client, body: bytes) -> Refusal | None:
    """The 429 `admit_or_refuse` would answer this request now, counted and logged, with the
    Retry-After the pacer gives `client` (the connection's address); None when it would not refuse
    (admitted, or not judged here: the handler answers). `headers`: the request's, names lower-case."""
    started = time.perf_counter()
    try:
        lv = _routed_engine(state.repository, body, headers)
        if lv is None:
            return None
        lv.engine.admit(started + state.settings.request_timeout_s)
        return None
    except QueueFull as exc:
        exc.retry_after_s = state.pacer.retry_after_s(client, exc.retry_after_s)
        answer_headers, payload, retry_after = _answer(path, headers, lv, exc, started)
        return Refusal(answer_headers, payload, float(retry_after))
    except Exception:               # noqa: BLE001 - Closed, a route that fails: the handler answers those
        return None


async def _refuse(scope, send, state, lv, exc: QueueFull, started: float) -> None:
    """The 429 the handler would answer (OpenAI's error object), counted, logged and paced."""
    headers, payload, retry_after = _answer(scope["path"], scope["headers"], lv, exc, started)
    await state.pacer.send_refusal(scope, send, (
        {"type": "http.response.start", "status": 429, "headers": headers},
        {"type": "http.response.body", "body": payload}), float(retry_after))


def _answer(path: str, request_headers, lv, exc: QueueFull, started: float) -> tuple[list, bytes, str]:
    """The handler's 429 for `exc` (OpenAI's error object), counted and logged: (headers, body,
    Retry-After)."""
    from serve.api.openai import _engine_error

    error = _engine_error(exc)
    rid = request_id(next((v for k, v in request_headers if k == b"x-request-id"), None))
    payload = orjson.dumps(error.response_body())
    retry_after = error.headers["Retry-After"]
    lv.engine.metrics.request_done(429, time.perf_counter() - started)
    log_refusal("POST", path, 429, error.message, lv.name, str(lv.version), rid)
    return [(b"content-type", b"application/json"), (b"retry-after", retry_after.encode()),
            (b"x-model-version", str(lv.version).encode()), (b"x-request-id", rid.encode()),
            (b"content-length", str(len(payload)).encode())], payload, retry_after


def _replay(body: bytes, receive) -> Callable:
    """A `receive` whose first message is the whole body already read; then the real channel (which
    says when the client disconnects)."""
    replayed = False

    async def replaying() -> dict:
        nonlocal replayed
        if not replayed:
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()
    return replaying
