"""OpenAI-compatible routes for token models: /v1/models, /v1/models/{model}, /v1/completions,
/v1/chat/completions.

`model` is `name`, `name:version` or `name@alias`. Requests are strict, as OpenAI's are: an unknown
body field or query parameter is a 400 naming it, and a field of OpenAI's that this server does not
honour is a 400 saying so (serve/openai_protocol.py). Every prompt is checked against the
context before anything is queued, so a bad request gets a 400 (OpenAI's error object) and
never reaches the engine. `n` choices and list prompts become independent sequences in the
engine's continuous batch; `stream: true` answers with server-sent events ending in
`data: [DONE]`. A client that disconnects aborts its sequences (their slots free next step).
"""

from __future__ import annotations

import asyncio
import difflib
import functools
import math
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from serve.api.deps import new_id, read_body, repository_of, settings_of, unless_disconnected
from serve.batching import Closed, QueueFull
from serve.engines.tokens import GenerationRequest, TokenEngine, TokenEvent
from serve.errors import ServeError
from serve.openai_protocol import (UNSUPPORTED, ChatCompletionRequest, CompletionRequest, field_names,
                                   openapi_request_body)
from serve.repository import ModelRepository, State
from serve.sample_request import GENERATIVE_KINDS
from serve.scheduler import refuse_context
from serve.shadow import compare_tokens
from training.sampling import SamplingParams

router = APIRouter(prefix="/v1")

ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 413: "invalid_request_error",
               429: "rate_limit_error", 499: "client_closed_request", 503: "service_unavailable", 500: "server_error"}


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def response_body(self) -> dict:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.status}}

    def response(self) -> Response:
        return Response(orjson.dumps(self.response_body()), status_code=self.status, media_type="application/json",
                        headers=self.headers)


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


# ---- shared plumbing --------------------------------------------------------------------------

async def _parse(request: Request, model: type[BaseModel]):
    body = await read_body(request, settings_of(request).max_body_bytes)
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise OpenAIError(400, f"malformed JSON: {exc}") from None
    return validated(doc, model)


def validated(doc: Any, model: type[BaseModel]):
    """`doc` as the request envelope `model`, or the 400 that names what is wrong (also used by
    token models over gRPC, serve/api/grpc_tokens.py)."""
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise _invalid(exc, model) from None


# the error told first: an unknown field (a misspelt one also shows as a missing one), then a
# field we do not support, then the rest, deepest first (the branch of a union that got furthest)
_FIRST = {"extra_forbidden": 0, UNSUPPORTED: 1}


@functools.cache
def _known(envelope: type[BaseModel]) -> frozenset[str]:
    return frozenset(field_names(envelope))


