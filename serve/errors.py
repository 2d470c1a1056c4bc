"""The HTTP layer's errors: one exception (`ServeError`) that becomes `{"error": message}` with its
status, the engines' refusals (queue full, deadline passed, closing) and how each is answered, and
the one log line every refused request leaves (logger "zooserve.http")."""

from __future__ import annotations

import logging
import math

import orjson

log = logging.getLogger("zooserve.http")


class QueueFull(Exception):
    """The bounded queue is full; retry after `retry_after_s`."""

    def __init__(self, retry_after_s: float):
        super().__init__(f"queue full, retry after {retry_after_s:.3f}s")
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request's deadline passed before its batch ran; it was not computed."""


class Closed(Exception):
    """The batcher (or engine) is shutting down and takes no new requests."""


# what an engine raises when it refuses a request rather than fails on it
ENGINE_REFUSALS = (QueueFull, DeadlineExceeded, Closed)


class ServeError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def not_found(message: str) -> ServeError:
    return ServeError(404, message)


def unavailable(message: str) -> ServeError:
    return ServeError(503, message)


def engine_refusal(exc: QueueFull | DeadlineExceeded | Closed, model: str) -> ServeError:
    """The answer to an engine's refusal: 429 with Retry-After (queue full), 504 (deadline), 503 (closing)."""
    if isinstance(exc, QueueFull):
        return ServeError(429, f"model {model!r} queue is full; retry later",
                          {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
    if isinstance(exc, DeadlineExceeded):
        return ServeError(504, f"deadline exceeded: {exc}")
    return ServeError(503, str(exc))


def error_body(message: str) -> bytes:
    """The body of every error answer outside /v1 (OpenAI's routes keep OpenAI's error object)."""
    return orjson.dumps({"error": message})


def log_refusal(method: str, path: str, status: int, reason: str, model: str | None, version: str | None,
                request_id: str) -> None:
    """One line per request answered with a 4xx or 5xx: what was refused and why, never the body
    (it may hold users' data). What the client chose (the path, the model and version it named)
    and `reason` (the answer's own message, which may quote them) are quoted, so that a newline in
    any of them cannot fake a second entry; `-` stands for a model or version the request did not
    name or did not reach."""
    log.log(logging.ERROR if status >= 500 else logging.WARNING,
            "refused %s %s: status=%d model=%s version=%s request_id=%s reason=%s",
            method, _quoted(path), status, _quoted(model), _quoted(version), request_id, _quoted(reason))


def _quoted(text: str | None) -> str:
    return "-" if text is None else orjson.dumps(text).decode()
