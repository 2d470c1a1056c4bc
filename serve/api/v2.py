"""KServe v2 / Open Inference Protocol routes, with the Triton extensions the stock
`tritonclient.http` uses (binary tensors, model configuration, statistics, repository).

The infer route is the hot path: the body is read once, decoded by hand (`serve.v2_codec`),
queued on the version's batcher and encoded once; no per-request pydantic model touches tensors.
"""

from __future__ import annotations

import re
import time
import zlib
from typing import Any, Callable, TypeVar

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from serve import __version__
from serve.api.deps import (RequestOutcome, read_body, receive_body, repository_of, request_id, require_admin_token,
                            settings_of, unless_disconnected, valid_model_name)
from serve.errors import ServeError, error_body, log_refusal, unavailable
from serve.repository import LoadedVersion, State
from serve.sample_request import DIFFUSION_PARAMETERS
from serve.shadow import ShadowTraffic, compare_tensors, parity_tolerance
from serve.v2_codec import unknown_keys


router = APIRouter()
T = TypeVar("T")

EXTENSIONS = ["binary_tensor_data", "model_repository", "model_configuration", "statistics", "parameters",
              "schedule_policy", "sequence", "sequence(string_id)"]
PLATFORMS = {"onnx": "onnxruntime_onnx", "torchscript": "pytorch_libtorch"}
# What an infer body may hold, for the OpenAPI document (decoding is by hand, not by this schema;
# serve/v2_codec.py and `check_request_parameters` refuse any other field or key with a 400 naming it)
_INPUT_PARAMETERS_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    "binary_data_size": {"type": "integer", "minimum": 0, "description": "bytes of this input in the binary section"}}}
_OUTPUT_PARAMETERS_SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    "binary_data": {"type": "boolean", "description": "send this output in the binary section"}}}
_PARAMETER_SCHEMAS = {
    "timeout": {"type": "number", "exclusiveMinimum": 0, "description": "deadline, microseconds"},
    "priority": {"type": "integer", "minimum": 0, "description": "accepted, as Triton does: one priority level"},
    "binary_data_output": {"type": "boolean", "description": "every output in the binary section"},
    "sequence_id": {"type": ["integer", "string"], "description": "sequence kind: the stateful sequence"},
    "sequence_start": {"type": "boolean"}, "sequence_end": {"type": "boolean"},
    "response_format": {"enum": ["tensor", "png"]}, "sampler": {"enum": ["ddpm", "ddim"]},
    "steps": {"type": "integer", "minimum": 1}, "eta": {"type": "number", "minimum": 0, "maximum": 1},
    "guidance": {"type": "number", "minimum": 0},
}
INFER_BODY_SCHEMA = {
    "requestBody": {"required": True, "content": {"application/json": {"schema": {
        "type": "object", "required": ["inputs"], "additionalProperties": False,
        "properties": {
            "id": {"type": "string"},
            "parameters": {"type": "object", "description": "the keys of the model's kind (see each model's route)",
                           "properties": _PARAMETER_SCHEMAS},
            "inputs": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name", "shape", "datatype"],
                       "additionalProperties": False,
                       "properties": {"name": {"type": "string"}, "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                                      "datatype": {"type": "string"}, "parameters": _INPUT_PARAMETERS_SCHEMA,
                                      "data": {"type": "array"}}}},
            "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                        "properties": {"name": {"type": "string"}, "parameters": _OUTPUT_PARAMETERS_SCHEMA}}},
        }}}}},
    "responses": {"200": {"description": "inference response (JSON, or JSON + binary tensors)"}},
}
# JSON data elements by v2 datatype, and the value an example fills a tensor with
_DATA_TYPES = {"BOOL": "boolean", "BYTES": "string", "FP16": "number", "FP32": "number", "FP64": "number"}
_EXAMPLE_VALUES = {"boolean": False, "string": "", "number": 0.0, "integer": 0}


