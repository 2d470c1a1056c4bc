"""The thread shell shared by the engines that step a scheduler (tokens, denoise).

The asyncio side puts ("add", item) and ("abort", item) into a thread-safe inbox and counts its
callers in `_pending`; one engine thread applies the inbox between steps, runs `_step()` while
the scheduler has work and blocks on the inbox while it has none. `close()` refuses new callers,
lets the accepted ones finish (up to a timeout), then stops the thread, which fails whatever is
still left.

Faults: an item that `_add` refuses fails alone (`_reject`). Anything else that raises on the
engine thread (a step whose runtime failed, a hook) restarts the engine: every request it holds
is answered at once with `EngineFault` (503: retry), its books and state are reset, the restart
is counted (`zooserve_engine_restarts_total`) and the thread goes on. A thread that dies all the
same (an exception that is not an `Exception`) hands over to the event loop, which does the same
and starts a new thread.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time

from serve.batching import Closed

log = logging.getLogger("zooserve.engines")


class EngineFault(Closed):
    """The engine failed while it held this request and restarted; the request did not complete
    and may be retried. A `Closed`, so that both APIs answer it 503 (the server's fault, not the
    request's) as they answer an engine that is closing."""


class StepLoop:
    """Subclasses set `name`, `version` and `metrics` and implement the hooks below."""

    name: str
    version: int

    def __init__(self) -> None:
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closing = False
        self._stopped = False          # the thread took "stop": it is not to be restarted
        self._pending = 0              # submitted and not yet answered (asyncio side)
        self._event_loop: asyncio.AbstractEventLoop | None = None

    # ---- hooks (engine thread) ------------------------------------------------------------------
    def _has_work(self) -> bool:
        raise NotImplementedError

    def _add(self, item) -> None:
        raise NotImplementedError

    def _reject(self, item, exc: Exception) -> None:
        """Answer one item that `_add` refused with `exc` (an engine whose `_add` may refuse
        implements it; without it the refusal restarts the engine)."""
        raise NotImplementedError

    def _abort(self, item) -> None:
        raise NotImplementedError

    def _step(self) -> None:
        raise NotImplementedError

    def _fail_everything(self, exc: Exception) -> None:
        """Answer every request the engine holds (running and waiting) with `exc`."""
        raise NotImplementedError

    def _reset(self) -> None:
        """Forget every request and the state they held (a restart, after `_fail_everything`).
        Default: empty `self.scheduler`'s `running` and `waiting` (all the denoise engine books)."""
        self.scheduler.running.clear()
        self.scheduler.waiting.clear()

    # ---- asyncio side ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (on the running event loop, which revives a thread that dies)."""
        self._event_loop = asyncio.get_running_loop()
        self._start_thread()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(target=self._thread_main, name=f"{self.name}-{self.version}", daemon=True)
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

    def _revive(self, thread: threading.Thread, exc: BaseException) -> None:
        """On the event loop, after `thread` died of `exc`: answer what it held, start a new one.
        (The dead thread no longer touches the books, so they are safe to reset from here.)"""
        if self._thread is not thread or self._stopped:
            return
        try:
            self._restart(exc)
        finally:
            self._start_thread()

    # ---- engine thread --------------------------------------------------------------------------
    def _thread_main(self) -> None:
        try:
            self._loop_forever()
        except BaseException as exc:  # noqa: BLE001 - a dying thread hands over to the event loop
            log.critical("engine thread of %s/%s died (%s: %s); starting a new one", self.name, self.version,
                         type(exc).__name__, exc)
            try:
                self._event_loop.call_soon_threadsafe(self._revive, threading.current_thread(), exc)
            except RuntimeError:     # the event loop is closed: the server is gone, nobody waits
                pass

    def _loop_forever(self) -> None:
        while True:
            try:
                if not self._take_inbox(block=not self._has_work()):
                    break
                self._step()
            except Exception as exc:  # noqa: BLE001 - the engine restarts, the server stays up
                log.exception("engine %s/%s failed; restarting it", self.name, self.version)
                self._restart(exc)
        self._stopped = True
        self._fail_everything(Closed("model was unloaded before this request finished"))

    def _restart(self, exc: BaseException) -> None:
        """Answer every held request 503, forget them and their state, count the restart. A request
        that was running may have left its state half-written, and one that was waiting would
        meet the same failing runtime: neither is kept."""
        self._fail_everything(EngineFault(f"model {self.name!r} version {self.version} failed "
                                          f"({type(exc).__name__}: {exc}) and was restarted; this request did "
                                          "not complete: retry it"))
        self._reset()
        self.metrics.engine_restarted()

    def _take_inbox(self, block: bool) -> bool:
        """Apply queued adds and aborts; False on stop. An add that `_add` refuses fails alone."""
        while True:
            try:
                kind, item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "stop":
                return False
            if kind == "add":
                try:
                    self._add(item)
                except Exception as exc:  # noqa: BLE001 - this request's caller gets the refusal
                    self._reject(item, exc)
            elif kind == "abort":
                self._abort(item)
