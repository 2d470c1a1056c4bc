"""The FastAPI application: lifespan loads the registry, routers serve it, errors are JSON."""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_registry import Registry
from serve import __version__
from serve.api import ops, v2
from serve.errors import ServeError
from serve.metrics import Metrics
from serve.repository import ModelRepository
from serve.settings import ServeSettings

log = logging.getLogger("zooserve")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json",
                    headers=headers)


def create_app(settings: ServeSettings | None = None) -> FastAPI:
    """The server for `settings.registry`; models load in the background after start-up."""
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        metrics = Metrics()
        repository = ModelRepository(Registry(settings.registry), settings, metrics)
        app.state.settings, app.state.metrics, app.state.repository = settings, metrics, repository
        app.state.draining = False
        loading = asyncio.create_task(repository.load_all())
        loading.add_done_callback(_log_load_failure)
        try:
            yield
        finally:
            app.state.draining = True
            if not loading.done():
                loading.cancel()
            await repository.close()

    app = FastAPI(title="zooserve", version=__version__, lifespan=lifespan,
                  description="One server for every model family: KServe v2 and (for token models) OpenAI.")
    app.include_router(v2.router)
    app.include_router(ops.router)

    @app.exception_handler(ServeError)
    async def serve_error(request: Request, exc: ServeError) -> Response:
        return _error(exc.status, exc.message, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        return _error(exc.status_code, detail, getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        return _error(400, "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()))

    return app


def _log_load_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("start-up load failed: %s", task.exception())