def _input_schema(spec) -> dict:
    """One input of a signature as a schema: its name and datatype, its rank, its fixed dimensions
    (a -1 dimension takes any size)."""
    dims = [{"type": "integer", "enum": [d]} if d >= 0 else {"type": "integer", "minimum": 1} for d in spec.shape]
    return {"type": "object", "required": ["name", "shape", "datatype", "data"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "enum": [spec.name]},
                           "datatype": {"type": "string", "enum": [spec.datatype]},
                           "shape": {"type": "array", "prefixItems": dims, "items": False,
                                     "minItems": len(dims), "maxItems": len(dims)},
                           "data": {"type": "array", "items": {"type": _DATA_TYPES.get(spec.datatype, "integer")}},
                           "parameters": _INPUT_PARAMETERS_SCHEMA}}


def _example_input(spec) -> dict:
    """A request tensor that fits `spec`: one row (any -1 dimension 1), every value zero."""
    shape = [d if d >= 0 else 1 for d in spec.shape]
    size = 1
    for d in shape:
        size *= d
    value = _EXAMPLE_VALUES[_DATA_TYPES.get(spec.datatype, "integer")]
    return {"name": spec.name, "shape": shape, "datatype": spec.datatype, "data": [value] * size}


def model_infer_operation(name: str, signature, kind: str = "classify") -> dict:
    """`POST /v2/models/{name}/infer` of one loaded model for the OpenAPI document: the generic infer
    body narrowed to the model's inputs (names, datatypes and shapes as enums) and to the request
    parameters of its kind, with an example that it answers, so that client generators and fuzzers
    reach the model itself."""
    generic = INFER_BODY_SCHEMA["requestBody"]["content"]["application/json"]["schema"]
    inputs = [_input_schema(spec) for spec in signature.inputs]
    parameters = {key: _PARAMETER_SCHEMAS[key] for key in REQUEST_PARAMETERS + KIND_PARAMETERS.get(kind, ())}
    schema = {**generic, "properties": {
        **generic["properties"],
        "parameters": {"type": "object", "additionalProperties": False, "properties": parameters},
        "inputs": {"type": "array", "minItems": 1, "maxItems": len(inputs), "items": {"anyOf": inputs}},
        "outputs": {"type": "array", "items": {"type": "object", "required": ["name"], "additionalProperties": False,
                                               "properties": {
            "name": {"type": "string", "enum": [spec.name for spec in signature.outputs]},
            "parameters": _OUTPUT_PARAMETERS_SCHEMA}}},
    }}
    example = {"inputs": [_example_input(spec) for spec in signature.inputs]}
    return {"summary": f"Inference on {name} (default version)", "operationId": f"infer_model_{name}",
            "tags": ["models loaded now"],
            "requestBody": {"required": True, "content": {"application/json": {"schema": schema, "example": example}}},
            "responses": INFER_BODY_SCHEMA["responses"]}


def loaded_model_paths(repo) -> dict:
    """The infer path of every model that serves v2 now (its default version's signature)."""
    paths = {}
    for name in sorted(repo.tables):
        try:
            lv = repo.resolve(name, None)
        except ServeError:                   # no ready version: nothing to say about its inputs
            continue
        if lv.engine.api == "v2":
            manifest = lv.engine.manifest
            paths[f"/v2/models/{name}/infer"] = {"post": model_infer_operation(name, manifest.signature, manifest.kind)}
    return paths


def _json(payload: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, media_type="application/json", headers=headers)


# ---- health and server metadata -------------------------------------------------------------

@router.get("/v2/health/live", summary="Liveness")
async def live() -> Response:
    return _json({"live": True})


@router.get("/v2/health/ready", summary="Readiness: start-up load done, not draining, and (strict, the "
                                        "default) every served model has a READY version")
async def ready(request: Request) -> Response:
    check_ready(repository_of(request), settings_of(request), getattr(request.app.state, "draining", False))
    return _json({"ready": True})


def check_ready(repo, settings, draining: bool) -> None:
    """The server's readiness (HTTP and gRPC): a 503 saying why it is not ready, else nothing."""
    if draining:
        raise unavailable("server is shutting down")
    if not repo.loaded:
        raise unavailable("models are still loading")
    if settings.readiness == "strict":
        unready = repo.unready_models()       # the loaded tables only: cheap enough to poll under load
        if unready:
            raise unavailable(f"not ready: {'; '.join(unready.values())}. Fix or republish the version in the "
                              "registry (the server loads it within a poll), unload the model, or set "
                              "ZOOSERVE_READINESS=lenient to be ready while some models do not serve")


