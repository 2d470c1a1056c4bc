"""The FastAPI application: lifespan loads the registry, routers serve it, errors are JSON and
logged once, every answer carries its x-request-id."""

from __future__ import annotations

import asyncio
import gc
import inspect
import logging
import os
import socket
import time
from contextlib import asynccontextmanager
from pathlib import Path

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from model_registry import Registry
from serve import __version__, logs
from serve.api import admin, images, openai, ops, token_admission, v2
from serve.api.deps import request_id
from serve.api.pacing import RefusalPacer, with_retry_after
from serve.errors import ServeError, error_body, log_refusal
from serve.metrics import Metrics
from serve.registry_watch import RegistryWatcher
from serve.judge import load_tests
from serve.rollout import InProcessSource, RolloutController
from serve.rollout import run as run_rollouts
from serve.shadow import ShadowTraffic
from serve.worker_control import WorkerControl
from serve.repository import ModelRepository, State
from serve.settings import ServeSettings

log = logging.getLogger("zooserve")


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(error_body(message), status_code=status, media_type="application/json", headers=headers)


def create_app(settings: ServeSettings | None = None, shared_folder: Path | None = None) -> FastAPI:
    """The server for `settings.registry`; models load in the background after start-up. A worker of
    several (`shared_folder`: where the workers' metrics meet, serve/workers.py) loads before it
    starts: it listens only once it can answer, while the other workers serve."""
    settings = settings or ServeSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        metrics = Metrics(shared_folder)
        repository = ModelRepository(Registry(settings.registry), settings, metrics)
        app.state.settings, app.state.metrics, app.state.repository = settings, metrics, repository
        app.state.draining = False
        app.state.worker_control = None       # a worker of several: serve/worker_control.py
        app.state.shadow = ShadowTraffic(metrics, settings.shadow_max_in_flight)
        app.state.pacer = RefusalPacer(settings.max_refusal_hold_s, settings.max_retry_after_s)
        watcher = RegistryWatcher(repository, settings.watch_interval_s)
        app.state.watcher = watcher
        loaded = asyncio.Event()
        loading = asyncio.create_task(_load_then_watch(repository, watcher, time.monotonic(),
                                                       settings.rollout_controller, loaded))
        loading.add_done_callback(_log_load_failure)
        publishing = None
        if metrics.shared is not None:
            metrics.shared.stats_source = lambda: [v2.stats_of(lv) for table in repository.tables.values()
                                                   for lv in table.values() if lv.engine is not None]
            waiting = asyncio.create_task(loaded.wait())
            await asyncio.wait([loading, waiting], return_when=asyncio.FIRST_COMPLETED)
            waiting.cancel()
            publishing = asyncio.create_task(_publish_metrics(metrics))
            # the loads and unloads asked of any worker so far, before this one listens
            app.state.worker_control = WorkerControl(shared_folder, repository)
            await app.state.worker_control.start()
        stop_rollouts = asyncio.Event()
        rollouts = asyncio.create_task(_embedded_rollouts(settings, metrics, stop_rollouts)) \
            if settings.rollout_controller else None
        grpc_server = None
        try:
            if settings.grpc_port:          # imported only when on: grpc and tritonclient load ~0.2 s
                from serve.api import grpc_v2
                grpc_server = await grpc_v2.start(app.state, settings)
            yield
        finally:
            app.state.draining = True
            if grpc_server is not None:     # calls in flight finish (as HTTP's did) before the engines close
                await grpc_v2.stop(grpc_server, settings.drain_timeout_s)
            if not loading.done():
                loading.cancel()
            if rollouts is not None:
                stop_rollouts.set()
                await rollouts
            await app.state.shadow.close()
            if app.state.worker_control is not None:
                await app.state.worker_control.stop()
            await repository.close()
            if publishing is not None:       # the last counts stay in the sum after this worker exits
                publishing.cancel()
                metrics.shared.publish()

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

    app.openapi = _openapi_with_loaded_models(app)
    return InferFastPath(app, settings.access_log)


