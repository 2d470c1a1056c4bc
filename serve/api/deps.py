"""What routes take from the app: the repository, the settings, the body (with its limit), auth."""

from __future__ import annotations

import asyncio
import hmac
from typing import Awaitable, TypeVar

from fastapi import Request

from serve.errors import ServeError
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