@router.get("/v2", summary="Server metadata")
async def server_metadata() -> Response:
    return _json({"name": "zooserve", "version": __version__, "extensions": EXTENSIONS})


# ---- per-model metadata, readiness, config, stats -------------------------------------------

def metadata_of(repo, lv: LoadedVersion, versioned: bool) -> dict:
    manifest = lv.engine.manifest
    ready = [str(v) for v, x in sorted(repo.tables[lv.name].items()) if x.state == State.READY]
    sig = manifest.signature
    return {
        "name": lv.name,
        "versions": [str(lv.version)] if versioned else ready,
        "platform": PLATFORMS[manifest.format],
        "inputs": [s.model_dump() for s in sig.inputs],
        "outputs": [s.model_dump() for s in sig.outputs],
        "parameters": {"family": manifest.family, "kind": manifest.kind, "labels": manifest.labels},
    }


@router.get("/v2/models/stats", summary="Statistics of every loaded version (Triton extension)")
async def all_stats(request: Request) -> Response:
    repo = repository_of(request)
    # declared before /v2/models/{model} so that "stats" is not taken for a model name
    loaded = [lv for t in repo.tables.values() for lv in t.values() if lv.engine is not None]
    return _json({"model_stats": stats_rows(request.app.state.metrics, loaded)})


@router.get("/v2/models/{model}", summary="Model metadata (default version)")
async def model_metadata(request: Request, model: str) -> Response:
    repo = repository_of(request)
    lv = repo.resolve(model, None)
    return _json(metadata_of(repo, lv, False), headers={"x-model-version": str(lv.version)})


@router.get("/v2/models/{model}/versions/{version}", summary="Model metadata (a version number or alias)")
async def version_metadata(request: Request, model: str, version: str) -> Response:
    repo = repository_of(request)
    lv = repo.resolve(model, version)
    return _json(metadata_of(repo, lv, True), headers={"x-model-version": str(lv.version)})


async def _model_ready(request: Request, model: str, version: str | None) -> Response:
    lv = repository_of(request).resolve(model, version)   # 404 unknown, 503 not ready
    return _json({"name": model, "version": str(lv.version), "ready": True})


@router.get("/v2/models/{model}/ready", summary="Model readiness")
async def model_ready(request: Request, model: str) -> Response:
    return await _model_ready(request, model, None)


@router.get("/v2/models/{model}/versions/{version}/ready", summary="Version readiness")
async def version_ready(request: Request, model: str, version: str) -> Response:
    return await _model_ready(request, model, version)


def config_of(repo, lv: LoadedVersion, settings) -> dict:
    """Triton's ModelConfig as protobuf-JSON (snake_case, integer dims without the batch dim)."""
    manifest, cfg = lv.engine.manifest, repo.configs[lv.name]
    instances = getattr(lv.engine, "instances", None)     # classify engines run several

    def tensor(s) -> dict:
        return {"name": s.name, "data_type": f"TYPE_{'STRING' if s.datatype == 'BYTES' else s.datatype}",
                "dims": s.shape[1:]}
    policy = cfg.version_policy
    version_policy = ({"latest": {"num_versions": policy.num_versions}} if policy.policy == "latest" else
                      {"all": {}} if policy.policy == "all" else {"specific": {"versions": policy.versions}})
    return {
        "name": lv.name,
        "platform": PLATFORMS[manifest.format],
        "backend": "onnxruntime" if manifest.format == "onnx" else "pytorch",
        "max_batch_size": cfg.batching.max_batch_size,
        "input": [tensor(s) for s in manifest.signature.inputs],
        "output": [tensor(s) for s in manifest.signature.outputs],
        "dynamic_batching": {"max_queue_delay_microseconds": int(cfg.batching.max_queue_delay_ms * 1000),
                             "default_queue_policy": {"max_queue_size": cfg.batching.max_queue_size}},
        "version_policy": version_policy,
        # a token model answers with one response per generated chunk over gRPC's ModelStreamInfer
        # (serve/api/grpc_tokens.py), as Triton's LLM backends do
        "model_transaction_policy": {"decoupled": manifest.kind == "tokens"},
        # where the runtime really runs (a CUDA provider that failed to load falls back to the CPU)
        "instance_group": [{"name": f"{lv.name}_0", "kind": "KIND_GPU" if lv.device == "cuda" else "KIND_CPU",
                            "count": instances.count if instances else 1,
                            **({"gpus": [0]} if lv.device == "cuda" else {})}],
        "parameters": {"routing": {"string_value": orjson.dumps(cfg.routing.model_dump()).decode()},
                       "revision": {"int64_param": cfg.revision},
                       # classify models: the threads inside each instance's run, and where the count came from
                       **({"intra_op_threads": {"int64_param": instances.intra_op_threads},
                           "instance_count_chosen_by": {"string_value": instances.chosen}} if instances else {}),
                       **({"prefill": {"string_value": lv.prefill}} if lv.prefill else {}),
                       # why model.json as it is on disk is not (wholly) in force
                       **({"routing_error": {"string_value": repo.config_errors[lv.name]}}
                          if lv.name in repo.config_errors else {})},
        **_sequence_batching(manifest, settings),
    }


