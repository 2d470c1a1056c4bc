"""The repository's load and unload in a server of several worker processes (`--workers N`).

A load or unload reaches the one worker the kernel gave the connection to, but each worker has its
own engines, so the action must reach all of them. The workers share a folder (the supervisor's,
serve/workers.py); in it:

- `control.jsonl`: every load and unload, one line each `{"seq", "action", "model", "registry"}`
  (the last, the model's registry fingerprint then), appended under an exclusive lock
  (`control.lock`), so the sequence numbers are one order every worker applies them in;
- `<pid>.control.json`: what a worker has applied (`applied`, the last seq) and the outcome of each
  (`results`: seq -> `{"status", "error"}`, the last RESULTS_KEPT of them).

The worker that took the request appends it, applies the log up to it, then waits until every live
worker has applied it too (each follows the log, checking its size every FOLLOW_EVERY_S) and
answers with the first refusal any of them met (its own first), else 200: the same answer a
one-process server gives, once every worker serves the change. A worker started later (a
replacement after a crash) replays the log before it listens: the last action per model wins, so
a model unloaded by an admin stays unloaded in it (unless the model changed in the registry since:
every running worker's watch reloaded it then) and one loaded by hand beside `--models` is loaded.
A worker that dies while it is waited for is not waited for (its replacement replays): its state
file goes when the supervisor reaps it, and a pid no longer alive is skipped before that.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from serve.errors import ServeError
from serve.worker_metrics import pid_alive, write_whole

log = logging.getLogger("zooserve.workers")

LOG_FILE = "control.jsonl"
LOCK_FILE = "control.lock"
STATE_SUFFIX = ".control.json"
FOLLOW_EVERY_S = 0.1
RESULTS_KEPT = 64
ACTIONS = ("load", "unload")


def append(folder: Path, action: str, model: str, registry: Any = None) -> int:
    """Append one action to the folder's log; its sequence number (1, 2, ...). `registry`: the
    model's registry fingerprint then (serve/registry_watch.py), JSON-able."""
    if action not in ACTIONS:
        raise ValueError(f"unknown action {action!r}")
    with open(folder / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            seq = len(read_log(folder)[0]) + 1
            with open(folder / LOG_FILE, "ab") as f:         # one write of a whole line
                f.write(orjson.dumps({"seq": seq, "action": action, "model": model, "registry": registry}) + b"\n")
            return seq
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_log(folder: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
    """The log's entries from byte `offset` (the whole log by default), and the offset after them;
    a line being written (no newline yet) is left for the next read."""
    try:
        with open(folder / LOG_FILE, "rb") as f:
            f.seek(offset)
            data = f.read()
    except FileNotFoundError:
        return [], offset
    complete = data[:data.rfind(b"\n") + 1]
    return [orjson.loads(line) for line in complete.splitlines() if line.strip()], offset + len(complete)


def last_action_per_model(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """model -> its last entry in the log (what a worker started later must match)."""
    return {entry["model"]: entry for entry in entries}


def fingerprint(registry_root: Path, model: str) -> Any:
    """The model's registry fingerprint as the log stores it (JSON's lists for tuples)."""
    from serve.registry_watch import model_fingerprint      # the engines' imports: not in the supervisor

    return orjson.loads(orjson.dumps(model_fingerprint(registry_root / model)))


def forget(folder: Path, pid: int) -> None:
    """A worker exited: nobody waits for it any longer (the supervisor calls this when it reaps it,
    before the pid can be reused by another process)."""
    (Path(folder) / f"{pid}{STATE_SUFFIX}").unlink(missing_ok=True)


class WorkerControl:
    """One worker's side of the log: apply what it says to `repository`, publish what was applied,
    and carry out a load/unload this worker was asked for."""

    def __init__(self, folder: Path, repository, wait_timeout_s: float = 300.0, pid: int | None = None):
        self.folder, self.repository = folder, repository
        self.wait_timeout_s = wait_timeout_s
        self.pid = pid or os.getpid()
        self.applied = 0                    # the last seq applied here
        self._offset = 0                    # bytes of the log read so far
        self._results: dict[str, dict[str, Any]] = {}
        self._applying = asyncio.Lock()     # the log is applied in order, one action at a time
        self._following: asyncio.Task | None = None

    # ---- start-up and following ------------------------------------------------------------------
    async def start(self) -> None:
        """Match the log (its last action per model), publish, and follow it from there. Called once
        the start-up load is done and before the worker listens."""
        async with self._applying:
            entries = self._read_new()
            for model, entry in last_action_per_model(entries).items():
                loaded = model in self.repository.tables
                if entry["action"] == "load" and not loaded:
                    await self._apply("load", model)
                # an unload stands unless the model changed in the registry since: every running
                # worker's watch reloaded it then, as a one-process server's does
                elif (entry["action"] == "unload" and loaded
                      and entry.get("registry") == fingerprint(self.repository.registry.root, model)):
                    await self._apply("unload", model)
            if entries:
                self.applied = entries[-1]["seq"]
            self._publish()
        self._following = asyncio.get_running_loop().create_task(self._follow())

    async def stop(self) -> None:
        if self._following is not None:
            self._following.cancel()

    async def _follow(self) -> None:
        while True:
            await asyncio.sleep(FOLLOW_EVERY_S)
            try:
                await self.catch_up()
            except Exception:       # noqa: BLE001 - a bad line must not end the following
                log.exception("worker %d: applying the control log failed", self.pid)

    async def catch_up(self) -> None:
        """Apply every action appended since the last one applied here, in order."""
        try:
            size = os.stat(self.folder / LOG_FILE).st_size
        except FileNotFoundError:
            return
        if size == self._offset:
            return
        async with self._applying:
            for entry in self._read_new():
                status, error = await self._apply(entry["action"], entry["model"])
                self._results[str(entry["seq"])] = {"status": status, "error": error}
                self.applied = entry["seq"]
            while len(self._results) > RESULTS_KEPT:
                self._results.pop(next(iter(self._results)))
            self._publish()

    def _read_new(self) -> list[dict[str, Any]]:
        entries, self._offset = read_log(self.folder, self._offset)
        return [e for e in entries if e["seq"] > self.applied]

    async def _apply(self, action: str, model: str) -> tuple[int, str | None]:
        """Do one action here; (HTTP status, error message or None)."""
        try:
            if action == "load":
                refused = await self.repository.load_model(model)
                if refused:     # 409 as a one-process server answers it (serve/api/v2.py)
                    return 409, self.repository.refusal_message(model, refused)
            else:
                await self.repository.unload_model(model)
        except ServeError as exc:
            return exc.status, exc.message
        except Exception as exc:  # noqa: BLE001 - reported to the caller, this worker serves on
            log.exception("worker %d: %s %s failed", self.pid, action, model)
            return 500, f"{action} of {model!r} failed in worker {self.pid}: {type(exc).__name__}: {exc}"
        return 200, None

    def _publish(self) -> None:
        write_whole(self.folder / f"{self.pid}{STATE_SUFFIX}",
                    orjson.dumps({"applied": self.applied, "results": self._results}))

    # ---- a load or unload asked of this worker ---------------------------------------------------
    async def request(self, action: str, model: str) -> None:
        """Append the action, apply it here and wait until every live worker has; raise the first
        refusal (ServeError with its status), this worker's first."""
        seq = await asyncio.to_thread(append, self.folder, action, model,
                                      fingerprint(self.repository.registry.root, model))
        await self.catch_up()
        outcomes = [self._results.get(str(seq)) or {"status": 200, "error": None}]
        outcomes += await self._others(seq, f"{action} of {model!r}")
        for outcome in outcomes:
            if outcome["status"] != 200:
                raise ServeError(outcome["status"], outcome["error"])

    async def _others(self, seq: int, what: str) -> list[dict[str, Any]]:
        """The other live workers' outcomes of `seq`, once each has applied it."""
        deadline = time.monotonic() + self.wait_timeout_s
        while True:
            waiting, outcomes = [], []
            for pid, state in self._states().items():
                if pid == self.pid or not pid_alive(pid):
                    continue
                if state["applied"] < seq:
                    waiting.append(pid)
                else:
                    outcomes.append(state["results"].get(str(seq)) or {"status": 200, "error": None})
            if not waiting:
                return outcomes
            if time.monotonic() > deadline:
                raise ServeError(504, f"worker(s) {', '.join(map(str, waiting))} had not applied the {what} "
                                      f"within {self.wait_timeout_s:.0f} s; it is applied in this worker and will "
                                      "be in the others when they catch up")
            await asyncio.sleep(FOLLOW_EVERY_S / 2)

    def _states(self) -> dict[int, dict[str, Any]]:
        states = {}
        for path in self.folder.glob(f"*{STATE_SUFFIX}"):
            try:
                states[int(path.name.split(".")[0])] = orjson.loads(path.read_bytes())
            except (ValueError, OSError, orjson.JSONDecodeError):
                continue            # being replaced, or not a worker's
        return states
