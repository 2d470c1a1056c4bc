"""Request envelopes of the OpenAI-compatible API (small, so pydantic is fine here).

Unknown fields are ignored, as OpenAI's own server does with fields it does not use;
fields we accept but cannot honour are refused with a message naming them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, description="extension: 0 = off")
    n: int = Field(1, ge=1, le=16)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = Field(False, description="extension: keep generating past end-of-text")
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # the end user: the sticky routing key when model.json's sticky_key header is absent
    user: str | None = Field(None, max_length=256)

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

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalties(cls, v):
        if v != 0:
            raise ValueError("presence and frequency penalties are not supported")
        return v


class CompletionRequest(_Sampling):
    # text, texts, token ids, or lists of token ids (as OpenAI and vLLM accept)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=5)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, v):
        one = isinstance(v, str) or (bool(v) and all(isinstance(x, int) for x in v))
        prompts = [v] if one else v
        if not prompts or any(not p for p in prompts):
            raise ValueError("prompt must be a non-empty string or list of token ids (or a list of them)")
        return prompts

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, v):
        if v:
            raise ValueError("echo is not supported")
        return v


class ContentPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[ContentPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)


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