def _sequence_batching(manifest, settings) -> dict:
    """Triton's sequence_batching block for a stateful (sequence-kind) model: the idle timeout and
    the implicit state the server keeps per sequence (input -> output, per-row dims). The control
    signals travel as request parameters (sequence_id/start/end), not as control tensors."""
    if manifest.state is None:
        return {}

    def state(spec_in, spec_out) -> dict:
        return {"input_name": spec_in.name, "output_name": spec_out.name, "data_type": f"TYPE_{spec_in.datatype}",
                "dims": spec_in.shape[1:]}
    return {"sequence_batching": {
        "max_sequence_idle_microseconds": int(settings.sequence_idle_timeout_s * 1e6),
        "control_input": [],
        "state": [state(i, o) for i, o in zip(manifest.state.inputs, manifest.state.outputs, strict=True)],
    }}


@router.get("/v2/models/{model}/config", summary="Model configuration (Triton extension)")
async def model_config(request: Request, model: str) -> Response:
    repo = repository_of(request)
    return _json(config_of(repo, repo.resolve(model, None), settings_of(request)))


@router.get("/v2/models/{model}/versions/{version}/config", summary="Version configuration (Triton extension)")
async def version_config(request: Request, model: str, version: str) -> Response:
    repo = repository_of(request)
    return _json(config_of(repo, repo.resolve(model, version), settings_of(request)))


def stats_of(lv: LoadedVersion) -> dict:
    s = lv.engine.stats()

    def d(count: int, ns: int) -> dict:
        return {"count": count, "ns": ns}
    return {
        "name": lv.name, "version": str(lv.version), "last_inference": s.last_inference_ms,
        "inference_count": s.inference_count, "execution_count": s.execution_count,
        "inference_stats": {"success": d(s.success_count, s.success_ns), "fail": d(s.fail_count, s.fail_ns),
                            "queue": d(s.queue_count, s.queue_ns), "compute_input": d(0, 0),
                            "compute_infer": d(s.compute_count, s.compute_ns), "compute_output": d(0, 0),
                            "cache_hit": d(0, 0), "cache_miss": d(0, 0)},
        "batch_stats": [{"batch_size": size, "compute_input": d(0, 0), "compute_infer": d(n, ns),
                         "compute_output": d(0, 0)} for size, (n, ns) in sorted(s.batch_stats.items())],
    }


def stats_rows(metrics, versions: list[LoadedVersion]) -> list[dict]:
    """The statistics of `versions`: this server's, or in a server of several workers every
    worker's summed (`metrics.shared`, serve/worker_metrics.py). HTTP and gRPC."""
    shared = metrics.shared
    if shared is None:
        return [stats_of(lv) for lv in versions]
    merged = {(row["name"], row["version"]): row for row in shared.stats()}
    return [merged.get((lv.name, str(lv.version))) or stats_of(lv) for lv in versions]