def _invalid(exc: ValidationError, envelope: type[BaseModel]) -> OpenAIError:
    """One 400 for a body that does not validate, naming the field (`messages.0.content`: pydantic's
    union branch tags are left out of the name)."""
    known = _known(envelope)
    error = min(exc.errors(), key=lambda e: (_FIRST.get(e["type"], 2), -len(e["loc"])))
    loc, unknown = error["loc"], error["type"] == "extra_forbidden"      # the last of `loc` is the unknown field
    param = ".".join(str(p) for i, p in enumerate(loc)
                     if isinstance(p, int) or p in known or (unknown and i == len(loc) - 1))
    if error["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.75)
        hint = f" (did you mean {close[0]}?)" if close else ""
        return OpenAIError(400, f"Unrecognized request argument supplied: {param}{hint}", param)
    if error["type"] == UNSUPPORTED:
        return OpenAIError(400, f"Unsupported parameter: {param!r} is not supported: {error['msg']}", param)
    return OpenAIError(400, f"{param}: {error['msg']}" if param else error["msg"], param or None)


def _no_query(request: Request) -> None:
    """The OpenAI routes take no query parameters: one is a 400 naming it, never ignored."""
    for key, _ in request.query_params.multi_items():
        raise OpenAIError(400, f"Unrecognized request argument supplied: {key} (a query parameter; "
                               f"{request.method} {request.url.path} takes none)", key)


def _openai_models(repo: ModelRepository) -> list[tuple[str, list[tuple[int, Any]]]]:
    """(name, its READY versions) of every model the OpenAI routes serve now, by name."""
    served = []
    for name, table in sorted(repo.tables.items()):
        ready = [(v, lv) for v, lv in sorted(table.items()) if lv.state == State.READY and lv.engine.api == "openai"]
        if ready:
            served.append((name, ready))
    return served


def _unknown_model(repo: ModelRepository, model: str) -> OpenAIError:
    names = ", ".join(name for name, _ in _openai_models(repo)) or "none"
    return OpenAIError(404, f"The model {model!r} does not exist; the OpenAI routes serve: {names}", "model")


@dataclass(frozen=True, slots=True)
class Routed:
    """The token engine a request reaches, and what to tell the caller about it."""

    engine: TokenEngine
    version: int
    alias: str | None

    @property
    def model(self) -> str:
        """The model string of the answer: `name:version`, what produced it."""
        return f"{self.engine.name}:{self.version}"

    @property
    def headers(self) -> dict[str, str]:
        return {"x-model-version": str(self.version), **({"x-model-alias": self.alias} if self.alias else {})}


def _engine_for(request: Request, model: str, user: str | None = None) -> Routed:
    """Route `name` (split, sticky by header or `user`), `name:version` or `name@alias` to a token engine."""
    name, ref = _split_model(model)
    repo = repository_of(request)
    if name not in repo.tables:
        raise _unknown_model(repo, name)
    try:
        lv, alias = repo.route(name, ref, request.headers.get, user)
    except ServeError as exc:
        raise OpenAIError(exc.status, exc.message, "model") from None
    if lv.engine.api != "openai":
        kind = lv.engine.manifest.kind
        images = f" or GET /v1/images/{name}" if kind in GENERATIVE_KINDS else ""
        raise OpenAIError(400, f"model {name!r} is a {kind!r} model; the OpenAI API serves token models "
                               f"(use POST /v2/models/{name}/infer{images})", "model")
    return Routed(lv.engine, lv.version, alias)


def _split_model(model: str) -> tuple[str, str | None]:
    """`name`, `name:version`, `name@alias` -> (name, the version or alias or None)."""
    for separator in "@:":
        if separator in model:
            name, ref = model.split(separator, 1)
            return name, ref
    return model, None


def _check_combinations(body: CompletionRequest | ChatCompletionRequest) -> None:
    """Fields that mean something only with another one: refused alone, never ignored."""
    if body.stream_options is not None and not body.stream:
        raise OpenAIError(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                          "stream_options")
    if isinstance(body, ChatCompletionRequest):
        if body.top_logprobs is not None and not body.logprobs:
            raise OpenAIError(400, "top_logprobs: only allowed with logprobs: true", "top_logprobs")
        if None not in (body.max_tokens, body.max_completion_tokens) and body.max_tokens != body.max_completion_tokens:
            raise OpenAIError(400, f"max_tokens ({body.max_tokens}) and max_completion_tokens "
                                   f"({body.max_completion_tokens}) disagree: send one of them", "max_tokens")


def _check_prompt(engine: TokenEngine, ids: list[int], max_tokens: int | None, default_tokens: int | None) -> int:
    """The max_tokens this prompt gets, or a 400 naming what does not fit (the engine's own rule,
    asked here so that nothing that cannot run is queued)."""
    refusal = refuse_context(len(ids), 1 if max_tokens is None else max_tokens, engine.max_len)
    if refusal is not None:
        raise OpenAIError(400, refusal.message, refusal.param)
    if max_tokens is None:
        room = engine.max_len - len(ids)
        return min(room, default_tokens) if default_tokens else room
    return max_tokens


def _token_ids(engine: TokenEngine, ids: list[int]) -> list[int]:
    vocab = engine.tokenizer.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise OpenAIError(400, f"prompt token ids {bad[:5]} are outside the vocabulary 0..{vocab - 1}", "prompt")
    return list(ids)


def completion_jobs(engine: TokenEngine, body: CompletionRequest) -> tuple[list[list[int]], list[GenerationRequest]]:
    """(token ids of each prompt, one GenerationRequest per prompt x n) of a completion request, each
    prompt checked against the context first (HTTP's /v1/completions and gRPC's token models)."""
    prompts = [engine.tokenizer.encode(p) if isinstance(p, str) else _token_ids(engine, p) for p in body.prompt]
    max_tokens = [_check_prompt(engine, ids, body.max_tokens, None) for ids in prompts]
    jobs = [GenerationRequest(ids, mt, _sampling(body, i, body.logprobs), body.stop, body.ignore_eos)
            for ids, mt in zip(prompts, max_tokens) for i in range(body.n)]
    return prompts, jobs


def _sampling(body, seed_offset: int, logprobs: int | None) -> SamplingParams:
    seed = None if body.seed is None else body.seed + seed_offset
    return SamplingParams(temperature=body.temperature, top_k=body.top_k, top_p=body.top_p, seed=seed,
                          logprobs=logprobs)


@dataclass
class Choice:
    """What one sequence produced, accumulated from its events."""

    index: int
    text: str = ""
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    tops: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None

    def add(self, event: TokenEvent) -> None:
        self.text += event.text
        if event.token is not None:
            self.tokens.append(event.token)
            self.logprobs.append(event.logprob)
            self.tops.append(event.top)
        if event.finish_reason is not None:
            self.finish_reason = event.finish_reason


async def _fan_out(engine: TokenEngine, jobs: list[GenerationRequest]) -> AsyncIterator[tuple[int, list[TokenEvent]]]:
    """Run every job in the engine at once; yields (job index, events) as they come."""
    if len(jobs) == 1:                 # the common case: no pump task and queue hop per token
        try:
            async for events in engine.generate(jobs[0]):
                yield 0, events
        except OpenAIError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to an OpenAI error
            raise _engine_error(exc) from None
        return
    inbox: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, job: GenerationRequest) -> None:
        try:
            async for events in engine.generate(job):
                await inbox.put((index, events))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            await inbox.put((index, exc))
            return
        await inbox.put((index, None))

    tasks = [asyncio.ensure_future(pump(i, job)) for i, job in enumerate(jobs)]
    remaining = len(tasks)
    try:
        while remaining:
            index, item = await inbox.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise _engine_error(item)
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()                # a consumer that left aborts its sequences


