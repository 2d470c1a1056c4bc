"""KServe v2 over gRPC: Triton's `inference.GRPCInferenceService` on its own port (`grpc_port`),
in the HTTP server's process and event loop, over the same repository, engines, routing, metrics
and errors as the HTTP v2 routes (serve/api/v2.py).

The service classes are the ones `tritonclient[grpc]` generates from Triton's proto, so the stock
client and this server read the same messages. Every HTTP status is answered with the gRPC code
that means the same (`STATUS_CODES`) and the HTTP error's message; what an HTTP answer says in
headers (x-model-version, x-model-alias, x-request-id, retry-after) travels as trailing metadata.
Inference runs through `serve.api.v2.infer_with`, the HTTP route's own path; a token model's
through /v1/completions' checks and its engine, with Triton's text tensors and decoupled streaming
(serve/api/grpc_tokens.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import grpc
from google.protobuf import json_format
from tritonclient.grpc import model_config_pb2 as mc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc.service_pb2_grpc import GRPCInferenceServiceServicer, add_GRPCInferenceServiceServicer_to_server

from serve import __version__
from serve.api import grpc_tokens, v2
from serve.api.deps import check_admin_token, refuse_over_limit, request_id, valid_model_name
from serve.api.grpc_codec import infer_response, parameter_value, request_body
from serve.errors import ServeError, log_refusal

log = logging.getLogger("zooserve")

# HTTP status of a ServeError -> gRPC code. 429 (queue full, expected wait too long) is UNAVAILABLE
# as in Triton, whose "Exceeds maximum queue size" is UNAVAILABLE over gRPC: the code clients' retry
# policies retry; the retry-after metadata says when. 409 (a load the registry's version refuses)
# is FAILED_PRECONDITION: loading again changes nothing until the version is fixed.
STATUS_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED,
                403: grpc.StatusCode.PERMISSION_DENIED, 404: grpc.StatusCode.NOT_FOUND,
                409: grpc.StatusCode.FAILED_PRECONDITION, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
                415: grpc.StatusCode.INVALID_ARGUMENT, 429: grpc.StatusCode.UNAVAILABLE,
                499: grpc.StatusCode.CANCELLED, 500: grpc.StatusCode.INTERNAL,
                503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED}
_SERVICE = "/inference.GRPCInferenceService/"
# HTTP answer headers that a gRPC answer carries in its own fields, not as metadata
_BODY_HEADERS = {"content-type", "inference-header-content-length"}


def grpc_code(status: int) -> grpc.StatusCode:
    return STATUS_CODES.get(status, grpc.StatusCode.INTERNAL if status >= 500 else grpc.StatusCode.INVALID_ARGUMENT)


def _ascii(text: str) -> str:
    """A metadata value as gRPC takes it (printable ASCII; a reason may quote a file's name or an
    exception's lines): other characters escaped, control characters as spaces."""
    text = text.encode("ascii", "backslashreplace").decode("ascii")
    return "".join(c if " " <= c <= "~" else " " for c in text)


def _metadata(context) -> dict[str, str]:
    """The call's invocation metadata as a dict (keys arrive lower-case; binary `-bin` keys skipped)."""
    return {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}


def _guarded(method):
    """An RPC whose unexpected failure is answered INTERNAL with its type and text and logged with its
    traceback, as the HTTP app answers 500 (grpc.aio's own answer would be UNKNOWN, "Unexpected ...")."""
    @functools.wraps(method)
    async def guarded(self, request, context):
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:        # noqa: BLE001 - the server answers and stays up
            log.exception("gRPC %s failed", method.__name__)
            await context.abort(grpc.StatusCode.INTERNAL, f"{method.__name__} failed: {type(exc).__name__}: {exc}")
    return guarded


class InferenceService(GRPCInferenceServiceServicer):
    """The v2 RPCs over the running app's state (repository, settings, shadow traffic, pacer).
    Methods this server does not offer (shared memory, trace and log settings) keep the generated
    base class's UNIMPLEMENTED answer."""

    def __init__(self, state):
        self.state = state

    # ---- errors --------------------------------------------------------------------------------

    async def _refuse(self, context, method: str, error: ServeError, rid: str, model: str | None = None,
                      version: str | None = None) -> None:
        """Answer `error` with its gRPC code and message, its headers as trailing metadata; log it as
        the HTTP layer logs a refusal; a 429's retry-after is the one the pacer gives this caller, and it
        is held when the caller did not wait its last one, as over HTTP (serve/api/pacing.py)."""
        log_refusal("GRPC", _SERVICE + method, error.status, error.message, model,
                    error.headers.get("x-model-version", version), rid)
        pacer, retry_after_s = self.state.pacer, 0
        if error.status == 429:           # the retry-after this caller is given
            retry_after_s = pacer.retry_after_s(context.peer(), float(error.headers.get("Retry-After", 1)))
            error.headers = {**error.headers, "Retry-After": str(retry_after_s)}
        trailing = [("x-request-id", rid), *((k.lower(), _ascii(v)) for k, v in error.headers.items())]
        if retry_after_s:
            hold = pacer.hold_s(context.peer())
            if hold > 0:
                await asyncio.sleep(hold)
            pacer.refused(context.peer(), retry_after_s)
        await context.abort(grpc_code(error.status), error.message, trailing_metadata=tuple(trailing))

    # ---- health and metadata -------------------------------------------------------------------

    @_guarded
    async def ServerLive(self, request, context):
        return pb.ServerLiveResponse(live=True)

    @_guarded
    async def ServerReady(self, request, context):
        """Triton's answer: ready false (not an error) when not ready; why, in the `reason` metadata."""
        try:
            v2.check_ready(self.state.repository, self.state.settings, self.state.draining)
        except ServeError as exc:
            context.set_trailing_metadata((("reason", _ascii(exc.message)),))
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=True)

    @_guarded
    async def ModelReady(self, request, context):
        """As Triton: ready false for a model or version that does not serve (unknown ones too, which
        Triton does not tell apart either); why, in the `reason` metadata."""
        try:
            self.state.repository.resolve(request.name, request.version or None)
        except ServeError as exc:
            context.set_trailing_metadata((("reason", _ascii(exc.message)),))
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=True)

    @_guarded
    async def ServerMetadata(self, request, context):
        return pb.ServerMetadataResponse(name="zooserve", version=__version__, extensions=v2.EXTENSIONS)

    async def _resolved(self, context, method: str, name: str, version: str):
        try:
            return self.state.repository.resolve(name, version or None)
        except ServeError as exc:
            await self._refuse(context, method, exc, request_id(_metadata(context).get("x-request-id")),
                               name, version or None)

    @_guarded
    async def ModelMetadata(self, request, context):
        lv = await self._resolved(context, "ModelMetadata", request.name, request.version)
        meta = v2.metadata_of(self.state.repository, lv, bool(request.version))
        if lv.engine.api == "openai":       # a token model: the text interface (serve/api/grpc_tokens.py)
            meta = grpc_tokens.metadata(meta)
        tensors = lambda specs: [pb.ModelMetadataResponse.TensorMetadata(  # noqa: E731
            name=s["name"], datatype=s["datatype"], shape=s["shape"]) for s in specs]
        return pb.ModelMetadataResponse(name=meta["name"], versions=meta["versions"], platform=meta["platform"],
                                        inputs=tensors(meta["inputs"]), outputs=tensors(meta["outputs"]))

    @_guarded
    async def ModelConfig(self, request, context):
        lv = await self._resolved(context, "ModelConfig", request.name, request.version)
        config = v2.config_of(self.state.repository, lv, self.state.settings)
        if lv.engine.api == "openai":
            config = grpc_tokens.config(config)
        # Triton's ModelParameter holds a string only (HTTP's JSON also writes the revision as an integer)
        config["parameters"] = {key: value if "string_value" in value else {"string_value": str(*value.values())}
                                for key, value in config["parameters"].items()}
        if "sequence_batching" in config:
            # one scheduler per model in Triton's proto (a oneof): a sequence model's batching of chunks
            # from different sequences is its sequence batcher's "oldest" strategy
            dynamic = config.pop("dynamic_batching")
            config["sequence_batching"]["oldest"] = {
                "max_candidate_sequences": config["max_batch_size"],
                "max_queue_delay_microseconds": dynamic["max_queue_delay_microseconds"]}
        return pb.ModelConfigResponse(config=json_format.ParseDict(config, mc.ModelConfig()))

    @_guarded
    async def ModelStatistics(self, request, context):
        repo = self.state.repository
        if request.name:
            lv = await self._resolved(context, "ModelStatistics", request.name, request.version)
            rows = v2.stats_rows(self.state.metrics, [lv])
        else:               # Triton: no name, every model
            loaded = [lv for table in repo.tables.values() for lv in table.values() if lv.engine]
            rows = v2.stats_rows(self.state.metrics, loaded)
        return pb.ModelStatisticsResponse(model_stats=[json_format.ParseDict(r, pb.ModelStatistics()) for r in rows])

    # ---- repository ----------------------------------------------------------------------------

    @_guarded
    async def RepositoryIndex(self, request, context):
        """Every model and the state of its versions; `ready` is accepted and every model listed, as
        over HTTP."""
        rid = request_id(_metadata(context).get("x-request-id"))
        if request.repository_name:
            await self._refuse(context, "RepositoryIndex", _one_repository(request.repository_name), rid)
        return pb.RepositoryIndexResponse(models=[pb.RepositoryIndexResponse.ModelIndex(**row)
                                                  for row in self.state.repository.index()])

    async def _admin(self, context, method: str, request) -> str:
        """The admin rules of HTTP's load/unload: the token (authorization metadata), the name, the
        parameters; the request id."""
        metadata = _metadata(context)
        rid = request_id(metadata.get("x-request-id"))
        try:
            check_admin_token(self.state.settings.admin_token, metadata.get("authorization"))
            valid_model_name(request.model_name)
            if request.repository_name:
                raise _one_repository(request.repository_name)
            v2.check_load_parameters({key: parameter_value(key, "parameter", value)
                                      for key, value in request.parameters.items()})
        except ServeError as exc:
            await self._refuse(context, method, exc, rid, request.model_name or None)
        return rid

    @_guarded
    async def RepositoryModelLoad(self, request, context):
        rid = await self._admin(context, "RepositoryModelLoad", request)
        await self._repository_action(context, "RepositoryModelLoad", "load", request.model_name, rid)
        return pb.RepositoryModelLoadResponse()

    @_guarded
    async def RepositoryModelUnload(self, request, context):
        rid = await self._admin(context, "RepositoryModelUnload", request)
        await self._repository_action(context, "RepositoryModelUnload", "unload", request.model_name, rid)
        return pb.RepositoryModelUnloadResponse()

    async def _repository_action(self, context, method: str, action: str, model: str, rid: str) -> None:
        try:
            await v2.repository_action(self.state, action, model)
        except ServeError as exc:
            await self._refuse(context, method, exc, rid, model)

    # ---- inference -----------------------------------------------------------------------------

    async def _infer(self, request, context, metadata: dict[str, str]) -> tuple[pb.ModelInferResponse, list]:
        """One ModelInferRequest through the HTTP route's path: (response, trailing metadata), or
        ServeError. The gRPC deadline bounds the request's queueing as its `timeout` would."""
        started = time.perf_counter()
        state = self.state
        remaining = context.time_remaining()
        deadline_us = remaining * 1e6 if remaining is not None else None

        async def body_of(limit: int) -> tuple[bytes, str]:
            body, header_length = request_body(request, deadline_us)
            # grpc refuses a message over max_receive_message_length (the same limit) before this
            # runs; the built body adds only the small header
            refuse_over_limit(len(body), limit)
            return body, header_length

        def answer(model, lv, alias, call, outputs) -> tuple[pb.ModelInferResponse, list]:
            payload, headers = call.response(model, str(lv.version), outputs)
            trailing = [("x-model-version", str(lv.version)), *((("x-model-alias", alias),) if alias else ()),
                        *((k.lower(), _ascii(v)) for k, v in headers.items() if k.lower() not in _BODY_HEADERS)]
            return infer_response(request.id, payload, headers), trailing

        # grpc.aio cancels this task when the client goes: no disconnect watch (receive None)
        return await v2.infer_with(state.repository, state.settings, state.shadow, request.model_name,
                                   request.model_version or None, started, body_of, None, None, None,
                                   metadata.get, answer)

    async def _complete(self, request, metadata: dict[str, str]) -> tuple[pb.ModelInferResponse, list]:
        """A token model's whole completion (serve/api/grpc_tokens.py), or ServeError."""
        call = grpc_tokens.TokenCall(self.state, request, metadata.get, streamed=False)
        return await call.complete(), call.trailing

    @_guarded
    async def ModelInfer(self, request, context):
        metadata = _metadata(context)
        rid = request_id(metadata.get("x-request-id"))
        try:
            if grpc_tokens.is_token_model(self.state.repository, request.model_name):
                response, trailing = await self._complete(request, metadata)
            else:
                response, trailing = await self._infer(request, context, metadata)
        except ServeError as exc:
            await self._refuse(context, "ModelInfer", exc, rid, request.model_name, request.model_version or None)
        context.set_trailing_metadata((("x-request-id", rid), *trailing))
        return response

    async def ModelStreamInfer(self, request_iterator, context):
        """Each request of the stream answered concurrently, its responses in the order they come
        (each carries its request's id); an error is that request's `error_message` and the stream
        goes on, as in Triton. A token model is decoupled: several responses per request, the last
        flagged `triton_final_response` (serve/api/grpc_tokens.py); every other model answers once,
        as ModelInfer does. A stream that ends (the client cancels it) aborts what it still runs."""
        metadata = _metadata(context)
        writing = asyncio.Lock()          # grpc.aio takes one write at a time
        running: set[asyncio.Task] = set()

        async def write(message) -> None:
            async with writing:
                await context.write(message)

        async def one(request) -> None:
            try:
                if grpc_tokens.is_token_model(self.state.repository, request.model_name):
                    call = grpc_tokens.TokenCall(self.state, request, metadata.get, streamed=True)
                    async for response in call.responses():
                        await write(pb.ModelStreamInferResponse(infer_response=response))
                    return
                response, _ = await self._infer(request, context, metadata)
                message = pb.ModelStreamInferResponse(infer_response=response)
            except Exception as exc:     # noqa: BLE001 - that request's error; the stream goes on
                if not isinstance(exc, ServeError):
                    log.exception("gRPC ModelStreamInfer failed for %s", request.model_name)
                    exc = ServeError(500, f"inference failed: {type(exc).__name__}: {exc}")
                log_refusal("GRPC", _SERVICE + "ModelStreamInfer", exc.status, exc.message, request.model_name,
                            exc.headers.get("x-model-version", request.model_version or None),
                            request_id(metadata.get("x-request-id")))
                # the id tells the client which request failed (answers come in the order they finish)
                message = pb.ModelStreamInferResponse(error_message=exc.message, infer_response=pb.ModelInferResponse(
                    model_name=request.model_name, model_version=request.model_version, id=request.id))
            await write(message)

        try:
            async for request in request_iterator:
                task = asyncio.create_task(one(request))
                running.add(task)
                task.add_done_callback(running.discard)
            if running:
                await asyncio.gather(*running)
        finally:            # the client went (the handler is cancelled): so is what it still waits for
            for task in running:
                task.cancel()


