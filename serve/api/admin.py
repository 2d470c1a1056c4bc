"""Admin routes for routing and rollouts: read and change a model's aliases, split, sticky key,
shadow and progressive rollout over HTTP.

Every write goes to the registry (the source of truth that every replica polls) through one of
`Registry`'s atomic verbs, checked against the revision the caller read (`If-Match: "n"`, the
ETag of any answer here), and is then applied to this server before the answer goes out: the
caller's next request already sees it; other replicas follow within about one poll interval.

The routes exist only on a server started with an admin token, and each one needs it (the one
rule of every admin route: `serve.api.deps.require_admin_token`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, Callable

import orjson
from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, ValidationError, model_validator
from pydantic.json_schema import SkipJsonSchema

from model_registry import ModelConfig, Registry
from model_registry.errors import Conflict, NotFound, RegistryError
from model_registry.routing import Rollout
from serve.api.deps import read_body, repository_of, require_admin_token, settings_of
from serve.errors import ServeError

log = logging.getLogger("zooserve.rollout")

MODEL = "/v2/repository/models/{model}"
# an ETag as this API writes it: the model.json revision in double quotes (digits capped so that
# int() of a hostile header stays cheap)
_REVISION_ETAG = re.compile(r'"([0-9]{1,18})"')


router = APIRouter(dependencies=[Depends(require_admin_token)], tags=["admin: routing and rollouts"])


# ---- request bodies -----------------------------------------------------------------------------
# Validated strictly: "3" is not a version and true is not a weight. Checks that need the
# registry (does the alias exist, do the weights sum to more than 0) are left to the registry, so
# that one message says it wherever the change comes from.

class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class SetAlias(_Body):
    version: int


class SetSplit(_Body):
    weights: dict[str, int]
    # absent: keep the sticky key; null: clear it (model_fields_set tells the two apart)
    sticky_key: str | None = None


class SetStickyKey(_Body):
    header: str | None      # required, null allowed: null turns pinning off


class SetShadow(_Body):
    alias: str
    percent: float


class StartRollout(Rollout):
    """The Rollout's own fields, plus why it was started (kept in its history)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    reason: str = ""
    status: SkipJsonSchema[None] = None     # written by the registry as the rollout runs, never by a caller

    @model_validator(mode="before")
    @classmethod
    def _no_status(cls, data: Any) -> Any:
        if isinstance(data, dict) and "status" in data:
            raise ValueError("'status' is written by the registry while the rollout runs; leave it out")
        return data

    def rollout(self) -> Rollout:
        return Rollout.model_validate(self.model_dump(exclude={"reason", "status"}))


class EndRollout(_Body):
    reason: str | None = None


class PromoteOrRollBack(_Body):
    reason: str | None = None
    canary: str | None = None    # default: the running rollout's canary, else the alias "canary"


def _body_schema(shape: type[BaseModel], required: bool = True) -> dict:
    """The OpenAPI request body of a route that reads its body by hand (for the limit and the messages)."""
    return {"requestBody": {"required": required,
                            "content": {"application/json": {"schema": shape.model_json_schema()}}}}


def _problems(exc: ValidationError) -> str:
    """'field 'weights.canary': Input should be a valid integer; ...' (a whole-body check has no field)."""
    def one(error: dict) -> str:
        field = ".".join(map(str, error["loc"]))
        return f"field {field!r}: {error['msg']}" if field else error["msg"]
    return "; ".join(one(e) for e in exc.errors())


async def _body(request: Request, shape: type[BaseModel], example: str, required: bool = True) -> Any:
    """The request body as `shape`, read under the server's body limit (413 beyond); 400 naming
    the field otherwise. An optional body may be empty."""
    raw = await read_body(request, settings_of(request).max_body_bytes)
    if not raw.strip():
        if required:
            raise ServeError(400, f"this route needs a JSON body like {example}")
        raw = b"{}"
    try:
        parsed = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ServeError(400, f"malformed JSON ({exc}); send a JSON object like {example}") from None
    if not isinstance(parsed, dict):
        raise ServeError(400, f"the body must be a JSON object like {example}, not {type(parsed).__name__}")
    try:
        return shape.model_validate(parsed)
    except ValidationError as exc:
        raise ServeError(400, f"{_problems(exc)}; send a JSON object like {example}") from None


