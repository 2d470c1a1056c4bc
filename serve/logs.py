"""Logs on stderr: one JSON object per line, or plain text for a person at a terminal; and the
access log, one line per request when turned on."""

from __future__ import annotations

import logging
import sys
import time

import orjson

access = logging.getLogger("zooserve.access")


def _timestamp(record: logging.LogRecord) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": _timestamp(record), "level": record.levelname.lower(), "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class TextFormatter(logging.Formatter):
    """`2025-01-02T03:04:05.678Z warning zooserve: message`, the traceback below it."""

    def format(self, record: logging.LogRecord) -> str:
        line = f"{_timestamp(record)} {record.levelname.lower():<7} {record.name}: {record.getMessage()}"
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def formatter(log_format: str = "auto") -> logging.Formatter:
    """JSON or text; auto is text when stderr is a terminal, else JSON (a log collector's input)."""
    text = log_format == "text" or (log_format == "auto" and sys.stderr.isatty())
    return TextFormatter() if text else JsonFormatter()


def configure(level: str = "info", log_format: str = "auto") -> None:
    """One stderr handler for zooserve's and uvicorn's loggers."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True


async def access_logged(app, scope, receive, send) -> None:
    """Run an HTTP request through the ASGI `app`, then log `METHOD path status ms request-id`
    (status 499 when the client left before an answer started)."""
    start = time.perf_counter()
    answer = {"status": 499, "rid": "-"}

    async def send_and_note(message) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
            answer["rid"] = next((v.decode("latin-1") for k, v in message.get("headers", ())
                                  if k.lower() == b"x-request-id"), "-")
        await send(message)

    try:
        await app(scope, receive, send_and_note)
    finally:
        access.info("%s %s %s %.1f ms %s", scope["method"], scope["path"], answer["status"],
                    (time.perf_counter() - start) * 1000, answer["rid"])
