"""Dynamic batching for stateless models (Triton's dynamic batcher, two knobs).

Requests queue on the event loop; one collector task cuts a batch when `max_batch_size` rows
are waiting or the oldest request has waited `max_queue_delay_ms` (a window that opens only under
load: a lone request after a batch of one runs at once), concatenates the inputs,
runs the batch on one of the engine's execution instances (Triton's instance_group count: threads
that run batches side by side on one runtime; ONNX Runtime and torch release the GIL and take
concurrent runs) and scatters the output rows back. While every instance is busy, arriving requests
grow the next batch; when one is free, the next batch starts on it while the others still compute
once it holds as many rows as the smallest batch running (or is full); a smaller one, its delay
past, waits until they finish (or it grows). What to do next is one
pure decision (`time_to_cut`) over the queue and the instances, taken again whenever one of them
changes: a request queued, a batch finished, close, new limits, or the delay window's end.

Refusals never touch the model: a full queue raises `QueueFull` (HTTP 429 with Retry-After),
a request whose deadline passed before its batch started raises `DeadlineExceeded` (504), and
a batcher that is closing raises `Closed` (503). A failing batch fails only its own requests.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

# the refusals live with the HTTP layer's errors (serve.errors), which answers them; importing them
# from here still works, as the engines and tests always have
from serve.errors import Closed, DeadlineExceeded, QueueFull

RunBatch = Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]


@dataclass
class _Pending:
    inputs: dict[str, np.ndarray]       # each (rows, ...)
    rows: int
    future: asyncio.Future
    enqueued: float                     # perf_counter at submit
    deadline: float | None              # perf_counter after which it must not run


def _shapes(item: _Pending) -> tuple:
    """What must be equal for requests to share a batch: each input's name, dims past the batch
    axis and dtype."""
    return tuple((name, a.shape[1:], a.dtype) for name, a in item.inputs.items())


def time_to_cut(requests: int, rows: int, oldest_wait_s: float, busy: int, instances: int,
                max_batch_size: int, delay_s: float, last_batch_requests: int, closing: bool,
                smallest_running_rows: int) -> float:
    """The collector's one decision: seconds until it cuts the next batch. 0: now; T > 0: the delay
    window holds T more; inf: nothing may start until something changes. It is taken from the state
    alone (`requests` and `rows` queued, the oldest's wait, `busy` instances of `instances`, the
    previous cut's request count, the rows of the smallest batch running), so the collector simply
    takes it again at every change."""
    if requests == 0 or busy >= instances:
        return math.inf       # nothing to cut, or no instance to run it on: until a submit or a finished batch
    if requests == 1 and last_batch_requests <= 1:
        return 0.0            # no load: a window would only add latency (it opens again once batches form)
    if closing or rows >= max_batch_size:
        return 0.0            # draining skips the window; a full batch has nothing to wait for
    if oldest_wait_s < delay_s:
        return delay_s - oldest_wait_s
    return 0.0 if not busy or rows >= rows_beside(smallest_running_rows, max_batch_size) else math.inf


def rows_beside(smallest_running_rows: int, max_batch_size: int) -> int:
    """Rows a batch needs to start while others run: as many as the smallest one running (or a full
    one). The one rule for the decision (time_to_cut) and for waking the collector (submit_all).

    Cutting whatever had queued after the window (6-8 rows beside a running 32) only took the cores
    and the GIL from the event loop (bench/overload.py's CNN: goodput under overload 1,392 -> 993
    req/s); waiting for a full batch left the second core idle below 2 x max_batch_size clients.
    Batches as large as the running one keep the instances balanced at every load. Measured and
    not kept: half or a quarter of the running batch (32 clients, 2 instances: batches of 13 and 11
    instead of 16, req/s within the run-to-run spread, 1,030-1,190)."""
    return min(max(1, smallest_running_rows), max_batch_size)


@dataclass
class BatchRecord:
    """What one execution did, for the metrics recorder."""

    rows: int
    compute_s: float
    queue_waits: list[float] = field(default_factory=list)


class Reservation:
    """A place in a batcher's queue, held from admission until the request is queued or gives up."""

    __slots__ = ("_batcher",)

    def __init__(self, batcher: "DynamicBatcher"):
        self._batcher: DynamicBatcher | None = batcher

    def release(self) -> None:
        if self._batcher is not None:
            self._batcher._reserved -= 1
            self._batcher = None

    def __enter__(self) -> "Reservation":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


class DynamicBatcher:
    """Collects requests into batches and runs up to `instances` of them at a time, each on its own
    thread (one by default: batches run one after the other)."""

    def reconfigure(self, max_batch_size: int, max_queue_delay_ms: float, max_queue_size: int,
                    max_queue_wait_ms: float | None = None) -> None:
        """New limits (model.json's batching changed); batches already cut keep theirs."""
        self.max_batch_size = max_batch_size
        self.max_queue_delay_s = max_queue_delay_ms / 1000.0
        self.max_queue_size = max_queue_size
        self.max_queue_wait_s = None if max_queue_wait_ms is None else max_queue_wait_ms / 1000.0
        self._wakeup.set()      # the collector decides again with the new limits (this runs on the loop)

    def __init__(self, run_batch: RunBatch, max_batch_size: int, max_queue_delay_ms: float,
                 max_queue_size: int, on_batch: Callable[[BatchRecord], None] | None = None,
                 name: str = "batcher", inline_below_ms: float = 0.2, max_queue_wait_ms: float | None = None,
                 instances: int = 1):
        if instances < 1:
            raise ValueError(f"instances must be 1 or more, not {instances}")
        self.run_batch = run_batch
        self.instances = instances
        # The collector's one wake-up: set by whatever can change its decision (time_to_cut): a
        # request to an empty queue or one that fills a batch (submit), a finished batch, close,
        # new limits, the end of a delay window (a timer). The collector clears it before it reads
        # the state, so a change after that read is never lost; a spare set costs one decision.
        self._wakeup = asyncio.Event()
        self.reconfigure(max_batch_size, max_queue_delay_ms, max_queue_size, max_queue_wait_ms)
        self.on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        # batches that run faster than this (running mean) execute on the event loop itself:
        # the hop to the thread and back costs more CPU than such a model (bench/classify.py)
        self.inline_below_s = inline_below_ms / 1000.0
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=name)
        self._task: asyncio.Task | None = None
        self._closing = False
        self._in_flight = 0                # requests taken off the queue and not yet answered
        self._executing: dict[asyncio.Task, int] = {}   # batches running on instances (instances > 1) -> rows
        self._rows_queued = 0              # sum of rows in the queue
        self._last_batch_requests = 0      # requests in the previous batch cut (1 = no load to batch)
        self._mean_batch_s = 0.001         # running mean of batch compute time (Retry-After, inline choice)
        self._mean_batch_rows = 1.0        # running mean of rows per executed batch (the drain rate)
        # running mean of the time from one batch's start to the next's while the queue never ran
        # empty: the drain rate as clients see it, compute plus the event loop's turns between
        # batches (under a flood of refused requests those turns, not the model, can bound it)
        self._mean_cycle_s = 0.0
        self._last_start: float | None = None   # start of the previous batch when the queue stayed non-empty
        self._reserved = 0                 # admitted requests not yet queued (see admit)

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def in_flight(self) -> int:
        """Queued plus executing requests."""
        return len(self._queue) + self._in_flight

    def expected_wait_s(self, reserved: int | None = None) -> float:
        """How long a request queued now would wait for its batch to start: the rows ahead (queued,
        and admitted but not yet queued) over the measured drain rate (rows per batch / seconds per
        batch cycle, running means), plus the batch running now."""
        reserved = self._reserved if reserved is None else reserved
        if not self._queue and not reserved:
            return 0.0
        # with n instances a batch starts every mean_batch_s / n at best
        drain_rows_per_s = self._mean_batch_rows / max(self._mean_cycle_s, self._mean_batch_s / self.instances)
        return ((self._rows_queued + reserved) / drain_rows_per_s
                + (self._mean_batch_s / self.instances if self._in_flight else 0.0))

    def admit(self, deadline: float | None = None) -> "Reservation":
        """Refuse a request before it is read or queued (Closed, or QueueFull with the time the
        queue needs to drain to its bound): when the queue holds max_queue_size requests, or when
        the expected wait exceeds max_queue_wait_ms or the time left to the request's deadline.
        An empty queue admits anything. An admitted request holds a place (counted as one row)
        until it is queued or gives up (`with batcher.admit(...):` around reading and decoding its
        body): requests admitted together, before any of them is queued, see each other."""
        self._check_admission(deadline, self._reserved)
        self._reserved += 1
        return Reservation(self)

    def _check_admission(self, deadline: float | None, reserved: int) -> None:
        """`reserved`: the places held by admitted requests that count against this one (none at
        queueing time: those were admitted knowing of this one)."""
        if self._closing:
            raise Closed("model is shutting down")
        if not self._queue and not reserved:
            return
        wait = self.expected_wait_s(reserved)
        if len(self._queue) + reserved >= self.max_queue_size:
            raise QueueFull(retry_after_s=wait)
        bound = self.max_queue_wait_s if self.max_queue_wait_s is not None else float("inf")
        if deadline is not None:
            bound = min(bound, deadline - time.perf_counter())
        if wait > bound:
            # the time for the queue to drain to the bound, were nothing else to arrive
            raise QueueFull(retry_after_s=wait - max(bound, 0.0))

    def start(self) -> None:
        """Start the collector task on the running loop."""
        self._task = asyncio.get_running_loop().create_task(self._collect_forever())

    async def submit(self, inputs: dict[str, np.ndarray], rows: int, deadline: float | None = None) -> dict[str, np.ndarray]:
        """Queue one request of `rows` rows and wait for its outputs (each `(rows, ...)`)."""
        return await self.submit_all([(inputs, rows)], deadline)[0]

    def submit_all(self, parts: list[tuple[dict[str, np.ndarray], int]],
                   deadline: float | None = None) -> list[asyncio.Future]:
        """Queue several requests (the slices of one larger request) all or none: QueueFull or
        Closed before any is queued, so a refused request leaves no slice behind to compute.
        Returns one future per part, each resolving to that part's outputs."""
        self._check_admission(deadline, 0)
        # an empty queue admits any request whole, so that one larger than the queue is not refused forever
        if self._queue and len(self._queue) + len(parts) > self.max_queue_size:
            raise QueueFull(retry_after_s=self.expected_wait_s())
        loop, now, futures = asyncio.get_running_loop(), time.perf_counter(), []
        was_empty, rows_before = not self._queue, self._rows_queued
        for inputs, rows in parts:
            futures.append(loop.create_future())
            self._queue.append(_Pending(inputs, rows, futures[-1], now, deadline))
            self._rows_queued += rows
        # only a change that can turn the decision wakes the collector: a first request, or the rows
        # reaching a full batch or a running batch's size (waking it for every request of a flood
        # would cost a loop turn each)
        running = self._smallest_running_rows()
        threshold = rows_beside(running, self.max_batch_size) if running else self.max_batch_size
        if was_empty or rows_before < threshold <= self._rows_queued:
            self._wakeup.set()
        return futures

    async def _sleep(self, timeout: float) -> None:
        """Sleep until `_wakeup` is set or `timeout` seconds (inf: no limit) pass."""
        timer = None
        if timeout != math.inf:
            timer = asyncio.get_running_loop().call_later(timeout, self._wakeup.set)
        try:
            await self._wakeup.wait()
        finally:
            if timer is not None:
                timer.cancel()

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let queued and running ones finish (up to the timeout), then stop."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), drain_timeout_s)
            except asyncio.TimeoutError:
                self._task.cancel()
        while self._queue:
            item = self._queue.popleft()
            self._rows_queued -= item.rows
            if not item.future.done():
                item.future.set_exception(Closed("model was unloaded before this request ran"))
        self._executor.shutdown(wait=True)

    async def _collect_forever(self) -> None:
        while True:
            # cleared before the state is read: any change from here on sets it again, and one
            # already set (a request queued during an inline batch) is in what is read now
            self._wakeup.clear()
            if not self._queue and self._closing:
                while self._executing:
                    await asyncio.gather(*list(self._executing))
                return
            wait = self._time_to_cut()
            if wait > 0:
                await self._sleep(wait)
                continue
            batch = self._take_batch()
            if not batch:
                continue
            # set at the cut, not when the batch starts on its instance, so the next decision sees it
            self._last_batch_requests = len(batch)
            if self._mean_batch_s < self.inline_below_s:
                await self._run(batch, self._start(batch), None)
            elif self.instances == 1:
                # the collector waits for its one instance itself and cuts the next batch in the same
                # turn, before the answers run: with no instance beside it there is nothing to gain
                # from a task and a wake-up a batch (the flow docs/reliability.md's figures measured)
                await self._run(batch, *self._submit(batch))
            else:
                self._launch(batch)

    def _time_to_cut(self) -> float:
        """`time_to_cut` over this batcher's state now."""
        oldest_wait = time.perf_counter() - self._queue[0].enqueued if self._queue else 0.0
        return time_to_cut(len(self._queue), self._rows_queued, oldest_wait, len(self._executing),
                           self.instances, self.max_batch_size, self.max_queue_delay_s,
                           self._last_batch_requests, self._closing, self._smallest_running_rows())

    def _smallest_running_rows(self) -> int:
        """Rows of the smallest batch now running on an instance; 0 when none runs."""
        return min(self._executing.values(), default=0)

    def _instance_done(self, task: asyncio.Task) -> None:
        self._executing.pop(task, None)
        self._wakeup.set()      # an instance is free (and a partial batch may now go)

    def _take_batch(self) -> list[_Pending]:
        """Pop requests in arrival order while they fit and have the batch's non-batch shapes and
        dtypes (Triton's rule: only requests of equal shapes batch together; one that differs
        starts the next batch); expired or cancelled ones are answered here."""
        batch: list[_Pending] = []
        rows, now, shapes = 0, time.perf_counter(), None
        while self._queue and rows + self._queue[0].rows <= self.max_batch_size:
            if shapes is not None and _shapes(self._queue[0]) != shapes:
                break
            item = self._queue.popleft()
            self._rows_queued -= item.rows
            if item.future.done():              # the client went away
                continue
            if item.deadline is not None and now > item.deadline:
                item.future.set_exception(DeadlineExceeded("deadline passed while queued; not computed"))
                continue
            batch.append(item)
            rows += item.rows
            shapes = shapes or _shapes(item)
        return batch

    def _start(self, batch: list[_Pending]) -> tuple[float, dict[str, np.ndarray]]:
        """Note a batch's start (the drain-rate means) and join its requests' inputs."""
        started = time.perf_counter()
        if self._last_start is not None:
            self._mean_cycle_s = 0.8 * self._mean_cycle_s + 0.2 * (started - self._last_start)
        self._last_start = started     # forgotten again if the queue runs empty by the batch's end
        self._in_flight += len(batch)
        if len(batch) == 1:
            return started, batch[0].inputs
        return started, {n: np.concatenate([p.inputs[n] for p in batch]) for n in batch[0].inputs}

    def _submit(self, batch: list[_Pending]) -> tuple[tuple[float, dict[str, np.ndarray]], asyncio.Future]:
        """Start `batch` on an instance's thread now; returns its start and the run's future."""
        start = self._start(batch)
        return start, asyncio.get_running_loop().run_in_executor(self._executor, self.run_batch, start[1])

    def _launch(self, batch: list[_Pending]) -> None:
        """Run `batch` on a free instance: its thread has it before this returns."""
        task = asyncio.get_running_loop().create_task(self._run(batch, *self._submit(batch)))
        self._executing[task] = sum(item.rows for item in batch)
        task.add_done_callback(self._instance_done)

    def _launch_if_due(self) -> None:
        """An instance just finished: cut and start the next batch now, before the finished one's
        requests are answered, if the decision says so (otherwise the collector decides). Left to
        the collector, the cut came only after the loop had answered the whole batch (a turn per
        request), and the instance idled meanwhile (py-spy, bench/instances.py's CNN, 2 instances,
        128 clients: each instance waited for work 14-16 % of the time before, 9 % after)."""
        if self._closing or not self._queue or self._mean_batch_s < self.inline_below_s:
            return
        if self._time_to_cut() == 0.0:
            batch = self._take_batch()
            if batch:
                self._last_batch_requests = len(batch)
                self._launch(batch)

    async def _run(self, batch: list[_Pending], start: tuple[float, dict[str, np.ndarray]],
                   compute: asyncio.Future | None) -> None:
        """Wait for the batch's outputs (`compute`, its instance's run; None: run it here on the
        loop) and scatter their rows to the requests."""
        started, joined = start
        try:
            outputs = self.run_batch(joined) if compute is None else await compute
        except Exception as exc:  # noqa: BLE001 - the batch's requests get the error, the batcher lives on
            await self._execute_one_by_one(batch, exc)
            self._in_flight -= len(batch)
            self._last_start = None
            return
        compute_s = time.perf_counter() - started
        self._mean_batch_s = 0.8 * self._mean_batch_s + 0.2 * compute_s
        self._mean_batch_rows = 0.8 * self._mean_batch_rows + 0.2 * sum(p.rows for p in batch)
        if compute is not None and self.instances > 1:
            self._executing.pop(asyncio.current_task(), None)   # this instance is free
            self._launch_if_due()
        offset = 0
        for p in batch:
            if not p.future.done():
                p.future.set_result({n: o[offset:offset + p.rows] for n, o in outputs.items()})
            offset += p.rows
        self._in_flight -= len(batch)
        if not self._queue:
            self._last_start = None
        if self.on_batch is not None:
            self.on_batch(BatchRecord(offset, compute_s, [started - p.enqueued for p in batch]))

    async def _execute_one_by_one(self, batch: list[_Pending], batch_error: Exception) -> None:
        """A batch failed: run its requests alone so that one poisoned request fails only itself."""
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_exception(batch_error)
            return
        loop = asyncio.get_running_loop()
        for p in batch:
            try:
                result = await loop.run_in_executor(self._executor, self.run_batch, p.inputs)
            except Exception as exc:  # noqa: BLE001
                if not p.future.done():
                    p.future.set_exception(exc)
                continue
            if not p.future.done():
                p.future.set_result(result)