def _openapi_with_loaded_models(app: FastAPI):
    """`app.openapi` that adds, to the document FastAPI builds once, the infer path of every model
    loaded now with its inputs (models load after start-up and come and go with the registry, so
    this part is made on each request for the document)."""
    def openapi() -> dict:
        document = FastAPI.openapi(app)
        repository = getattr(app.state, "repository", None)
        if repository is None:               # not started: no models yet
            return document
        return {**document, "paths": {**document["paths"], **v2.loaded_model_paths(repository)}}
    return openapi


class InferFastPath:
    """ASGI front: the two infer routes go straight to their handler; everything else to FastAPI,
    through the request-id layer (`_with_request_id`; the infer handler does the same by hand).

    FastAPI's per-request machinery (route walk, dependency solving, five middlewares) cost more
    CPU than decoding the tensors and running the model (bench/classify.py, py-spy). The FastAPI
    declarations of the same handler stay in the app for the OpenAPI document."""

    def __init__(self, app: FastAPI, access_log: bool = False):
        self.app = app
        self.state = app.state
        self.access_log = access_log

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":           # lifespan
            await self.app(scope, receive, send)
        elif self.access_log:
            await logs.access_logged(self._route, scope, receive, send)
        else:
            await self._route(scope, receive, send)

    async def _route(self, scope, receive, send) -> None:
        if scope["method"] == "POST" and scope["path"].endswith("/infer"):
            match = v2.INFER_PATH.fullmatch(scope["path"])
            if match is not None:
                await v2.fast_infer(scope, receive, send, self.state, match["model"], match["version"])
                return
        if scope["method"] == "POST" and scope["path"] in token_admission.GENERATE_PATHS:
            receive = await token_admission.admit_or_refuse(scope, receive, send, self.state)
            if receive is None:
                return                      # refused (429) here, or the client left
        await _with_request_id(self.app, scope, receive, send)


# the most of an error answer's body kept to find its message for the log
_REFUSAL_BODY_LIMIT = 65536
# a probe's 503 tells a state (loading, draining, a model down), it refuses no work: polled every
# few seconds, it would bury the refusals in the log
_PROBES = "/v2/health/"


async def _with_request_id(app, scope, receive, send) -> None:
    """Run a FastAPI request with its x-request-id (the client's when sane, else new) added to the
    answer, and log the answer once when it is a 4xx or 5xx: with its own message as the reason,
    the model and version the route named (or answered with), never the request's body. A layer
    here rather than in each handler: the /v1 routes answer their errors themselves."""
    given = next((value for name, value in scope["headers"] if name == b"x-request-id"), None)
    rid = request_id(given)
    refusal: dict | None = None           # the status, version and body of an error answer being sent
    retry_after_s = 0.0                   # a 429 for overload: its Retry-After, for the pacer (serve/api/pacing.py)
    pacer = app.state.pacer

    async def send_with_id(message) -> None:
        nonlocal refusal, retry_after_s
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), (b"x-request-id", rid.encode())]
            if message["status"] >= 400 and not scope["path"].startswith(_PROBES):
                refusal = {"status": message["status"], "body": b"",
                           "version": _header(message["headers"], b"x-model-version")}
            if message["status"] == 429:
                retry_after_s = pacer.retry_after_s(scope.get("client"),
                                                    float(_header(message["headers"], b"retry-after") or 1))
                message["headers"] = with_retry_after(message["headers"], retry_after_s)
                hold = pacer.hold_s(scope.get("client"))
                if hold > 0:              # a client that did not wait its last Retry-After
                    await asyncio.sleep(hold)
        elif message["type"] == "http.response.body" and refusal is not None:
            refusal["body"] = (refusal["body"] + message.get("body", b""))[:_REFUSAL_BODY_LIMIT]
            if not message.get("more_body", False):
                params = scope.get("path_params", {})
                log_refusal(scope["method"], scope["path"], refusal["status"], _error_message(refusal["body"]),
                            params.get("model"), refusal["version"] or params.get("version"), rid)
                refusal = None
        await send(message)
        if retry_after_s and message["type"] == "http.response.body" and not message.get("more_body", False):
            pacer.refused(scope.get("client"), retry_after_s)

    await app(scope, receive, send_with_id)


