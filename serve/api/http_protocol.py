"""uvicorn's httptools protocol with two shortcuts for the infer route, the one request that comes by
thousands a second.

1. **Refusals from the headers** (serve/api/early_refusal.py): a v2 infer request that its queue
   refuses is answered 429 when its headers are parsed, without an ASGI request cycle, task or app
   layers, in one socket write; its body is dropped as it arrives. Judged only within a second of
   the server's last 429 for overload (the pacer's `refusing`): the first refusal after a quiet
   spell comes from the app, the same answer; with nothing refused, the check was ~6 % of the
   event loop for nothing (py-spy, bench/instances.py's CNN, binary tensors at 32 clients).
   An OpenAI generate request names its model in the body: under the same conditions, a small one
   (Content-Length up to 64 KiB, not compressed) is held back here until its body is in, then
   judged by serve/api/token_admission.py's `refusal`; admitted, it goes to the app as uvicorn
   would have sent it, its body whole.
2. **A whole answer in one write**: the ASGI scope carries the extension `zooserve.answer`, an
   awaitable `(send, status, headers, body)` that writes status line, headers and body at once. Through
   ASGI's two `send` messages uvicorn checks every header against two regular expressions and
   writes twice; the infer handler's headers are its own (the client's x-request-id is used only
   when sane), so neither check can fail. uvicorn's `send` was ~9 % of the event loop's samples
   under load (py-spy, bench/overload.py). A server without the extension (LitServe's) gets the
   two messages.

Both keep uvicorn's bookkeeping (the cycle's states, keep-alive, pipelining, flow control) by
setting what its own `send` sets; uvicorn is pinned below its next minor release for that reason
(pyproject.toml), and tests/serve/test_http_protocol.py checks the answers byte for byte against
uvicorn's own path.
"""

from __future__ import annotations

import httptools
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle

from serve.api import token_admission
from serve.api.early_refusal import Refusal, refusal
from serve.api.v2 import ANSWER_EXTENSION

# the client the app sees comes from these when uvicorn trusts the proxy; the pacer keys on it
_PROXY_HEADERS = (b"x-forwarded-for", b"forwarded")
_GENERATE_PATHS = frozenset(path.encode() for path in token_admission.GENERATE_PATHS)
# the largest generate body held back here to be judged (a prompt; larger ones go to the app,
# which reads them under uvicorn's flow control)
_BODY_FIRST_LIMIT = 65536


def encode_answer(status: int, default_headers, headers, body: bytes, keep_alive: bool) -> bytes:
    """A whole HTTP/1.1 answer: uvicorn's status line and default headers (date, server), then
    `headers` (which hold content-length), and `body`."""
    parts = [STATUS_LINE[status]]
    for name, value in (*default_headers, *headers):
        parts += (name, b": ", value, b"\r\n")
    if not keep_alive:
        parts.append(b"connection: close\r\n")
    parts += (b"\r\n", body)
    return b"".join(parts)


