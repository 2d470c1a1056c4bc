"""Pacing a client that was refused for overload: its connection is not read for a while.

A 429 is answered at once (a client with another replica fails over without waiting), and then the
server stops reading that keep-alive connection for min(Retry-After, `max_pause_s`) seconds. A
client that honours Retry-After sends nothing in that time and never notices; one that retries at
once has its retry wait, unread, in the socket until the pause ends, so a flood of such clients is
paced to about one refused request per client per pause instead of as many as the event loop can
answer, and the loop's turns stay free for the requests it accepted (bench/overload.py measures
both kinds of client). Behind a proxy that reuses one upstream connection for many users, the next
user's request on that connection waits out the pause too; `max_pause_s` 0 turns pacing off.

uvicorn's `send` callable is a method of the request's cycle, which holds the connection's flow
control (the same pause and resume uvicorn uses for its own back-pressure); under another server
nothing is paused.
"""

from __future__ import annotations

import asyncio


def pause_connection(send, seconds: float) -> bool:
    """Stop reading the connection `send` answers on for `seconds`; False when it cannot be."""
    cycle = getattr(send, "__self__", None)
    flow, transport = getattr(cycle, "flow", None), getattr(cycle, "transport", None)
    if seconds <= 0 or flow is None or transport is None or transport.is_closing():
        return False
    flow.pause_reading()
    asyncio.get_running_loop().call_later(seconds, _resume, flow, transport)
    return True


def _resume(flow, transport) -> None:
    if not transport.is_closing():
        flow.resume_reading()
