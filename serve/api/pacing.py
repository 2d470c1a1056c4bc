"""Pacing clients that were refused for overload: a 429 to a connection that comes back before its
last Retry-After has passed is held until it has.

A first 429 on a connection goes out at once (a client with another replica fails over without
waiting; one that honours Retry-After comes back after it and is never held). A client that retries
at once instead gets its next 429 only when the Retry-After it ignored has passed (at most
`max_hold_s`), so a flood of such clients is paced to about one refusal per client per Retry-After
instead of as many as the event loop can answer, and the loop's turns stay free for the requests
it accepted. Only refusals wait: a retry that finds room in the queue is admitted at once, so an
accepted request never carries a pause in its latency (bench/overload.py measures both kinds of
client).

A connection is known by the ASGI scope's `client` (address and port): a client that opens a new
connection for each retry is not held, and pays a connection each time instead. Behind a proxy
that reuses one upstream connection for many users, a user refused right after another one on that
connection has its 429 held too; `max_hold_s` 0 turns holding off.

A connection refused again when it comes back about when it was told to is told to wait twice as
long as last time (2 s, then 4 s with the default `max_retry_after_s`; the queue's own estimate
when that is longer): the Retry-After it honoured was too short to find room. Why: under a flood
every client that honours a one-second Retry-After comes back each second and is refused ~9 times
in 10 (those already served go again at once and keep the room); at 1,024 such clients the server
answered ~870 refusals a second, and with the doubling ~255, with 14 % more goodput on average
(bench/overload.py, docs/reliability.md). Doubling is what client libraries do with
repeated 429s (truncated exponential backoff); here a client that only honours the header gets it
too. What it costs: the clients that wait longer are served later, so fewer distinct clients get an
answer in a given spell of overload (bench/overload.py counts them; docs/reliability.md).
`max_retry_after_s` 1 turns doubling off. A connection that comes back later than twice its last
Retry-After starts again from the queue's estimate.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from itertools import islice


# A hold ends at a random point of its last fifth. Clients refused in the same instant would
# otherwise all get their next 429 and retry in one instant a second later, find the queue full
# together again, and keep coming in waves: at 1024 clients retrying at once, the waves put the
# accepted p99 at 4.7-6.0x the p99 at 32 clients, the spread at 3.1-3.4x (bench/overload.py,
# docs/reliability.md).
HOLD_SPREAD = 0.2
# how long a refusal keeps the HTTP protocol judging refusals from the headers (`refusing`)
REFUSING_WITHIN_S = 1.0


class RefusalPacer:
    """When each recently refused connection may be refused again without waiting, and how long it
    is told to wait."""

    def __init__(self, max_hold_s: float, max_retry_after_s: int = 1, spread: float = HOLD_SPREAD,
                 draw=random.random):
        self.max_hold_s = max_hold_s
        self.max_retry_after_s = max_retry_after_s
        self.spread, self._draw = spread, draw
        # a refused connection is remembered this long: its hold, and a return at twice the longest
        # Retry-After it can be given (a client's own jitter is a fifth or so)
        self._remember_s = max(max_hold_s, 2.0 * max_retry_after_s if max_retry_after_s > 1 else 0.0)
        # connection -> (when it was refused, when its Retry-After, capped, has passed, the
        # Retry-After it was given); kept in the order of refusal (a connection refused again moves
        # to the end), so the expired ones are at the front and are dropped there, a few at each
        # refusal
        self._held: dict[object, tuple[float, float, float]] = {}
        self.last_refusal_s = -math.inf      # time.monotonic() of the last 429 for overload sent

    def refusing(self, within_s: float = REFUSING_WITHIN_S, now: float | None = None) -> bool:
        """Whether a 429 for overload went out in the last `within_s` seconds. The HTTP protocol
        judges refusals from the headers only then (serve/api/http_protocol.py): a server that
        refused nothing lately has room, and the check would cost every request for nothing."""
        return (time.monotonic() if now is None else now) - self.last_refusal_s < within_s

    def hold_s(self, client, now: float | None = None) -> float:
        """Seconds to hold a refusal for `client` (the scope's `client`) before sending it: the time
        left of the Retry-After its last 429 gave (capped at max_hold_s, less up to `spread` of it
        drawn at random), 0 when it has passed or there was none."""
        entry = self._held.get(client) if client is not None and self.max_hold_s > 0 else None
        if entry is None:
            return 0.0
        return max(0.0, entry[1] - (time.monotonic() if now is None else now))

    def retry_after_s(self, client, estimate_s: float, now: float | None = None) -> int:
        """The Retry-After, in whole seconds, of a 429 for overload about to go to `client`: the
        queue's `estimate_s` rounded up (at least 1), or, for a connection refused again within twice
        the Retry-After it was last given, twice that one, capped at max_retry_after_s."""
        seconds = max(1, math.ceil(estimate_s))
        entry = self._held.get(client) if client is not None and self.max_retry_after_s > 1 else None
        if entry is None:
            return seconds
        refused_at, _, given = entry
        if (time.monotonic() if now is None else now) - refused_at > 2.0 * given:
            return seconds                  # back long after it was told: a new spell of refusals
        return max(seconds, min(self.max_retry_after_s, int(2 * given)))

    def refused(self, client, retry_after_s: float, now: float | None = None) -> None:
        """`client` was just sent a 429 with this Retry-After (any client, holding on or off: it
        also keeps `refusing` on for the next second)."""
        now = time.monotonic() if now is None else now
        self.last_refusal_s = now
        if client is None or self._remember_s <= 0:
            return
        self._held.pop(client, None)
        hold = min(retry_after_s, self.max_hold_s) * (1.0 - self.spread * self._draw())
        self._held[client] = (now, now + hold, retry_after_s)
        self._forget_expired(now)

    def _forget_expired(self, now: float) -> None:
        for client, (refused_at, _, _) in list(islice(self._held.items(), 8)):
            if refused_at + self._remember_s > now:
                break
            del self._held[client]

    def __len__(self) -> int:
        return len(self._held)

    async def send_refusal(self, scope, send, messages, retry_after_s: float) -> None:
        """Send the 429's ASGI `messages` (the start, the body) once the connection's hold has
        passed, with the Retry-After this connection is given for the queue's `retry_after_s`, then
        note it."""
        client = scope.get("client")
        seconds = self.retry_after_s(client, retry_after_s)
        start, *rest = messages
        start = {**start, "headers": with_retry_after(start["headers"], seconds)}
        hold = self.hold_s(client)
        if hold > 0:
            await asyncio.sleep(hold)
        for message in (start, *rest):
            await send(message)
        self.refused(client, seconds)


def with_retry_after(headers: list[tuple[bytes, bytes]], seconds: int) -> list[tuple[bytes, bytes]]:
    """ASGI `headers` with their Retry-After (added when missing) saying `seconds`."""
    value = str(seconds).encode()
    out = [(name, value if name.lower() == b"retry-after" else v) for name, v in headers]
    return out if any(name.lower() == b"retry-after" for name, _ in headers) else [*out, (b"retry-after", value)]
