"""Request envelopes of the OpenAI-compatible API (small, so pydantic is fine here).

Strict, as OpenAI's own server is: a field nobody knows (a misspelling: `max_token`) is a 400
naming it (`extra="forbid"`, on every nested object too), never dropped. A field of OpenAI's API
that this server does not honour (`logit_bias`, `tools`, `response_format`, ...) is declared with
`unsupported(...)`: accepted only at a value that changes nothing (absent, null, or the neutral
value listed), else a 400 that names it and says it is not supported. What the stock `openai`
client sends on its own is the caller's arguments and nothing else (checked for 3.57), so strictness
costs a normal caller nothing.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

UNSUPPORTED = "unsupported_parameter"      # the pydantic error type of a known field we do not honour
UNSUPPORTED_KEY = "x-unsupported"          # where `unsupported` keeps a field's reason and neutral values


def unsupported(why: str, *neutral: Any) -> Any:
    """The default of an OpenAI field this server does not honour (annotated `Any`): it accepts
    absent, null and the values in `neutral` (they change nothing); any other value is a 400
    saying `why` (`_Strict._unsupported`). The OpenAPI document says so too."""
    return Field(None, description=f"not supported: {why}; accepted only as "
                                   + " or ".join(json.dumps(a) for a in (None, *neutral)),
                 json_schema_extra={UNSUPPORTED_KEY: {"why": why, "accepted": [None, *neutral]}})


def _same(value: Any, neutral: Any) -> bool:
    """JSON equality: 0 and 0.0 are the same number, false is not 0."""
    if isinstance(value, bool) or isinstance(neutral, bool) or value is None or neutral is None:
        return value is neutral
    numbers = (int, float)
    if isinstance(value, numbers) or isinstance(neutral, numbers):
        return isinstance(value, numbers) and isinstance(neutral, numbers) and value == neutral
    return type(value) is type(neutral) and value == neutral


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @field_validator("*")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        extra = cls.model_fields[info.field_name].json_schema_extra
        rule = extra.get(UNSUPPORTED_KEY) if isinstance(extra, dict) else None
        if rule is not None and not any(_same(value, a) for a in rule["accepted"]):
            shown = " or ".join(json.dumps(a) for a in rule["accepted"])
            raise PydanticCustomError(UNSUPPORTED, "{why} (leave it out, or send {shown})",
                                      {"why": rule["why"], "shown": shown})
        return value


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: Any = unsupported("streams are not obfuscated", False)


_PENALTIES = "the sampler applies no penalties"
_TOOLS = "there is no tool or function calling"
_CACHE = "there is no prompt cache; the `user` field keys sticky routing"


class _Sampling(_Strict):
    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension: 0 = off")
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = Field(None, description="only with `stream: true`")
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-text")
    # the end user: the sticky routing key when model.json's sticky_key header is absent
    user: str | None = Field(None, max_length=256)
    presence_penalty: Any = unsupported(_PENALTIES, 0)
    frequency_penalty: Any = unsupported(_PENALTIES, 0)
    logit_bias: Any = unsupported("the sampler applies no logit biases", {})

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_list(cls, v):
        # a ValueError, never a TypeError: only the former becomes a 400 (a number here was a 500)
        if v is not None and not isinstance(v, (str, list)):
            raise ValueError("stop takes a string or a list of up to 4 strings")
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops


class CompletionRequest(_Sampling):
    # text, texts, token ids, or lists of token ids (as OpenAI and vLLM accept)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: Any = unsupported("the prompt is not echoed", False)
    suffix: Any = unsupported("there is no insertion (text after the completion)", "")
    best_of: int | None = Field(None, ge=1, description="not supported beyond best_of = n (which changes nothing)")

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        one = isinstance(v, str) or (bool(v) and all(isinstance(x, int) for x in v))
        prompts = [v] if one else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must be a non-empty string or list of token ids (or a list of them)")
        return prompts

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, v, info: ValidationInfo):
        n = info.data.get("n", 1)
        if v is not None and v != n:
            raise PydanticCustomError(UNSUPPORTED, "candidates are not ranked; use n for several "
                                      "completions (best_of = n, or null, is accepted)")
        return v


# content part types of OpenAI's chat API other than text: known, refused as unsupported
_PART_TYPES = ("image_url", "input_audio", "file", "refusal")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str

    @model_validator(mode="before")
    @classmethod
    def _only_text(cls, v):
        if isinstance(v, dict) and v.get("type") in _PART_TYPES:
            raise PydanticCustomError(UNSUPPORTED, "only text content parts are read, not {kind}",
                                      {"kind": repr(v["type"])})
        return v


class ChatMessage(_Strict):
    # `developer` is OpenAI's newer name for `system` (the chat template renders it as one)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: Any = unsupported("the chat template has no place for participant names", "")
    # what an assistant message copied from an OpenAI answer carries; accepted only empty
    refusal: Any = unsupported("the chat template has no place for refusals")
    tool_calls: Any = unsupported(_TOOLS, [])
    function_call: Any = unsupported(_TOOLS)
    audio: Any = unsupported("there is no audio")
    annotations: Any = unsupported("the chat template has no place for annotations", [])

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)

    @property
    def template_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20, description="only with `logprobs: true`")
    response_format: Any = unsupported("the output is text only, no JSON mode or schemas", {"type": "text"})
    tools: Any = unsupported(_TOOLS, [])
    tool_choice: Any = unsupported(_TOOLS, "none")
    parallel_tool_calls: Any = unsupported(_TOOLS)
    functions: Any = unsupported(_TOOLS, [])
    function_call: Any = unsupported(_TOOLS, "none")
    audio: Any = unsupported("there is no audio output")
    modalities: Any = unsupported("the output is text only", ["text"])
    prediction: Any = unsupported("there are no predicted outputs")
    reasoning_effort: Any = unsupported("these models do not reason")
    verbosity: Any = unsupported("these models have no verbosity setting")
    web_search_options: Any = unsupported("there is no web search")
    store: Any = unsupported("completions are not stored", False)
    metadata: Any = unsupported("completions are not stored: there is nothing to tag", {})
    service_tier: Any = unsupported("there is one service tier", "auto", "default")
    prompt_cache_key: Any = unsupported(_CACHE)
    prompt_cache_retention: Any = unsupported(_CACHE)
    prompt_cache_options: Any = unsupported(_CACHE)
    safety_identifier: Any = unsupported("there is no abuse monitoring here; the `user` field keys sticky routing")
    moderation: Any = unsupported("there is no moderation")


def field_names(envelope: type[BaseModel]) -> set[str]:
    """Every field name of `envelope` and the models nested in it (for error locations and hints)."""
    seen: set[type[BaseModel]] = set()
    names: set[str] = set()

    def walk(model: type[BaseModel]) -> None:
        if model in seen:
            return
        seen.add(model)
        for name, info in model.model_fields.items():
            names.add(name)
            for sub in _models_in(info.annotation):
                walk(sub)
    walk(envelope)
    return names


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _models_in(arg)]


def openapi_request_body(envelope: type[BaseModel]) -> dict:
    """`openapi_extra` declaring `envelope` as a route's JSON body (the routes read their body by
    hand, for the body limit and OpenAI's error shape, so FastAPI does not see it). Nested models
    are written in place: pydantic refers to them under the schema's own `$defs`, which a
    reference in the OpenAPI document would look for at the document's root."""
    schema = envelope.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": _inline_refs(schema, schema.pop("$defs", {}))}}}}


def _inline_refs(node: Any, defs: dict) -> Any:
    if isinstance(node, dict):
        if "$ref" in node:
            named = defs[node["$ref"].rsplit("/", 1)[-1]]
            return _inline_refs({**named, **{k: v for k, v in node.items() if k != "$ref"}}, defs)
        return {key: _inline_refs(value, defs) for key, value in node.items()}
    if isinstance(node, list):
        return [_inline_refs(item, defs) for item in node]
    return node
