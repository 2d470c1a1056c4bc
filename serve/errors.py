"""One error type for the HTTP layer; it becomes `{"error": message}` with its status."""

from __future__ import annotations

import math

from serve.batching import Closed, DeadlineExceeded, QueueFull

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
