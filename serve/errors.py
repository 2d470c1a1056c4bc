"""The HTTP layer's errors: one exception (`ServeError`) that becomes `{"error": message}` with its
status, the engines' refusals (queue full, deadline passed, closing) and how each is answered, and
the one log line every refused request leaves (logger "zooserve.http")."""

from __future__ import annotations

import logging
import math
import time

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
    more = ""
    if status == 429:
        shed = _SHED_LOG.shed(model)
        if shed is None:
            return
        more = f" (and {shed} more 429s for this model in the last {SHED_LOG_EVERY_S:g} s)" if shed else ""
    log.log(logging.ERROR if status >= 500 else logging.WARNING,
            "refused %s %s: status=%d model=%s version=%s request_id=%s reason=%s%s",
            method, _quoted(path), status, _quoted(model), _quoted(version), request_id, _quoted(reason), more)


# Under overload 429s come by thousands a second: a line for each would cost more than the refusal
# and bury every other line. One line a second per model is logged; it counts the 429s left out
# since the previous one (zooserve_requests_total{status="429"} counts every one).
SHED_LOG_EVERY_S = 1.0


class ShedLog:
    """Which 429 refusals are logged: the first of each model in every SHED_LOG_EVERY_S."""

    def __init__(self):
        self._last: dict[str | None, float] = {}      # model -> when its last 429 line was logged
        self._left_out: dict[str | None, int] = {}    # model -> 429s not logged since

    def shed(self, model: str | None, now: float | None = None) -> int | None:
        """None: do not log this one; else log it, with the count of those left out before it."""
        now = time.monotonic() if now is None else now
        if now - self._last.get(model, -math.inf) < SHED_LOG_EVERY_S:
            self._left_out[model] = self._left_out.get(model, 0) + 1
            return None
        self._last[model] = now
        return self._left_out.pop(model, 0)


_SHED_LOG = ShedLog()


def _quoted(text: str | None) -> str:
    return "-" if text is None else orjson.dumps(text).decode()
