"""Dynamic batching for stateless models (Triton's dynamic batcher, two knobs).

Requests queue on the event loop; one collector task cuts a batch when `max_batch_size` rows
are waiting or the oldest request has waited `max_queue_delay_ms` (a window that opens only under
load: a lone request after a batch of one runs at once), concatenates the inputs,
runs the batch on one of the engine's execution instances (Triton's instance_group count: threads
that run batches side by side on one runtime; ONNX Runtime and torch release the GIL and take
concurrent runs) and scatters the output rows back. While every instance is busy, arriving requests
grow the next batch; when one is free, the next batch is cut (by count or delay) and starts on it
while the others still compute.

Refusals never touch the model: a full queue raises `QueueFull` (HTTP 429 with Retry-After),
a request whose deadline passed before its batch started raises `DeadlineExceeded` (504), and
a batcher that is closing raises `Closed` (503). A failing batch fails only its own requests.
"""

from __future__ import annotations

import asyncio
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

    def __init__(self, run_batch: RunBatch, max_batch_size: int, max_queue_delay_ms: float,
                 max_queue_size: int, on_batch: Callable[[BatchRecord], None] | None = None,
                 name: str = "batcher", inline_below_ms: float = 0.2, max_queue_wait_ms: float | None = None,
                 instances: int = 1):
        if instances < 1:
            raise ValueError(f"instances must be 1 or more, not {instances}")
        self.run_batch = run_batch
        self.instances = instances
        self.reconfigure(max_batch_size, max_queue_delay_ms, max_queue_size, max_queue_wait_ms)
        self.on_batch = on_batch
        self._queue: deque[_Pending] = deque()
        # the collector sleeps on this future: woken by any submit when idle, by a full batch
        # (or closing) while it holds a batch window open
        self._waiter: asyncio.Future | None = None
        self._wake_on_any = True
        self._waiting_for_full = False     # the collector waits for a full batch while others run
        # batches that run faster than this (running mean) execute on the event loop itself:
        # the hop to the thread and back costs more CPU than such a model (bench/classify.py)
        self.inline_below_s = inline_below_ms / 1000.0
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix=name)
        self._task: asyncio.Task | None = None
        self._closing = False
        self._in_flight = 0                # requests taken off the queue and not yet answered
        self._executing: set[asyncio.Task] = set()   # batches running on instances (instances > 1)
        # the collector sleeps on this while every instance is busy; a finishing batch wakes it
        self._instance_freed: asyncio.Future | None = None
        self._rows_queued = 0              # sum of rows in the queue
        self._last_batch_requests = 0      # requests in the previous batch (1 = no load to batch)
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
        for inputs, rows in parts:
            futures.append(loop.create_future())
            self._queue.append(_Pending(inputs, rows, futures[-1], now, deadline))
            self._rows_queued += rows
        if self._wake_on_any or self._rows_queued >= self.max_batch_size:
            self._wake()
        return futures

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _sleep(self, timeout: float | None, wake_on_any: bool) -> None:
        """Sleep until woken (see `_waiter`) or `timeout` seconds pass."""
        loop = asyncio.get_running_loop()
        self._waiter, self._wake_on_any = loop.create_future(), wake_on_any
        timer = loop.call_later(timeout, self._wake) if timeout is not None else None
        try:
            await self._waiter
        finally:
            if timer is not None:
                timer.cancel()
            self._waiter, self._wake_on_any = None, False

    async def close(self, drain_timeout_s: float = 30.0) -> None:
        """Refuse new requests, let queued and running ones finish (up to the timeout), then stop."""
        self._closing = True
        self._wake()
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
            if not self._queue:
                if self._closing:
                    if self._executing:
                        await asyncio.gather(*self._executing)
                    return
                await self._sleep(None, wake_on_any=True)
                continue
            if len(self._executing) >= self.instances:
                await self._wait_for_instance()
                continue
            await self._wait_for_batch()
            batch = self._take_batch()
            if not batch:
                continue
            if self.instances == 1:
                await self._execute(batch)
            else:
                task = asyncio.get_running_loop().create_task(self._execute(batch))
                self._executing.add(task)
                task.add_done_callback(self._instance_done)

    async def _wait_for_instance(self) -> None:
        """Every instance is busy: sleep until a batch finishes (requests keep queueing meanwhile)."""
        self._instance_freed = asyncio.get_running_loop().create_future()
        try:
            await self._instance_freed
        finally:
            self._instance_freed = None

    def _instance_done(self, task: asyncio.Task) -> None:
        self._executing.discard(task)
        if self._waiting_for_full:      # a finished batch ends the wait for a full one
            self._wake()
        if self._instance_freed is not None and not self._instance_freed.done():
            self._instance_freed.set_result(None)

    async def _wait_for_batch(self) -> None:
        """Wait until a full batch is queued or the oldest request has waited the delay."""
        if self._last_batch_requests <= 1 and len(self._queue) == 1:
            return      # no load: a window would only add latency (it opens again once batches form)
        remaining = self._queue[0].enqueued + self.max_queue_delay_s - time.perf_counter()
        if remaining > 0 and not self._closing and self._rows_queued < self.max_batch_size:
            await self._sleep(remaining, wake_on_any=False)
        # A further instance takes only a full batch; a partial one waits for a running batch to
        # finish. Where the event loop, not the model, bounds throughput (a cheap model, JSON
        # tensors), a second instance cutting small batches only took the cores and the GIL from the
        # loop (bench/overload.py's CNN: goodput under overload 1,392 -> 993 req/s); where the model
        # bounds it, a full batch queues while one runs and the next instance takes it.
        while self._executing and not self._closing and self._queue and self._rows_queued < self.max_batch_size:
            self._waiting_for_full = True     # woken by a full batch queued (submit) or a batch done
            try:
                await self._sleep(None, wake_on_any=False)
            finally:
                self._waiting_for_full = False

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

    async def _execute(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        if self._last_start is not None:
            self._mean_cycle_s = 0.8 * self._mean_cycle_s + 0.2 * (started - self._last_start)
        self._last_start = started     # forgotten again if the queue runs empty by the batch's end
        self._last_batch_requests = len(batch)
        self._in_flight += len(batch)
        names = batch[0].inputs.keys()
        if len(batch) == 1:
            joined = batch[0].inputs
        else:
            joined = {n: np.concatenate([p.inputs[n] for p in batch]) for n in names}
        loop = asyncio.get_running_loop()
        try:
            if self._mean_batch_s < self.inline_below_s:
                outputs = self.run_batch(joined)
            else:
                outputs = await loop.run_in_executor(self._executor, self.run_batch, joined)
        except Exception as exc:  # noqa: BLE001 - the batch's requests get the error, the batcher lives on
            await self._execute_one_by_one(batch, exc)
            self._in_flight -= len(batch)
            self._last_start = None
            return
        compute_s = time.perf_counter() - started
        self._mean_batch_s = 0.8 * self._mean_batch_s + 0.2 * compute_s
        self._mean_batch_rows = 0.8 * self._mean_batch_rows + 0.2 * sum(p.rows for p in batch)
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