def _engine_error(exc: BaseException) -> OpenAIError:
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, QueueFull):
        # the same answer as the v2 routes' (serve.errors.engine_refusal): whole seconds, at least 1
        return OpenAIError(429, "every sequence slot is busy and the waiting queue is full; retry later",
                           headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
    if isinstance(exc, Closed):
        return OpenAIError(503, str(exc))
    if isinstance(exc, ValueError):
        return OpenAIError(400, str(exc))
    return OpenAIError(500, f"generation failed: {exc}")


async def _collect(request: Request, engine: TokenEngine, jobs: list[GenerationRequest]) -> list[Choice] | None:
    """Run jobs to the end; None when the client disconnected first (everything aborted)."""
    choices = [Choice(i) for i in range(len(jobs))]

    async def run() -> list[Choice]:
        async for index, events in _fan_out(engine, jobs):
            for event in events:
                choices[index].add(event)
        return choices

    return await unless_disconnected(run(), request.receive)


def _usage(prompt_tokens: int, choices_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": choices_tokens,
            "total_tokens": prompt_tokens + choices_tokens}


def _shadow_tokens(request: Request, routed: Routed, jobs: list[GenerationRequest], produced: list[list[int]]) -> None:
    shadow_tokens(repository_of(request), request.app.state.shadow, routed, jobs, produced)


def shadow_tokens(repo: ModelRepository, shadows, routed: Routed, jobs: list[GenerationRequest],
                  produced: list[list[int]]) -> None:
    """Copy an answered completion to the shadow version when model.json's shadow samples it; only
    greedy or seeded requests (an unseeded sample has nothing to agree with). Only the token
    agreement is kept."""
    name = routed.engine.name
    shadow = repo.configs[name].routing.shadow
    if shadow is None or not all(j.params.temperature == 0 or j.params.seed is not None for j in jobs):
        return
    target = repo.serving(name, shadow.alias)
    if not shadows.wanted(name, shadow, routed.alias, routed.version, target.version if target else None):
        return
    engine = target.engine
    if not shadows.admit(name, shadow.alias, int(engine.metrics.waiting.get()), engine.max_waiting):
        return

    async def run() -> tuple[bool, float]:
        tokens: list[list[int]] = [[] for _ in jobs]
        async for index, events in _fan_out(engine, jobs):
            tokens[index].extend(e.token for e in events if e.token is not None)
        return compare_tokens(produced, tokens)
    shadows.start(name, shadow.alias, run)


async def _guarded(request: Request, handler) -> Response:
    """Errors of /v1 routes in OpenAI's error shape (a query parameter is one: they take none)."""
    try:
        _no_query(request)
        return await handler()
    except OpenAIError as exc:
        return exc.response()
    except ServeError as exc:
        return OpenAIError(exc.status, exc.message, headers=exc.headers).response()


# ---- routes -----------------------------------------------------------------------------------

def _model_objects(repo: ModelRepository) -> list[dict]:
    """OpenAI Model objects: each served token model as `name`, and each of its ready versions."""
    data = []
    created = int(time.time())
    for name, ready in _openai_models(repo):
        data.append({"id": name, "object": "model", "created": created, "owned_by": "zooserve",
                     "max_model_len": ready[-1][1].engine.max_len})
        data += [{"id": f"{name}:{v}", "object": "model", "created": created, "owned_by": "zooserve",
                  "parent": name, "max_model_len": lv.engine.max_len} for v, lv in ready]
    return data


def _json(payload: Any) -> Response:
    return Response(orjson.dumps(payload), media_type="application/json")


@router.get("/models", summary="Token models, as `name` and `name:version`")
async def list_models(request: Request) -> Response:
    async def handle() -> Response:
        return _json({"object": "list", "data": _model_objects(repository_of(request))})
    return await _guarded(request, handle)


@router.get("/models/{model}", summary="One token model (`name`, `name:version` or `name@alias`), as an "
                                       "OpenAI Model object; 404 for one the OpenAI routes do not serve")
async def retrieve_model(request: Request, model: str) -> Response:
    async def handle() -> Response:
        repo = repository_of(request)
        listed = next((m for m in _model_objects(repo) if m["id"] == model), None)
        if listed is not None:
            return _json(listed)
        name, ref = _split_model(model)
        if ref and "@" in model and name in dict(_openai_models(repo)):
            try:
                lv = repo.resolve(name, ref)
            except ServeError:
                lv = None
            if lv is not None and lv.engine.api == "openai":
                return _json({"id": model, "object": "model", "created": int(time.time()), "owned_by": "zooserve",
                              "parent": name, "max_model_len": lv.engine.max_len})
        raise _unknown_model(repo, model)
    return await _guarded(request, handle)


@router.post("/completions", summary="Text completion (OpenAI-compatible; `stream: true` for SSE)",
             openapi_extra=openapi_request_body(CompletionRequest))
async def completions(request: Request) -> Response:
    async def handle() -> Response:
        body: CompletionRequest = await _parse(request, CompletionRequest)
        _check_combinations(body)
        routed = _engine_for(request, body.model, body.user)
        engine = routed.engine
        prompts, jobs = completion_jobs(engine, body)
        meta = {"id": f"cmpl-{new_id()}", "object": "text_completion", "created": int(time.time()),
                "model": routed.model}
        headers = routed.headers
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            done = functools.partial(_shadow_tokens, request, routed, jobs)
            return StreamingResponse(_stream_completions(engine, jobs, meta, body.logprobs is not None,
                                                         include_usage, prompt_tokens, done),
                                     media_type="text/event-stream", headers=headers)
        choices = await _collect(request, engine, jobs)
        if choices is None:
            return Response(status_code=499)
        _shadow_tokens(request, routed, jobs, [c.tokens for c in choices])
        out = [{"index": c.index, "text": c.text, "finish_reason": c.finish_reason,
                "logprobs": _completion_logprobs(engine, c) if body.logprobs is not None else None} for c in choices]
        payload = {**meta, "choices": out, "usage": _usage(prompt_tokens, sum(len(c.tokens) for c in choices))}
        return Response(orjson.dumps(payload), media_type="application/json", headers=headers)
    return await _guarded(request, handle)


@router.post("/chat/completions", summary="Chat completion (OpenAI-compatible; `stream: true` for SSE)",
             openapi_extra=openapi_request_body(ChatCompletionRequest))
async def chat_completions(request: Request) -> Response:
    async def handle() -> Response:
        body: ChatCompletionRequest = await _parse(request, ChatCompletionRequest)
        _check_combinations(body)
        routed = _engine_for(request, body.model, body.user)
        engine = routed.engine
        try:
            text = engine.tokenizer.render_chat([{"role": m.template_role, "content": m.text()}
                                                for m in body.messages])
        except ValueError as exc:
            raise OpenAIError(400, str(exc), "messages") from None
        ids = engine.tokenizer.encode(text)
        max_tokens = _check_prompt(engine, ids, body.max_completion_tokens or body.max_tokens, None)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        jobs = [GenerationRequest(ids, max_tokens, _sampling(body, i, logprobs), body.stop, body.ignore_eos)
                for i in range(body.n)]
        meta = {"id": f"chatcmpl-{new_id()}", "created": int(time.time()), "model": routed.model}
        headers = routed.headers
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            done = functools.partial(_shadow_tokens, request, routed, jobs)
            return StreamingResponse(_stream_chat(engine, jobs, meta, body.logprobs, include_usage, len(ids), done),
                                     media_type="text/event-stream", headers=headers)
        choices = await _collect(request, engine, jobs)
        if choices is None:
            return Response(status_code=499)
        _shadow_tokens(request, routed, jobs, [c.tokens for c in choices])
        out = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": {"content": _chat_logprobs(engine, c)} if body.logprobs else None} for c in choices]
        payload = {**meta, "object": "chat.completion", "choices": out,
                   "usage": _usage(len(ids), sum(len(c.tokens) for c in choices))}
        return Response(orjson.dumps(payload), media_type="application/json", headers=headers)
    return await _guarded(request, handle)


# ---- streaming --------------------------------------------------------------------------------

async def _stream(engine, jobs, base: dict, include_usage: bool, prompt_tokens: int,
                  to_choice, preamble: list[dict], done: Callable[[list[list[int]]], None]) -> AsyncIterator[bytes]:
    """SSE chunks: `preamble`, one chunk per event (`to_choice(index, event)`), usage, [DONE];
    `done(tokens of each choice)` once every choice has finished."""
    for payload in preamble:
        yield _sse(payload)
    generated = 0
    tokens: list[list[int]] = [[] for _ in jobs]
    try:
        async for index, events in _fan_out(engine, jobs):
            for event in events:
                if event.token is not None:
                    generated += 1
                    tokens[index].append(event.token)
                yield _sse({**base, "choices": [to_choice(index, event)]})
        done(tokens)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, generated)})
    except OpenAIError as exc:
        yield _sse({"error": {"message": exc.message, "type": ERROR_TYPES.get(exc.status), "code": exc.status}})
    yield b"data: [DONE]\n\n"


