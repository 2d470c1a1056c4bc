"""The thread shell shared by the engines that step a scheduler (tokens, denoise).

The asyncio side puts ("add", item) and ("abort", item) into a thread-safe inbox and counts its
callers in `_pending`; one engine thread applies the inbox between steps, runs `_step()` while
the scheduler has work and blocks on the inbox while it has none. A failed step fails what was
running and the engine goes on; `close()` refuses new callers, lets the accepted ones finish (up
to a timeout), then stops the thread, which fails whatever is still left.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from serve.batching import Closed

log = logging.getLogger("zooserve.engines")


class StepLoop:
    """Subclasses set `name` and `version` and implement the hooks below."""

    name: str
    version: int

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._pending = 0              # submitted and not yet answered (asyncio side)

    # ---- hooks (engine thread) ------------------------------------------------------------------
    def _has_work(self) -> bool:
        raise NotImplementedError

    def _add(self, item) -> None:
        raise NotImplementedError

    def _abort(self, item) -> None:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    def _fail_running(self, exc: Exception) -> None:
        raise NotImplementedError

    def _fail_everything(self, exc: Exception) -> None:
        raise NotImplementedError

    # ---- asyncio side ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread."""
        self._thread = threading.Thread(target=self._loop_forever, name=f"{self.name}-{self.version}", daemon=True)
        self._thread.start()

    @property
    def in_flight(self) -> int:
        """Requests accepted and not yet answered."""
        return self._pending

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let accepted ones finish (up to the timeout), stop the thread."""
        self._closing = True
        deadline = time.monotonic() + drain_timeout_s
        while self._pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        self._inbox.put(("stop", None))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)

    # ---- engine thread --------------------------------------------------------------------------
    def _loop_forever(self) -> None:
        while True:
            if not self._take_inbox(block=not self._has_work()):
                self._fail_everything(Closed("model was unloaded before this request finished"))
                return
            try:
                self._step()
            except Exception as exc:  # noqa: BLE001 - fail what ran, keep the engine alive
                log.exception("step failed for %s/%s", self.name, self.version)
                self._fail_running(exc)

    def _take_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts; False on stop."""
        while True:
            try:
                kind, item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                self._add(item)
            elif kind == "abort":
                self._abort(item)