class ZooserveHttpProtocol(HttpToolsProtocol):
    """The protocol `zooserve serve` runs uvicorn with (serve/cli.py)."""

    # a generate request held back until its body is in (the chunks so far), else None
    _body_first: list[bytes] | None = None

    def on_headers_complete(self) -> None:
        if self._judged_here():
            return
        self._to_the_app()

    def on_body(self, body: bytes) -> None:
        if self._body_first is not None:
            self._body_first.append(body)
        else:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._body_first is None:
            super().on_message_complete()
            return
        body = b"".join(self._body_first)
        self._body_first = None
        front = self.config.app
        answer = token_admission.refusal(front.state, httptools.parse_url(self.url).path.decode("ascii"),
                                         self.headers, self.client, body)
        if answer is not None:
            self._answer_refusal(answer)
            return
        self._to_the_app()                          # admitted: as uvicorn would have sent it, its body whole
        if self.cycle is not None and self.cycle.scope is self.scope:
            self.cycle.body = body
            super().on_message_complete()

    def _to_the_app(self) -> None:
        super().on_headers_complete()
        if self.cycle is not None and self.cycle.scope is self.scope:
            # no closure over the cycle here: cycle -> scope -> closure -> cycle would leave every
            # request's objects to the cyclic collector (measured: worse p99 under 1024 clients)
            self.scope["extensions"] = {ANSWER_EXTENSION: answer_whole}

    # ---- 1. refusals from the headers (or, for a generate request, its small body) ---------------
    def _judged_here(self) -> bool:
        """True when this request is answered here (a v2 refusal) or held back for its body."""
        front = self.config.app                     # serve.app.InferFastPath
        if getattr(front, "access_log", True) or self.expect_100_continue:
            return False
        if not front.state.pacer.refusing():
            return False                            # nothing refused lately: the app admits, or refuses and arms this
        if self.cycle is not None and not self.cycle.response_complete:
            return False                            # pipelined behind an unanswered request
        url = self.url
        if self.parser.get_method() != b"POST" or not (url.endswith(b"/infer") or url.startswith(b"/v1/")):
            return False
        raw_path = httptools.parse_url(url).path
        if b"%" in raw_path or any(name in _PROXY_HEADERS for name, _ in self.headers):
            return False
        if raw_path in _GENERATE_PATHS:
            if not self._small_plain_body(front.state.settings.max_body_bytes):
                return False
            self._body_first = []
            return True
        answer = refusal(front.state, raw_path.decode("ascii"), self.headers, self.client)
        if answer is None:
            return False
        self._answer_refusal(answer)
        return True

    def _small_plain_body(self, max_body_bytes: int) -> bool:
        """A Content-Length this path reads whole (up to 64 KiB and the server's body limit) and no
        Content-Encoding (the app decodes and refuses those)."""
        length = None
        for name, value in self.headers:
            if name == b"content-length":
                length = value
            elif name in (b"content-encoding", b"transfer-encoding"):
                return False
        return length is not None and length.isdigit() and int(length) <= min(_BODY_FIRST_LIMIT, max_body_bytes)

    def _answer_refusal(self, answer: Refusal) -> None:
        keep_alive = self.parser.get_http_version() != "1.0" and self.parser.should_keep_alive()
        self.cycle = cycle = _Answered(keep_alive)
        pacer = self.config.app.state.pacer
        hold = pacer.hold_s(self.client)
        if hold > 0:                                # a client that did not wait its last Retry-After
            self.loop.call_later(hold, self._write_refusal, cycle, answer, pacer)
        else:
            self._write_refusal(cycle, answer, pacer)

    def _write_refusal(self, cycle: "_Answered", answer: Refusal, pacer) -> None:
        if cycle.disconnected or self.transport.is_closing():
            return
        self.transport.write(encode_answer(429, self.server_state.default_headers, answer.headers, answer.body,
                                           cycle.keep_alive))
        cycle.response_complete = True
        pacer.refused(self.client, answer.retry_after_s)
        if not cycle.keep_alive:
            self.transport.close()
        self.on_response_complete()       # uvicorn's: the keep-alive timer, or the next pipelined request


# ---- 2. a whole answer in one write -----------------------------------------------------------
async def answer_whole(send, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
    """The ASGI `send` the app was given, told to answer (status, headers with content-length, body)
    in one write: what uvicorn's `send` does for a start message and a last body message
    (httptools_impl.RequestResponseCycle.send). A `send` that is not uvicorn's own (wrapped by a
    middleware: the access log's) gets the two messages."""
    cycle = getattr(send, "__self__", None)
    if type(cycle) is not RequestResponseCycle or cycle.access_log:
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    if cycle.flow.write_paused and not cycle.disconnected:
        await cycle.flow.drain()
    if cycle.disconnected:
        return
    if cycle.response_started:
        raise RuntimeError("the answer was already started")
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    cycle.transport.write(encode_answer(status, cycle.default_headers, headers, body, cycle.keep_alive))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()


class _Answered:
    """What uvicorn's protocol reads of a request cycle, for a request answered by
    `_refused_here`: complete once the 429 is written, so the body that follows is dropped and a
    request pipelined behind it waits until then."""

    __slots__ = ("response_complete", "disconnected", "keep_alive", "more_body", "body", "message_event")

    def __init__(self, keep_alive: bool):
        self.response_complete = False
        self.disconnected = False
        self.keep_alive = keep_alive
        self.more_body = True
        self.body = _Sink()
        self.message_event = _NoEvent()


class _Sink:
    """A request body that keeps nothing (`cycle.body += chunk` while a refusal is held)."""

    __slots__ = ()

    def __iadd__(self, chunk: bytes) -> "_Sink":
        return self

    def __len__(self) -> int:
        return 0


class _NoEvent:
    __slots__ = ()

    def set(self) -> None:
        pass