def _one_repository(name: str) -> ServeError:
    return ServeError(400, f"repository {name!r}: this server serves one registry; leave repository_name empty")


async def start(state, settings) -> grpc.aio.Server:
    """The gRPC server on `settings.host:grpc_port`, serving `state` (the app's), started."""
    options = [("grpc.max_receive_message_length", settings.max_body_bytes),
               ("grpc.max_send_message_length", -1),
               # one process per port, as uvicorn's: two servers must not share a port by accident;
               # the workers of one server do (the supervisor holds the port against others)
               ("grpc.so_reuseport", int(settings.workers > 1))]
    server = grpc.aio.server(options=options)
    add_GRPCInferenceServiceServicer_to_server(InferenceService(state), server)
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    address = f"{host}:{settings.grpc_port}"
    try:
        server.add_insecure_port(address)
    except RuntimeError as exc:
        raise RuntimeError(f"gRPC port {address} cannot be bound ({exc}): is another server on it? "
                           "Choose another with --grpc-port / ZOOSERVE_GRPC_PORT (0 = no gRPC)") from None
    await server.start()
    log.info("gRPC (KServe v2, inference.GRPCInferenceService) on %s", address)
    return server


async def stop(server: grpc.aio.Server, drain_timeout_s: float) -> None:
    """Refuse new calls at once, let the calls in flight finish for up to `drain_timeout_s`, then end them."""
    await server.stop(drain_timeout_s)