def _stream_completions(engine, jobs, meta, with_logprobs, include_usage, prompt_tokens, done) -> AsyncIterator[bytes]:
    def to_choice(index: int, event: TokenEvent) -> dict:
        lp = _completion_logprobs(engine, _one(index, event)) if with_logprobs else None
        return {"index": index, "text": event.text, "logprobs": lp, "finish_reason": event.finish_reason}
    return _stream(engine, jobs, meta, include_usage, prompt_tokens, to_choice, [], done)


def _stream_chat(engine, jobs, meta, with_logprobs, include_usage, prompt_tokens, done) -> AsyncIterator[bytes]:
    base = {**meta, "object": "chat.completion.chunk"}
    roles = [{**base, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                   "finish_reason": None}]} for i in range(len(jobs))]   # the role comes first

    def to_choice(index: int, event: TokenEvent) -> dict:
        lp = {"content": _chat_logprobs(engine, _one(index, event))} if with_logprobs else None
        delta = {"content": event.text} if event.text or event.finish_reason is None else {}
        return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": event.finish_reason}
    return _stream(engine, jobs, base, include_usage, prompt_tokens, to_choice, roles, done)


def _one(index: int, event: TokenEvent) -> Choice:
    choice = Choice(index)
    choice.add(event)
    return choice


# ---- logprobs in OpenAI's two shapes ------------------------------------------------------------

def _token_text(engine: TokenEngine, token: int) -> str:
    return engine.tokenizer.decode([token])


def _completion_logprobs(engine: TokenEngine, c: Choice) -> dict:
    offsets, at = [], 0
    texts = [_token_text(engine, t) for t in c.tokens]
    for t in texts:
        offsets.append(at)
        at += len(t)
    return {"tokens": texts, "token_logprobs": c.logprobs,
            "top_logprobs": [{_token_text(engine, t): lp for t, lp in top} for top in c.tops],
            "text_offset": offsets}


def _chat_logprobs(engine: TokenEngine, c: Choice) -> list[dict]:
    def entry(token: int, logprob: float | None) -> dict:
        raw = engine.tokenizer.token_bytes(token) or b""
        return {"token": _token_text(engine, token), "logprob": logprob, "bytes": list(raw)}
    return [{**entry(t, lp), "top_logprobs": [entry(tt, tlp) for tt, tlp in top]}
            for t, lp, top in zip(c.tokens, c.logprobs, c.tops)]
