"""`zooserve serve --frontend litserve`: the same registry, engines and routes behind LitServe
0.2.19's process layout (an HTTP API server process, a request queue, an inference worker process).

How it maps, and why so:
- LitServe runs each `LitAPI` in inference worker processes of its own, fed through a
  multiprocessing queue from its uvicorn API server process. Our engines are async and keep their
  batcher, routing, admission and metrics in the process that owns them. So the whole
  zooserve app lives in ONE inference worker (`ZooserveAPI`): `setup()` starts the app (its
  lifespan loads the registry, watches it, runs rollouts) on an event loop of our own there, and
  `predict()` runs each request through the app's own ASGI routes on that loop. The routes are
  the native ones (serve/api/v2.py's infer fast path, serve/api/openai.py, /metrics, ...), so the
  same body limit, checks, errors, routing, batching and metrics answer, byte for byte.
- One LitAPI, not one per engine kind: LitServe gives every LitAPI its own worker processes, so
  per-kind LitAPIs would split the registry across processes: two /metrics to merge, and a v2
  request for a token model (or a completion for a classifier) could not get the native answer
  (it names the model's kind) from a process that does not hold that model. The kinds are
  dispatched inside the worker by our own routes instead.
- LitServe's batching is off (`max_batch_size=1`, `enable_async=True`: its async loop hands each
  request to `predict` as it comes, concurrently); our batcher forms the batches from the requests
  in flight, as natively.
- `ZooserveSpec`, a LitSpec (LitServe's extension point for APIs with their own routes, as its
  OpenAISpec is), declares one route for every path LitServe does not answer itself (`/`,
  `/health`, `/info`). It ships the raw request (method, path, headers, body bytes) rather than
  LitServe's default `request.json()`: the v2 binary tensor extension and our strict decoding need
  the body as sent. It reads at most the body limit plus one byte; the worker's routes then refuse
  an oversized body exactly as natively. LitServe's own OpenAPI page is off, so /docs and
  /openapi.json are ours too.
- The LitAPI streams (`stream=True`): every answer travels as items (status, headers, body chunk,
  more), so `stream: true` completions arrive as server-sent events as they are generated. A
  non-streamed answer is one item.

What LitServe's layout cannot give (and the CLI refuses or says so): a host other than 0.0.0.0,
127.0.0.1 or ::, a port below 1024 (LitServe refuses them), gRPC (it would be served by the worker
outside LitServe's process layout). A client that disconnects is not seen by the worker (LitServe
does not pass it on): its generation runs to its end. A request's server-side timings (metrics,
deadlines) start when it reaches the worker, after LitServe's queue, whose own wait is bounded by
LitServe's timeout (504), set to the request timeout. One worker and one API server process, on the
CPU as far as LitServe knows: our engines place themselves (`--device`). A worker that dies stops
the server (exit 1), as LitServe does without `restart_workers`.

What it costs (bench/frontends.py): each request and each answer item (a stream closes with one
more) crosses a multiprocessing manager's queue, a few ms of CPU across LitServe's three processes
per request where the native front end spends well under one. LitServe's `fast_queue` (ZMQ) would
carry answers instead, but 0.2.19 never turns it on (its TransportConfig is built with a misspelt
field), so it is left alone.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import threading
import time
import uuid
from collections import deque

import litserve as ls
from fastapi import Request
from fastapi.responses import Response, StreamingResponse
from litserve.specs.base import LitSpec
from litserve.utils import LitAPIStatus, ResponseBufferItem
from starlette.requests import ClientDisconnect

from serve.errors import error_body
from serve.settings import ServeSettings

log = logging.getLogger("zooserve")

# LitServe's request queue key (and its worker's name); the routes are the spec's
API_PATH = "/zooserve"
# every method a route of ours answers; LitServe's own /, /health and /info are registered first
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# the hosts LitServe 0.2.19's `run` accepts, and its lowest port
HOSTS = ("0.0.0.0", "127.0.0.1", "::")
LOWEST_PORT = 1024


def refusal(settings: ServeSettings, flags: dict[str, str]) -> str | None:
    """Why LitServe cannot serve `settings` (an option it cannot honour), or None. `flags`:
    setting -> the flag that gave it, to name the flag or else its ZOOSERVE_* variable."""
    def given(name: str) -> str:
        value = getattr(settings, name)
        return f"{flags[name]} {value}" if name in flags else f"ZOOSERVE_{name.upper()}={value}"
    if settings.host not in HOSTS:
        return (f"{given('host')}: the LitServe front end binds only {', '.join(HOSTS)} (LitServe's rule); use one "
                "of them or --frontend native")
    if settings.port < LOWEST_PORT:
        return (f"{given('port')}: the LitServe front end takes a port from {LOWEST_PORT} to 65535 (LitServe's "
                "rule); use one or --frontend native")
    if settings.grpc_port:
        return (f"{given('grpc_port')}: gRPC is served beside the native HTTP front end only; drop it or use "
                "--frontend native")
    if settings.workers > 1:
        return (f"{given('workers')}: several server processes are the native front end's; LitServe runs one "
                "inference worker over the app. Drop it or use --frontend native")
    return None


# ---- the API server side (LitServe's uvicorn process) ------------------------------------------

class ZooserveSpec(LitSpec):
    """Every path LitServe does not answer itself goes, as it came, to the zooserve app in the
    inference worker; its answer comes back as it was sent."""

    def __init__(self, max_body_bytes: int):
        super().__init__()
        self.api_path = API_PATH
        self.max_body_bytes = max_body_bytes
        self.add_endpoint("/{path:path}", self.forward, METHODS)

    @property
    def stream(self) -> bool:
        return True

    def decode_request(self, request, context_kwargs=None):
        return request

    def encode_response(self, output, context_kwargs=None):
        return output

    async def forward(self, request: Request) -> Response:
        body = await self._body(request)
        if body is None:
            return Response(status_code=499)         # the client left before its body arrived
        scope = request.scope
        shipped = (scope["method"], scope["path"], scope.get("raw_path"), scope["query_string"], scope["headers"],
                   scope.get("client"), scope.get("server"), scope.get("scheme", "http"), scope.get("asgi"),
                   body)
        uid = uuid.uuid4().hex
        items, arrived = deque(), asyncio.Event()
        self.response_buffer[uid] = ResponseBufferItem(event=arrived, response_queue=items)
        try:
            self.request_queue.put((self.response_queue_id, uid, time.monotonic(), shipped))
            answer = self.data_streamer(items, arrived, send_status=True)
            first, status = await anext(answer, (None, LitAPIStatus.ERROR))
        except BaseException:
            self.response_buffer.pop(uid, None)
            raise
        if status == LitAPIStatus.ERROR:
            self.response_buffer.pop(uid, None)
            return _litserve_error(first)
        code, headers, chunk, more = first
        if not more:
            self.response_buffer.pop(uid, None)
            return _Answer(code, headers, chunk)
        return _streamed(code, headers, chunk, answer, lambda: self.response_buffer.pop(uid, None))

    async def _body(self, request: Request) -> bytes | None:
        """The body, or its first `max_body_bytes + 1` bytes: enough for the worker's route to
        refuse it as natively (a declared Content-Length over the limit is refused without reading)."""
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return b""
        chunks, size = [], 0
        try:
            async for chunk in request.stream():
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_body_bytes:
                    break
        except ClientDisconnect:
            return None
        return b"".join(chunks)


class _Answer(Response):
    """An answer as the worker's app sent it: its status, its raw headers (content-length
    included), its body."""

    def __init__(self, status: int, headers: list, body: bytes):
        self.status_code, self.raw_headers, self.body, self.background = status, list(headers), body, None


def _streamed(status: int, headers: list, first: bytes, rest, done) -> StreamingResponse:
    """A streamed answer (server-sent events): the first chunk, then the worker's next ones as they
    come; a failure in the middle ends the stream (the status has gone)."""
    async def chunks():
        try:
            if first:
                yield first
            async for item, status_ in rest:
                if status_ == LitAPIStatus.ERROR:
                    log.error("the LitServe inference worker failed in the middle of a streamed answer: %s",
                              _error_text(item))
                    return
                yield item[2]
        finally:
            done()
    response = StreamingResponse(chunks(), status_code=status)
    response.raw_headers = list(headers)
    return response


def _litserve_error(item) -> Response:
    """An error LitServe itself answered (its queue's timeout, a worker that died or failed), in
    our error shape."""
    status = getattr(item, "status_code", 500)
    if status == 504:
        message = "deadline exceeded: the request waited in LitServe's queue longer than its timeout"
    else:
        message = f"the LitServe inference worker failed: {_error_text(item)}"
    return Response(error_body(message), status_code=status, media_type="application/json")


def _error_text(item) -> str:
    if isinstance(item, bytes):   # LitServe pickles an exception that is not an HTTPException: never unpickled here
        return "it raised an error (its log has it)"
    if item is None:
        return "it died or gave no answer"
    return str(getattr(item, "detail", None) or item)


# ---- the inference worker side (LitServe's worker process) ---------------------------------------

_END = object()


class ZooserveAPI(ls.LitAPI):
    """The zooserve app in LitServe's inference worker: `setup` starts it, `predict` runs one HTTP
    request through its routes and yields the answer's items."""

    def __init__(self, settings: ServeSettings):
        super().__init__(max_batch_size=1, enable_async=True, spec=ZooserveSpec(settings.max_body_bytes))
        self.settings = settings
        self.app_loop: asyncio.AbstractEventLoop | None = None
        self.app = None

    def setup(self, device) -> None:
        """Start the app on a loop of its own (LitServe makes its loop after this returns, and our
        engines, created by the app's start-up, belong to the loop they start on). Models load in
        the background, as natively: /v2/health/ready says when they have."""
        from serve import logs
        from serve.app import create_app

        logs.configure(self.settings.log_level, self.settings.log_format)     # a fresh (spawned) process
        self.app_loop = _new_event_loop()
        threading.Thread(target=self.app_loop.run_forever, name="zooserve-app", daemon=True).start()
        self.app = create_app(self.settings)
        fastapi_app = self.app.app
        self._lifespan = fastapi_app.router.lifespan_context(fastapi_app)
        asyncio.run_coroutine_threadsafe(self._lifespan.__aenter__(), self.app_loop).result()

    async def decode_request(self, request, **kwargs):
        return request

    async def predict(self, shipped, **kwargs):
        """The answer's items, (status, headers, body, more) first, then (None, None, body, more),
        as the app sends them."""
        here = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        asyncio.run_coroutine_threadsafe(self._answer(shipped, lambda item: here.call_soon_threadsafe(
            inbox.put_nowait, item)), self.app_loop)
        while (item := await inbox.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def encode_response(self, output, **kwargs):
        async for item in output:
            yield item

    async def _answer(self, shipped, deliver) -> None:
        """Run one request through the app (on its loop); `deliver` each item of the answer."""
        method, path, raw_path, query, headers, client, server, scheme, asgi, body = shipped
        scope = {"type": "http", "asgi": asgi or {"version": "3.0"}, "http_version": "1.1", "method": method,
                 "scheme": scheme, "path": path, "raw_path": raw_path, "query_string": query, "root_path": "",
                 "headers": headers, "client": client, "server": server}
        unread = True

        async def receive():
            nonlocal unread
            if unread:
                unread = False
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Future()          # the client's disconnect never reaches the worker: wait until cancelled

        start = None

        async def send(message) -> None:
            nonlocal start
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                chunk, more = message.get("body", b""), message.get("more_body", False)
                if start is not None:
                    deliver((start["status"], start.get("headers", []), chunk, more))
                    start = None
                else:
                    deliver((None, None, chunk, more))
        try:
            await self.app(scope, receive, send)
            if start is not None:           # a start without a body message: an empty answer
                deliver((start["status"], start.get("headers", []), b"", False))
        except Exception as exc:            # noqa: BLE001 - answered by LitServe as the worker's failure
            deliver(exc)
        finally:
            deliver(_END)


def _new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop where installed, as uvicorn picks for the native front end."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


# ---- running it ----------------------------------------------------------------------------------

def serve(settings: ServeSettings) -> int:
    """Run LitServe over the registry until SIGTERM or Ctrl-C; 0 after a clean stop, 3 when the
    inference worker failed to start, 1 when it died (LitServe then stops everything)."""
    server = ls.LitServer(ZooserveAPI(settings), accelerator="cpu", devices=1, workers_per_device=1,
                          timeout=settings.request_timeout_s, disable_openapi_url=True)
    # LitServe drains its API server for this long on shutdown (uvicorn's graceful timeout), then
    # stops the worker
    server.uvicorn_graceful_timeout = int(settings.drain_timeout_s) or 1
    # LitServe stops cleanly on KeyboardInterrupt (Ctrl-C); SIGTERM, which it leaves to the default
    # (the main process dies, its children stay), takes the same path. Only here: the API server
    # process forked from this one re-raises SIGTERM under it after uvicorn's drain, where it must do nothing
    main_pid = os.getpid()
    signal.signal(signal.SIGTERM, lambda signum, frame: _interrupt(main_pid))
    try:
        server.run(host=settings.host, port=settings.port, num_api_servers=1, log_level=settings.log_level,
                   generate_client_file=False, api_server_worker_type="process", log_config=None, access_log=False)
    except KeyboardInterrupt:               # before LitServe's own handling started (still starting up)
        _stop_workers(server)
    except RuntimeError as exc:             # "One or more workers failed to start": the worker has logged why
        log.error("the LitServe front end did not start: %s", exc)
        _stop_workers(server)
        return 3
    except (EOFError, OSError) as exc:      # LitServe shut down from its monitor (its worker died) under our wait
        log.error("the LitServe front end stopped: its inference worker died (%s: %s)", type(exc).__name__, exc)
        _stop_workers(server)
        return 1
    return 0


def _interrupt(main_pid: int) -> None:
    if os.getpid() == main_pid:
        raise KeyboardInterrupt


def _stop_workers(server: ls.LitServer) -> None:
    """The inference workers of a LitServer that stopped before its own shutdown could run."""
    for worker in getattr(server, "inference_workers", []):
        worker.terminate()
        worker.join(5)
        if worker.is_alive():
            worker.kill()