@router.get("/v2/models/{model}/stats", summary="Statistics of a model's default version")
async def model_stats(request: Request, model: str) -> Response:
    lv = repository_of(request).resolve(model, None)
    return _json({"model_stats": stats_rows(request.app.state.metrics, [lv])})


@router.get("/v2/models/{model}/versions/{version}/stats", summary="Statistics of one version")
async def version_stats(request: Request, model: str, version: str) -> Response:
    lv = repository_of(request).resolve(model, version)
    return _json({"model_stats": stats_rows(request.app.state.metrics, [lv])})


# ---- inference (the hot path) ---------------------------------------------------------------

def _decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    if not encoding or encoding == "identity":
        return body
    if encoding not in ("gzip", "deflate"):
        raise ServeError(415, f"Content-Encoding {encoding!r} is not supported; use gzip or deflate")
    inflater = zlib.decompressobj(wbits=31 if encoding == "gzip" else 15)
    try:
        out = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise ServeError(400, f"body is not valid {encoding}: {exc}") from exc
    if len(out) > limit:
        raise ServeError(413, f"decompressed body exceeds the {limit}-byte limit")
    return out


def _header_values(raw_headers: list[tuple[bytes, bytes]]) -> tuple[bytes | None, str | None, str | None, bytes | None]:
    """(content-length, content-encoding, inference-header-content-length, x-request-id) from
    ASGI headers (names arrive lower-cased), in one pass."""
    length = encoding = header_length = given_id = None
    for name, value in raw_headers:
        if name == b"content-length":
            length = value
        elif name == b"content-encoding":
            encoding = value.decode("latin-1")
        elif name == b"inference-header-content-length":
            header_length = value.decode("latin-1")
        elif name == b"x-request-id":
            given_id = value
    return length, encoding, header_length, given_id


# The request-level `parameters` a model reads, by kind; any other key is a 400 naming it (an
# ignored key is a silent surprise: `timeout_us` would run with the default deadline). Every kind
# takes Triton's `timeout` (µs), `priority` (accepted, as Triton does for a model without priority
# levels: one queue) and `binary_data_output`, the keys the stock tritonclient writes itself.
REQUEST_PARAMETERS = ("binary_data_output", "priority", "timeout")
KIND_PARAMETERS = {
    "classify": (),
    "sequence": ("sequence_id", "sequence_start", "sequence_end"),      # Triton's sequence batcher
    "sample": ("response_format",),                                     # serve/sample_request.py
    "denoise": ("response_format", *DIFFUSION_PARAMETERS),
}


def check_request_parameters(model: str, kind: str, parameters: dict) -> None:
    """400 naming any key of a request's `parameters` that a model of `kind` does not read, with
    the keys it does. A few lookups in a short tuple: cheap enough for the hot path."""
    known = REQUEST_PARAMETERS + KIND_PARAMETERS.get(kind, ())
    for key in parameters:
        if key not in known:
            raise ServeError(400, unknown_keys("", "parameters key", parameters, tuple(sorted(known)))
                             + f" (model {model!r} is of kind {kind})")
    priority = parameters.get("priority", 0)
    if type(priority) is not int or priority < 0:
        raise ServeError(400, f"parameter 'priority' must be a non-negative integer (Triton's; this server has one "
                              f"priority level), got {orjson.dumps(priority).decode()[:40]}")


def _timeout_s(parameters: dict, default_s: float) -> float:
    """The request's own deadline (`parameters.timeout`, in microseconds, Triton's unit) in
    seconds, else the server's. Anything but a positive number is a 400: a bool is not a number
    here (JSON true would otherwise be read as 1 µs and answered 504)."""
    if "timeout" not in parameters:
        return default_s
    timeout_us = parameters["timeout"]
    if type(timeout_us) not in (int, float):
        raise ServeError(400, f"parameter 'timeout' must be a number of microseconds, not "
                              f"{type(timeout_us).__name__} {orjson.dumps(timeout_us).decode()[:40]}")
    if not timeout_us > 0:
        raise ServeError(400, f"parameter 'timeout' must be positive (microseconds), got {timeout_us}")
    return timeout_us / 1e6


