"""What routes take from the app: the repository, the settings, the body (with its limit), auth."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from typing import Any, Awaitable, Callable, TypeVar

from fastapi import Request

from serve.errors import ENGINE_REFUSALS, ServeError, engine_refusal
from serve.v2_codec import V2Error
from serve.repository import ModelRepository
from serve.settings import ServeSettings


def repository_of(request: Request) -> ModelRepository:
    return request.app.state.repository


def settings_of(request: Request) -> ServeSettings:
    return request.app.state.settings


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refused with 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ServeError(413, f"body of {declared} bytes exceeds the {limit}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ServeError(413, f"body exceeds the {limit}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


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
        named = {"x-model-version": str(version)}   # an error names the version that gave it, as an answer does
        try:
            if exc is None or isinstance(exc, ServeError):
                self.status = exc.status if exc is not None else self.status
                if exc is not None:
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


def admin_only(request: Request) -> None:
    """Admin routes need `Authorization: Bearer <admin_token>`; with no token configured they are off."""
    token = settings_of(request).admin_token
    if token is None:
        raise ServeError(403, "repository control is off: start the server with an admin token "
                              "(ZOOSERVE_ADMIN_TOKEN or --admin-token)")
    given = request.headers.get("authorization", "")
    if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
        raise ServeError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})
