"""What routes take from the app: the repository, the settings, the body (with its limit), auth,
the request id."""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import itertools
import os
import time
from typing import Any, Awaitable, Callable, TypeVar

from fastapi import Request
from starlette.requests import ClientDisconnect

from model_registry import InvalidName, validate_name
from serve.errors import ENGINE_REFUSALS, ServeError, engine_refusal
from serve.v2_codec import V2Error
from serve.repository import ModelRepository
from serve.settings import ServeSettings


def repository_of(request: Request) -> ModelRepository:
    return request.app.state.repository


def settings_of(request: Request) -> ServeSettings:
    return request.app.state.settings


def refuse_over_limit(size: int, limit: int, declared: bool = False) -> None:
    """The body limit, the one rule of every route: 413 once a body is known to exceed `limit`
    bytes, from its Content-Length (`declared`) or from what has arrived so far."""
    if size > limit:
        what = f"body of {size} bytes" if declared else "body"
        raise ServeError(413, f"{what} exceeds the {limit}-byte limit")


async def receive_body(receive, declared: bytes | str | None, limit: int) -> bytes | None:
    """The whole body straight from ASGI `receive` (the v2 fast path has no Request to read it
    from), under the body limit; None when the client disconnected first. `declared` is the
    Content-Length header."""
    if declared is not None and declared.isdigit():
        refuse_over_limit(int(declared), limit, declared=True)
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        refuse_over_limit(size, limit)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body of a FastAPI route's request, under the body limit."""
    body = await receive_body(request.receive, request.headers.get("content-length"), limit)
    if body is None:
        raise ClientDisconnect()
    return body


T = TypeVar("T")
log = logging.getLogger("zooserve.http")


class RequestOutcome:
    """How one model request ends, in one place (`with RequestOutcome(...) as outcome:`): a failure
    becomes a ServeError (a V2Error keeps its status, an engine's refusal is 429/504/503, anything
    else a logged 500), and the status (`outcome.status`, set by the route on success or 499) and
    the duration are recorded once. `answered_by()` gives (metrics, version) when the request ends:
    a v2 request can move to a sampler call or to the version its sequence started on."""

    def __init__(self, model: str, started: float, what: str, answered_by: Callable[[], tuple[Any, int]]):
        self.model, self.started, self.what, self.answered_by = model, started, what, answered_by
        self.status = 500

    def __enter__(self) -> "RequestOutcome":
        return self

    def __exit__(self, kind, exc, tb) -> bool:
        metrics, version = self.answered_by()
        try:
            if exc is None:
                return False
            named = {"x-model-version": str(version)}   # an error names the version that gave it, as an answer does
            if isinstance(exc, ServeError):
                self.status = exc.status
                exc.headers = {**named, **exc.headers}
                return False
            if isinstance(exc, V2Error):
                self.status = exc.status
                raise ServeError(exc.status, exc.message, named) from None
            if isinstance(exc, ENGINE_REFUSALS):
                error = engine_refusal(exc, self.model)
                self.status = error.status
                error.headers = {**named, **error.headers}
                raise error from None
            if isinstance(exc, Exception):          # the model failed on this request; the server stays up
                log.error("%s failed for %s/%s", self.what, self.model, version, exc_info=(kind, exc, tb))
                raise ServeError(500, f"{self.what} failed: {type(exc).__name__}: {exc}", named) from None
            return False                            # cancellation and the like: counted as 500, re-raised
        finally:
            metrics.request_done(self.status, time.perf_counter() - self.started)


async def until_disconnect(receive) -> None:
    """Returns once the client has gone (ASGI `http.disconnect`); only after the body was read."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(work: Awaitable[T], receive) -> T | None:
    """`work`'s result, or None when the client goes away first. Then `work` is cancelled, which
    makes an engine drop what it holds for the request (a denoise job's rows, a sequence's slot)
    instead of computing an answer nobody will read."""
    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(until_disconnect(receive))
    done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        watcher.cancel()
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)   # let the engine's cancel path run now
    return None


# ---- who may call the admin routes -------------------------------------------------------------

def bearer_credentials(header: str | None) -> str | None:
    """The token of `Authorization: Bearer <token>` (the scheme in any case, as RFC 9110 says), or
    None when the header is absent or malformed."""
    if header is None:
        return None
    scheme, _, credentials = header.strip().partition(" ")
    credentials = credentials.strip()
    if scheme.lower() != "bearer" or not credentials:
        return None
    return credentials


async def require_admin_token(request: Request) -> None:
    """The one rule of every admin route (repository load/unload, routing and rollouts). No token
    configured: the routes do not exist (404). No or malformed credentials: 401. A wrong token:
    403. The comparison takes the same time wherever the tokens differ."""
    check_admin_token(settings_of(request).admin_token, request.headers.get("authorization"))


def check_admin_token(token: str | None, authorization: str | None) -> None:
    """`require_admin_token` for any transport: the server's token and the caller's Authorization
    value (an HTTP header, gRPC metadata)."""
    if token is None:
        raise ServeError(404, "the admin API (repository load/unload, routing and rollouts) is off on this "
                              "server: start it with --admin-token <token> or ZOOSERVE_ADMIN_TOKEN=<token> "
                              "to turn it on")
    given = bearer_credentials(authorization)
    if given is None:
        raise ServeError(401, "the admin API needs the header 'Authorization: Bearer <admin token>'",
                         {"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), token.encode()):
        raise ServeError(403, "wrong admin token: send the token this server was started with "
                              "(--admin-token or ZOOSERVE_ADMIN_TOKEN)")


def valid_model_name(model: str) -> None:
    """A route's `{model}` as the registry would take it: an invalid name (`Bad Name!`, `..`) is a
    400 naming the rule, not a 404 (no such model could ever exist)."""
    try:
        validate_name(model)
    except InvalidName as exc:
        raise ServeError(400, str(exc)) from None


# ---- request ids --------------------------------------------------------------------------------

# what a client's x-request-id may be: visible ASCII, 1 to 128 characters (it goes into log lines
# and headers as it came)
_SANE_REQUEST_ID = re.compile(r"[\x21-\x7e]{1,128}")


def request_id(given: bytes | str | None) -> str:
    """The request id of an answer: the client's x-request-id when it is sane, else a new one
    (32 hex digits: this process's random prefix and a counter)."""
    if isinstance(given, bytes):
        given = given.decode("latin-1")
    if given is not None and _SANE_REQUEST_ID.fullmatch(given):
        return given
    return new_id()


def new_id() -> str:
    """A new id: 32 hex digits, this process's random prefix and a counter."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


# ids made here: unique within the process by the counter, across processes and restarts by the
# 64-bit random prefix. Not uuid4: its os.urandom call per answer was ~4 % of the event loop's
# samples under overload (py-spy, bench/overload.py); an id needs to be unique, not unguessable.
_ID_PREFIX = os.urandom(8).hex()
_ID_COUNTER = itertools.count(1)