async def _infer(repo, settings, shadows: ShadowTraffic, model: str, version: str | None, started: float, body_of,
                 receive, encoding: str | None, header_length: str | None,
                 header: Callable[[str], str | None]) -> tuple[bytes, list[tuple[bytes, bytes]]] | None:
    """One v2 inference: (body, headers) of the 200 answer, ServeError otherwise, None when the
    client went away before its body arrived, or, for an engine whose requests run many steps
    (`cancellable`: the denoise engine), before its answer. `body_of(limit)` reads the request
    body; `receive` is the ASGI channel that says when the client has gone; `header(name)` reads a
    request header (the sticky routing key)."""
    return await infer_with(repo, settings, shadows, model, version, started, body_of, receive, encoding,
                            header_length, header, _http_answer)


def _http_answer(model: str, lv: LoadedVersion, alias: str | None, call, outputs: dict) -> tuple[bytes, list]:
    """The HTTP 200 answer of a finished call: its body and headers (x-model-version, x-model-alias)."""
    version_text = str(lv.version)
    payload, extra = call.response(model, version_text, outputs)
    headers = [(b"content-type", extra.pop("Content-Type").encode()), (b"x-model-version", version_text.encode())]
    if alias is not None:
        headers.append((b"x-model-alias", alias.encode()))
    headers.extend((k.lower().encode(), v.encode()) for k, v in extra.items())
    return payload, headers


async def infer_with(repo, settings, shadows: ShadowTraffic, model: str, version: str | None, started: float,
                     body_of, receive, encoding: str | None, header_length: str | None,
                     header: Callable[[str], str | None], answer: Callable[..., T]) -> T | None:
    """One v2 inference, whatever the transport: routing, admission, decoding (`engine.bind`),
    sequence pinning, the run, shadow copies and the request's metrics, then
    `answer(model, lv, alias, call, outputs)` makes the transport's answer (HTTP: `_http_answer`;
    gRPC: serve/api/grpc_v2.py). `body_of(limit)` gives the body, or (body, header length) where
    the transport builds a binary body itself (gRPC: serve/api/grpc_codec.py). `receive` None: the
    transport cancels the caller's task itself when its client goes (grpc.aio does), so a
    cancellable engine's work is simply awaited."""
    lv, alias = repo.route(model, version, header)
    with RequestOutcome(model, started, "inference", lambda: (lv.engine.metrics, lv.version)) as outcome:
        # shed before reading: a refusal under overload must cost less than the work it avoids;
        # the place admitted is held until `work` queues the request (no await in between)
        with lv.engine.admit(started + settings.request_timeout_s):
            body = await body_of(settings.max_body_bytes)
            if body is None:
                outcome.status = 499
                return None
            if type(body) is tuple:    # a transport that builds the body itself (gRPC) gives its header length
                body, header_length = body
            body = _decompress(body, encoding, settings.max_body_bytes)
            call = lv.engine.bind(body, header_length, settings, repo.configs[model].batching)
            if call.parameters:
                check_request_parameters(model, lv.engine.manifest.kind, call.parameters)
            pin = call.pinned_version()
            if pin is not None and pin[0] != lv.version:   # a live sequence's chunk: the version it started on
                lv, alias = repo.pinned(model, pin[0], version, pin[1]), None
                call = call.bound_to(lv.engine)
            work = call.run(started + _timeout_s(call.parameters, settings.request_timeout_s))
        # watching costs two tasks: only where requests run long
        if lv.engine.cancellable and receive is not None:
            outputs = await unless_disconnected(work, receive)
            if outputs is None:
                outcome.status = 499
                return None
        else:
            outputs = await work
        if call.shadowable:
            _shadow_copy(repo, shadows, settings, model, alias, lv, call, outputs)
        result = answer(model, lv, alias, call, outputs)
        outcome.status = 200
        return result


