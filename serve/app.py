"""The FastAPI application: lifespan loads the registry, routers serve it, errors are JSON."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import socket
from contextlib import asynccontextmanager

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_registry import Registry
from serve import __version__
from serve.api import admin, images, openai, ops, v2
from serve.errors import ServeError
from serve.metrics import Metrics
from serve.registry_watch import RegistryWatcher
from serve.rollout import InProcessSource, RolloutController
from serve.rollout import run as run_rollouts
from serve.shadow import ShadowTraffic
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
        app.state.shadow = ShadowTraffic(metrics, settings.shadow_max_in_flight)
        watcher = RegistryWatcher(repository, settings.watch_interval_s)
        app.state.watcher = watcher
        loading = asyncio.create_task(_load_then_watch(repository, watcher))
        loading.add_done_callback(_log_load_failure)
        stop_rollouts = asyncio.Event()
        rollouts = asyncio.create_task(_embedded_rollouts(settings, metrics, stop_rollouts)) \
            if settings.rollout_controller else None
        try:
            yield
        finally:
            app.state.draining = True
            if not loading.done():
                loading.cancel()
            if rollouts is not None:
                stop_rollouts.set()
                await rollouts
            await app.state.shadow.close()
            await repository.close()

    app = FastAPI(title="zooserve", version=__version__, lifespan=lifespan,
                  description="One server for every model family: KServe v2 and (for token models) OpenAI.",
                  **_NO_TELEMETRY)
    app.include_router(v2.router)
    app.include_router(admin.router)
    app.include_router(ops.router)
    app.include_router(openai.router)
    app.include_router(images.router)

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

    return InferFastPath(app)


class InferFastPath:
    """ASGI front: the two infer routes go straight to their handler; everything else to FastAPI.

    FastAPI's per-request machinery (route walk, dependency solving, five middlewares) cost more
    CPU than decoding the tensors and running the model (bench/classify.py, py-spy). The FastAPI
    declarations of the same handler stay in the app for the OpenAPI document."""

    def __init__(self, app: FastAPI):
        self.app = app
        self.state = app.state

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"].endswith("/infer"):
            match = v2.INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                await v2.fast_infer(scope, receive, send, self.state, match["model"], match["version"])
                return
        await self.app(scope, receive, send)


# FastAPI >= 0.165 wraps every request in native OpenTelemetry unless told not to.
_NO_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}
                 if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


async def _load_then_watch(repository: ModelRepository, watcher: RegistryWatcher) -> None:
    """Load every model, then move everything allocated so far out of the garbage collector's
    sight (imports leave ~200k tracked objects, and each full collection of them stalled the
    event loop for ~100 ms under load: bench/classify.py, p99), then follow the registry."""
    watcher.prime()        # before the load: a change made while loading is seen by the first poll
    await repository.load_all()
    gc.collect()
    gc.freeze()
    if watcher.interval_s > 0:
        await watcher.run()


async def _embedded_rollouts(settings: ServeSettings, metrics: Metrics, stop: asyncio.Event) -> None:
    """The rollout controller inside a lone server, judging on this server's own metrics; the
    registry's lease keeps it to one writer when several servers share the registry."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{settings.port}"
    controller = RolloutController(Registry(settings.registry), InProcessSource(metrics), owner,
                                   models=settings.models, events=metrics.rollout_events)
    await run_rollouts(controller, stop, settings.rollout_period_s)


def _log_load_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("start-up load failed: %s", task.exception())