# ---- revisions ----------------------------------------------------------------------------------

def _expected_revision(request: Request) -> int | None:
    """The revision a conditional write is based on (`If-Match: "n"`); None: unconditional (no
    If-Match, or `*`: any revision)."""
    value = request.headers.get("if-match")
    if value is None or value.strip() == "*":
        return None
    match = _REVISION_ETAG.fullmatch(value.strip())
    if match is None:
        raise ServeError(400, f"If-Match {value!r} is not a revision ETag: send the ETag of GET "
                              f"{MODEL}/routing or of the last write (like \"7\"), or leave If-Match out "
                              "for an unconditional write")
    return int(match[1])


def _routing_answer(cfg: ModelConfig) -> Response:
    """What every route answers: the routing and rollout as written, and their revision (also the ETag)."""
    payload = {"routing": cfg.routing.model_dump(mode="json"),
               "rollout": cfg.rollout.model_dump(mode="json") if cfg.rollout is not None else None,
               "revision": cfg.revision}
    return Response(orjson.dumps(payload), media_type="application/json", headers={"ETag": f'"{cfg.revision}"'})


# ---- registry calls -----------------------------------------------------------------------------

def _registry_failure(exc: RegistryError) -> ServeError:
    """A registry refusal as an HTTP error, with the registry's own message (it names the problem
    and what to do)."""
    if isinstance(exc, Conflict):
        return ServeError(409, str(exc))
    if isinstance(exc, NotFound):
        return ServeError(404, str(exc))
    return ServeError(400, str(exc))      # InvalidName and every other refusal of the change


async def _in_registry(call: Callable[[], ModelConfig]) -> ModelConfig:
    """Run one registry call in a worker thread (it locks and fsyncs files: blocking I/O)."""
    try:
        return await asyncio.to_thread(call)
    except RegistryError as exc:
        raise _registry_failure(exc) from None


async def _write(request: Request, model: str, change: Callable[[Registry, int | None], ModelConfig],
                 event: str | None = None) -> Response:
    """Apply `change(registry, expected_revision)` and put the result in force in this server; a
    rollout decision taken by hand (`event`) is logged and counted as the controller's are."""
    expected = _expected_revision(request)
    repository = repository_of(request)
    cfg = await _in_registry(lambda: change(repository.registry, expected))
    if event is not None:
        request.app.state.metrics.rollout_events.labels(model=model, event=event).inc()
        log.info("rollout of %s %s through the admin API: %s", model, event,
                 cfg.rollout.status.reason if cfg.rollout is not None and cfg.rollout.status is not None else "")
    served = settings_of(request).models
    if served is None or model in served:     # the models this server follows (as the registry watch)
        await repository.load_model(model)
    return _routing_answer(cfg)


# ---- routes -------------------------------------------------------------------------------------

@router.get(f"{MODEL}/routing", summary="A model's routing, rollout and revision (admin; the ETag is the revision)")
async def get_routing(request: Request, model: str) -> Response:
    registry = repository_of(request).registry
    return _routing_answer(await _in_registry(lambda: registry.model_config(model)))


@router.put(f"{MODEL}/aliases/{{alias}}", summary="Point an alias at a version (admin)",
            openapi_extra=_body_schema(SetAlias))
async def put_alias(request: Request, model: str, alias: str) -> Response:
    body = await _body(request, SetAlias, '{"version": 3}')
    return await _write(request, model,
                        lambda reg, rev: reg.set_alias(model, alias, body.version, expected_revision=rev))


@router.delete(f"{MODEL}/aliases/{{alias}}", summary="Drop an alias (admin)")
async def delete_alias(request: Request, model: str, alias: str) -> Response:
    return await _write(request, model, lambda reg, rev: reg.remove_alias(model, alias, expected_revision=rev))