def _shadow_copy(repo, shadows: ShadowTraffic, settings, model: str, alias: str | None, lv: LoadedVersion,
                 call, outputs: dict) -> None:
    """Copy an answered request to the shadow version, when model.json's shadow samples it; the copy
    runs after this answer, on its own, and only its comparison with `outputs` is kept."""
    cfg = repo.configs[model]
    shadow = cfg.routing.shadow
    if shadow is None:
        return
    target = repo.serving(model, shadow.alias)
    if not shadows.wanted(model, shadow, alias, lv.version, target.version if target else None):
        return
    engine = target.engine
    if not shadows.admit(model, shadow.alias, int(engine.metrics.queue_depth.get()), cfg.batching.max_queue_size):
        return
    copy, kind, tolerance = call.bound_to(engine), engine.manifest.kind, parity_tolerance(engine.manifest)

    async def run() -> tuple[bool, float]:
        return compare_tensors(kind, outputs, await copy.run(time.perf_counter() + settings.request_timeout_s),
                               tolerance)
    shadows.start(model, shadow.alias, run)


def _scope_header(raw_headers: list[tuple[bytes, bytes]]) -> Callable[[str], str | None]:
    """A lookup of one request header by (lower-case) name in ASGI's raw headers."""
    def header(name: str) -> str | None:
        wanted = name.encode("latin-1")
        for key, value in raw_headers:
            if key == wanted:
                return value.decode("latin-1")
        return None
    return header


_NO_EXTENSIONS: dict = {}
# the scope extension of serve/api/http_protocol.py (not imported: that module imports this one)
ANSWER_EXTENSION = "zooserve.answer"
INFER_PATH = re.compile(r"/v2/models/(?P<model>[^/]+)(?:/versions/(?P<version>[^/]+))?/infer")


async def fast_infer(scope, receive, send, state, model: str, version: str | None) -> None:
    """The infer handler as a bare ASGI call (see serve.app.InferFastPath): headers read from the
    scope, body from `receive`, the answer written at once where the server offers it (else two ASGI
    messages); errors as JSON, and logged. Every answer carries its x-request-id (the client's, or a
    new one)."""
    started = time.perf_counter()
    length, encoding, header_length, given_id = _header_values(scope["headers"])
    retry_after_s = 0.0
    try:
        result = await _infer(state.repository, state.settings, state.shadow, model, version, started,
                              lambda limit: receive_body(receive, length, limit), receive, encoding, header_length,
                              _scope_header(scope["headers"]))
        if result is None:
            return                  # nobody to answer
        rid = request_id(given_id)
        status, (payload, headers) = 200, result
        headers.append((b"x-request-id", rid.encode()))
        headers.append((b"content-length", str(len(payload)).encode()))
    except ServeError as exc:
        rid = request_id(given_id)
        log_refusal("POST", scope["path"], exc.status, exc.message, model,
                    exc.headers.get("x-model-version", version), rid)
        status, (payload, headers) = exc.status, error_answer(exc, rid)
        if status == 429:           # shed for overload: paced when the client did not wait (pacing.py)
            retry_after_s = float(exc.headers.get("Retry-After", 1))
    await _send_answer(scope, send, state, status, headers, payload, retry_after_s)