def _header(headers, name: bytes) -> str | None:
    return next((value.decode("latin-1") for key, value in headers if key.lower() == name), None)


def _error_message(body: bytes) -> str:
    """The message of an error answer: `{"error": "..."}`, or OpenAI's `{"error": {"message": ...}}`
    on /v1; an answer without one (a 499 to a client that left) says so."""
    try:
        error = orjson.loads(body).get("error") if body else None
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict):
        error = error.get("message")
    return error if isinstance(error, str) else "(the answer has no error message)"


# FastAPI >= 0.165 wraps every request in native OpenTelemetry unless told not to.
_NO_TELEMETRY = ({"telemetry": {"tracing": False, "metrics": False, "logs": False, "operation_spans": False}}
                 if "telemetry" in inspect.signature(FastAPI.__init__).parameters else {})


async def _load_then_watch(repository: ModelRepository, watcher: RegistryWatcher, started: float,
                           rollouts: bool, loaded: asyncio.Event) -> None:
    """Load every model (and say so), then move everything allocated so far out of the garbage
    collector's sight (imports leave ~200k tracked objects, and each full collection of them
    stalled the event loop for ~100 ms under load: bench/classify.py, p99), then follow the registry.
    With the rollout controller on, its statistics (scipy.stats, 1-2 s of import holding the GIL)
    are imported in a thread beside the load and before ready: after ready, the import stalled the
    first requests (and an admission estimate that learnt from them)."""
    watcher.prime()        # before the load: a change made while loading is seen by the first poll
    statistics = asyncio.create_task(asyncio.to_thread(load_tests)) if rollouts else None
    await repository.load_all(also=statistics)
    log.info("%s", _ready_line(repository, time.monotonic() - started))
    loaded.set()
    gc.collect()
    gc.freeze()
    if watcher.interval_s > 0:
        await watcher.run()


def _ready_line(repository: ModelRepository, seconds: float) -> str:
    """'ready: 13 models, 13 versions, in 5.6 s', and the models that have no READY version."""
    ready = [lv for table in repository.tables.values() for lv in table.values() if lv.state == State.READY]
    models, versions = len({lv.name for lv in ready}), len(ready)
    line = f"ready: {models} model{'s' * (models != 1)}, {versions} version{'s' * (versions != 1)}, in {seconds:.1f} s"
    unready = repository.unready_models()
    return line + (f"; not ready: {', '.join(sorted(unready))}" if unready else "")


async def _embedded_rollouts(settings: ServeSettings, metrics: Metrics, stop: asyncio.Event) -> None:
    """The rollout controller inside a lone server, judging on this server's own metrics; the
    registry's lease keeps it to one writer when several servers share the registry."""
    owner = f"{socket.gethostname()}:{os.getpid()}:{settings.port}"
    controller = RolloutController(Registry(settings.registry), InProcessSource(metrics), owner,
                                   models=settings.models, events=metrics.rollout_events)
    await run_rollouts(controller, stop, settings.rollout_period_s)


async def _publish_metrics(metrics: Metrics) -> None:
    """A worker of several: its counts to the shared folder every PUBLISH_EVERY_S (other workers'
    scrapes read them from there)."""
    from serve.worker_metrics import PUBLISH_EVERY_S

    while True:
        metrics.shared.publish()
        await asyncio.sleep(PUBLISH_EVERY_S)


def _log_load_failure(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("start-up load failed: %s", task.exception())