@router.put(f"{MODEL}/split", summary="Set the traffic split over aliases (admin)",
            openapi_extra=_body_schema(SetSplit))
async def put_split(request: Request, model: str) -> Response:
    body = await _body(request, SetSplit, '{"weights": {"stable": 90, "canary": 10}, "sticky_key": "x-user"}')
    sticky_key = body.sticky_key if "sticky_key" in body.model_fields_set else ...
    return await _write(request, model,
                        lambda reg, rev: reg.set_split(model, body.weights, sticky_key, expected_revision=rev))


@router.put(f"{MODEL}/sticky-key", summary="Pin callers to one alias of the split by a header (admin)",
            openapi_extra=_body_schema(SetStickyKey))
async def put_sticky_key(request: Request, model: str) -> Response:
    body = await _body(request, SetStickyKey, '{"header": "x-user"} (null turns pinning off)')
    return await _write(request, model, lambda reg, rev: reg.set_sticky_key(model, body.header, expected_revision=rev))


@router.put(f"{MODEL}/shadow", summary="Copy a share of the requests to an alias (admin)",
            openapi_extra=_body_schema(SetShadow))
async def put_shadow(request: Request, model: str) -> Response:
    body = await _body(request, SetShadow, '{"alias": "canary", "percent": 10}')
    return await _write(request, model,
                        lambda reg, rev: reg.set_shadow(model, body.alias, body.percent, expected_revision=rev))


@router.delete(f"{MODEL}/shadow", summary="Turn the shadow off (admin)")
async def delete_shadow(request: Request, model: str) -> Response:
    return await _write(request, model, lambda reg, rev: reg.set_shadow(model, None, None, expected_revision=rev))


@router.post(f"{MODEL}/rollout", summary="Start a progressive rollout of a canary alias (admin)",
             openapi_extra=_body_schema(StartRollout))
async def start_rollout(request: Request, model: str) -> Response:
    body = await _body(request, StartRollout, '{"canary": "canary", "steps": [5, 25, 50, 100], "interval_s": 30}')
    rollout, reason = body.rollout(), body.reason or "started through the admin API"
    return await _write(request, model,
                        lambda reg, rev: reg.start_rollout(model, rollout, time.time(), reason, expected_revision=rev),
                        "started")


@router.post(f"{MODEL}/rollout/abort", summary="Stop the running rollout; everything back to stable (admin)",
             openapi_extra=_body_schema(EndRollout, required=False))
async def abort_rollout(request: Request, model: str) -> Response:
    body = await _body(request, EndRollout, '{"reason": "..."}', required=False)
    reason = body.reason or "aborted through the admin API"
    return await _write(request, model,
                        lambda reg, rev: reg.abort_rollout(model, reason, time.time(), expected_revision=rev),
                        "aborted")


async def _decide_by_hand(request: Request, model: str, verb: str, event: str) -> Response:
    """promote or rollback (`verb`, a Registry method of the same signature), taken through this API."""
    body = await _body(request, PromoteOrRollBack, '{"reason": "...", "canary": "canary"}', required=False)
    reason = body.reason or f"{event.replace('_', ' ')} through the admin API"
    return await _write(request, model, lambda reg, rev: getattr(reg, verb)(
        model, reason, time.time(), body.canary, expected_revision=rev), event)


@router.post(f"{MODEL}/promote", summary="Point stable at the canary's version and send it everything (admin)",
             openapi_extra=_body_schema(PromoteOrRollBack, required=False))
async def promote(request: Request, model: str) -> Response:
    return await _decide_by_hand(request, model, "promote", "promoted")


@router.post(f"{MODEL}/rollback", summary="Send everything to stable at once (admin)",
             openapi_extra=_body_schema(PromoteOrRollBack, required=False))
async def rollback(request: Request, model: str) -> Response:
    return await _decide_by_hand(request, model, "rollback", "rolled_back")