def error_answer(exc: ServeError, rid: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The body and headers of the infer route's error answer (serve/api/early_refusal.py gives
    its 429s the same): the JSON error, the error's own headers (x-model-version, Retry-After),
    the request id and the length."""
    payload = error_body(exc.message)
    return payload, [(b"content-type", b"application/json"),
                     *((k.lower().encode(), v.encode()) for k, v in exc.headers.items()),
                     (b"x-request-id", rid.encode()), (b"content-length", str(len(payload)).encode())]


async def _send_answer(scope, send, state, status: int, headers, payload: bytes, retry_after_s: float) -> None:
    if retry_after_s:
        await state.pacer.send_refusal(scope, send, (
            {"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": payload}), retry_after_s)
        return
    # the server's one-write answer where it offers one (serve/api/http_protocol.py), else ASGI's two messages
    answer = scope.get("extensions", _NO_EXTENSIONS).get(ANSWER_EXTENSION)
    if answer is not None:
        await answer(send, status, headers, payload)
    else:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


async def _routed_infer(request: Request, model: str, version: str | None) -> Response:
    """The same handler behind FastAPI's router (the OpenAPI document declares these routes; the
    ASGI front answers them first)."""
    started = time.perf_counter()
    headers = request.headers
    result = await _infer(repository_of(request), settings_of(request), request.app.state.shadow, model, version, started,
                          lambda limit: receive_body(request.receive, headers.get("content-length"), limit),
                          request.receive, headers.get("content-encoding"),
                          headers.get("inference-header-content-length"), headers.get)
    if result is None:
        return Response(status_code=499)
    payload, raw_headers = result
    return Response(payload, headers={k.decode(): v.decode() for k, v in raw_headers})


@router.post("/v2/models/{model}/infer", summary="Inference on the default version (stable alias, else newest)",
             openapi_extra=INFER_BODY_SCHEMA)
async def infer(request: Request, model: str) -> Response:
    return await _routed_infer(request, model, None)


@router.post("/v2/models/{model}/versions/{version}/infer", summary="Inference on a version number or alias",
             openapi_extra=INFER_BODY_SCHEMA)
async def infer_version(request: Request, model: str, version: str) -> Response:
    return await _routed_infer(request, model, version)


# ---- repository (Triton extension) ----------------------------------------------------------

# Triton's optional index body; every model is listed whatever it says
INDEX_BODY_SCHEMA = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"ready": {"type": "boolean", "description": "accepted; every model is listed"}},
}}}}}
# load/unload take Triton's optional `{"parameters": {...}}`; config overrides and files are refused
# (publish to the registry instead)
LOAD_BODY_SCHEMA = {"requestBody": {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "properties": {"parameters": {
        "type": "object", "description": "e.g. unload_dependents; 'config' and 'file:...' are not supported",
        "propertyNames": {"not": {"anyOf": [{"const": "config"}, {"pattern": "^file:"}]}}}},
}}}}}
# every admin route: the token first (a caller without it learns nothing), then the name
ADMIN_MODEL_ROUTE = [Depends(require_admin_token), Depends(valid_model_name)]


@router.post("/v2/repository/index", summary="Every model of the registry and the state of its versions",
             openapi_extra=INDEX_BODY_SCHEMA)
async def repository_index(request: Request) -> Response:
    return _json(repository_of(request).index())


async def _load_body(request: Request) -> None:
    body = await read_body(request, settings_of(request).max_body_bytes)
    if not body.strip():
        return
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ServeError(400, f"malformed JSON: {exc}") from None
    params = parsed.get("parameters", {}) if isinstance(parsed, dict) else None
    if not isinstance(params, dict):
        raise ServeError(400, "body must be a JSON object with an optional 'parameters' object")
    check_load_parameters(params)


async def repository_action(state, action: str, model: str) -> None:
    """Load or unload `model` (HTTP and gRPC): in this process, or in a server of several workers in
    every worker (serve/worker_control.py); ServeError for a refusal."""
    control = getattr(state, "worker_control", None)
    if control is not None:
        await control.request(action, model)
        return
    repo = state.repository
    if action == "unload":
        await repo.unload_model(model)
        return
    refused = await repo.load_model(model)
    if refused:
        # 409, not 503: the server is not unavailable (what served keeps serving, so neither a load
        # balancer nor a retry loop may read this as an outage) and loading again changes nothing;
        # the registry's version conflicts with its own manifest or golden pair until it is fixed
        raise ServeError(409, repo.refusal_message(model, refused))


def check_load_parameters(params) -> None:
    """Load/unload take Triton's parameters except a config override and files (HTTP and gRPC)."""
    unsupported = [k for k in params if k == "config" or k.startswith("file:")]
    if unsupported:
        raise ServeError(400, f"parameters {unsupported} are not supported: publish to the registry and load")


@router.post("/v2/repository/models/{model}/load", summary="(Re)load a model from the registry (admin)",
             dependencies=ADMIN_MODEL_ROUTE, openapi_extra=LOAD_BODY_SCHEMA)
async def load(request: Request, model: str) -> Response:
    await _load_body(request)
    await repository_action(request.app.state, "load", model)
    return _json({})


@router.post("/v2/repository/models/{model}/unload", summary="Drain and unload a model (admin)",
             dependencies=ADMIN_MODEL_ROUTE, openapi_extra=LOAD_BODY_SCHEMA)
async def unload(request: Request, model: str) -> Response:
    await _load_body(request)
    await repository_action(request.app.state, "unload", model)
    return _json({})
