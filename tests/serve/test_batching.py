"""The dynamic batcher with a recording fake model: batching, bounds, deadlines, poisoned batches."""

from __future__ import annotations

import asyncio
import math
import threading
import time

import numpy as np
import pytest

import serve.batching
from serve.batching import Closed, DeadlineExceeded, DynamicBatcher, QueueFull, time_to_cut


class RecordingModel:
    """Doubles its input; records the rows of every executed batch; can be slowed or poisoned."""

    def __init__(self, delay_s: float = 0.0):
        self.batch_rows: list[int] = []
        self.seen_values: list[float] = []        # the first column of every row run
        self.delay_s = delay_s
        self.release = threading.Event()
        self.release.set()

    def __call__(self, inputs):
        self.release.wait(10)
        x = inputs["x"]
        self.batch_rows.append(len(x))
        self.seen_values += x[:, 0].tolist()
        if np.isnan(x).any():
            raise ValueError("poisoned row")
        time.sleep(self.delay_s)
        return {"y": x * 2}


def rows(n: int, value: float = 1.0) -> dict[str, np.ndarray]:
    return {"x": np.full((n, 3), value, dtype=np.float32)}


def run(coro):
    return asyncio.run(coro)


def test_concurrent_requests_run_as_one_batch_and_get_their_own_rows():
    model = RecordingModel()

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=16, max_queue_delay_ms=50, max_queue_size=100)
        batcher.start()
        results = await asyncio.gather(*(batcher.submit(rows(1, float(i)), 1) for i in range(5)))
        await batcher.close()
        return results
    results = run(main())
    assert model.batch_rows == [5]
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["y"], np.full((1, 3), 2.0 * i))


def test_batches_are_cut_at_max_batch_size_and_multi_row_requests_stay_whole():
    model = RecordingModel()

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=4, max_queue_delay_ms=20, max_queue_size=100)
        batcher.start()
        outs = await asyncio.gather(*(batcher.submit(rows(n), n) for n in (3, 2, 2, 1, 4)))
        await batcher.close()
        return outs
    outs = run(main())
    assert [len(o["y"]) for o in outs] == [3, 2, 2, 1, 4]
    assert all(r <= 4 for r in model.batch_rows) and sum(model.batch_rows) == 12
    assert model.batch_rows == [3, 4, 1, 4]   # arrival order kept: (3) (2+2) (1; 4 does not fit) (4)


def test_requests_arriving_while_a_batch_runs_grow_the_next_batch():
    model = RecordingModel(delay_s=0.05)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=32, max_queue_delay_ms=0, max_queue_size=100)
        batcher.start()
        first = asyncio.ensure_future(batcher.submit(rows(1), 1))
        await asyncio.sleep(0.01)          # the first batch (of 1) is running now
        rest = [asyncio.ensure_future(batcher.submit(rows(1), 1)) for _ in range(6)]
        await asyncio.gather(first, *rest)
        await batcher.close()
    run(main())
    assert model.batch_rows == [1, 6]


async def one_running(model: RecordingModel, max_queue_size: int) -> tuple[DynamicBatcher, asyncio.Future]:
    """A started batcher (one row a batch) whose first request has left the queue and blocks in
    `model` (its release cleared) until the test sets it."""
    batcher = DynamicBatcher(model, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=max_queue_size)
    batcher.start()
    running = asyncio.ensure_future(batcher.submit(rows(1), 1))
    await asyncio.sleep(0.05)
    return batcher, running


def test_full_queue_is_refused_with_a_retry_hint():
    model = RecordingModel()
    model.release.clear()                  # the model blocks, so the queue fills

    async def main():
        batcher, running = await one_running(model, max_queue_size=2)
        queued = [asyncio.ensure_future(batcher.submit(rows(1), 1)) for _ in range(2)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull) as info:
            await batcher.submit(rows(1), 1)
        model.release.set()
        await asyncio.gather(running, *queued)   # nothing accepted is lost
        await batcher.close()
        return info.value
    err = run(main())
    assert err.retry_after_s > 0


def test_the_slices_of_one_request_queue_all_or_none():
    """A request cut in slices (a large sampler request) is refused whole when the queue cannot
    take every slice: no slice of a refused request computes. An empty queue takes any request."""
    model = RecordingModel()
    model.release.clear()

    async def main():
        batcher, running = await one_running(model, max_queue_size=3)
        queued = asyncio.ensure_future(batcher.submit(rows(1, 2.0), 1))
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):                  # 1 queued + 3 slices > 3
            batcher.submit_all([(rows(1, 9.0), 1)] * 3)
        assert batcher.queue_depth == 1                 # nothing of the refused request stayed
        fits = batcher.submit_all([(rows(1, 3.0), 1)] * 2)
        model.release.set()
        await asyncio.gather(running, queued, *fits)
        big = await asyncio.gather(*batcher.submit_all([(rows(1, 4.0), 1)] * 5))   # > max_queue_size, queue empty
        await batcher.close()
        return big
    big = run(main())
    assert len(big) == 5
    assert 9.0 not in model.seen_values


def test_expired_request_is_answered_504_without_computing():
    model = RecordingModel()
    model.release.clear()

    async def main():
        batcher, blocker = await one_running(model, max_queue_size=10)
        late = asyncio.ensure_future(batcher.submit(rows(1, 7.0), 1, deadline=time.perf_counter() + 0.01))
        await asyncio.sleep(0.05)
        model.release.set()
        await blocker
        with pytest.raises(DeadlineExceeded):
            await late
        await batcher.close()
    run(main())
    assert model.batch_rows == [1]         # the expired request never reached the model


def test_a_poisoned_request_fails_alone():
    model = RecordingModel()

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=8, max_queue_delay_ms=30, max_queue_size=10)
        batcher.start()
        futures = [batcher.submit(rows(1, float("nan") if i == 2 else 1.0), 1) for i in range(5)]
        results = await asyncio.gather(*futures, return_exceptions=True)
        await batcher.close()
        return results
    results = run(main())
    assert isinstance(results[2], ValueError)
    assert all(isinstance(r, dict) for i, r in enumerate(results) if i != 2)


def test_close_drains_accepted_work_then_refuses():
    model = RecordingModel(delay_s=0.02)

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=10)
        batcher.start()
        accepted = [asyncio.ensure_future(batcher.submit(rows(1), 1)) for _ in range(5)]
        await asyncio.sleep(0)
        await batcher.close(drain_timeout_s=5)
        with pytest.raises(Closed):
            await batcher.submit(rows(1), 1)
        return await asyncio.gather(*accepted)
    assert len(run(main())) == 5


async def drained_batcher() -> DynamicBatcher:
    """A started batcher over a ~20 ms-a-batch model (at most 2 rows: ~100 rows/s), bounded at
    100 ms of expected wait, that has measured its drain rate."""
    batcher = DynamicBatcher(RecordingModel(delay_s=0.02), max_batch_size=2, max_queue_delay_ms=0,
                             max_queue_size=1000, max_queue_wait_ms=100)
    batcher.start()
    for _ in range(5):
        await asyncio.gather(batcher.submit(rows(1), 1), batcher.submit(rows(1), 1))
    return batcher


def test_the_queue_is_bounded_by_expected_wait_and_the_refusal_says_when_to_retry():
    """Requests ahead / the measured drain rate: a request that would wait longer than
    max_queue_wait_ms, or past its own deadline, is refused before it is queued."""
    async def main():
        batcher = await drained_batcher()
        accepted = [asyncio.ensure_future(batcher.submit(rows(1), 1)) for _ in range(40)]
        await asyncio.sleep(0)
        waits = batcher.expected_wait_s()
        with pytest.raises(QueueFull) as refused:
            batcher.admit()
        # the deadline bounds too: a request with 10 ms left is refused at a far shorter queue
        await asyncio.gather(*accepted, return_exceptions=True)
        early = [asyncio.ensure_future(batcher.submit(rows(1), 1)) for _ in range(4)]
        await asyncio.sleep(0)
        with pytest.raises(QueueFull):
            batcher.admit(time.perf_counter() + 0.01)
        with batcher.admit(time.perf_counter() + 5):    # the same queue admits a patient request
            pass
        results = await asyncio.gather(*early)
        await batcher.close()
        return accepted, waits, refused.value, results
    accepted, waits, refused, results = run(main())
    # the submits past the bound were refused at once; those queued before it all ran
    outcomes = [f.exception() if f.exception() else "ok" for f in accepted]
    taken = outcomes.count("ok")
    assert 5 <= taken < 40 and all(isinstance(o, QueueFull) for o in outcomes[taken:])
    assert waits > 0.1 and refused.retry_after_s == pytest.approx(waits - 0.1, rel=0.01)
    assert len(results) == 4


def test_requests_admitted_but_not_yet_queued_count_against_the_next():
    """Admission comes before the body is read, so a flood arrives while the queue is still empty:
    each admitted request holds a place until it is queued, else an empty queue admits them all."""
    async def main():
        batcher = await drained_batcher()
        held = []
        with pytest.raises(QueueFull):
            for _ in range(100):                        # bodies still being read: nothing queued yet
                held.append(batcher.admit())
        admitted = len(held)
        for place in held[:admitted // 2]:              # half give up (client gone, bad body)
            place.release()
            place.release()                             # releasing twice frees one place
        with batcher.admit():                           # their places are free again
            pass
        for place in held[admitted // 2:]:              # the rest are queued: no longer reserved
            with place:
                pass
        queued = [asyncio.ensure_future(batcher.submit(rows(1), 1)) for _ in range(admitted - admitted // 2)]
        await asyncio.sleep(0)
        wait = batcher.expected_wait_s()
        await asyncio.gather(*queued)
        await batcher.close()
        return admitted, wait
    admitted, wait = run(main())
    # ~100 rows/s and a 100 ms bound: about 10 places (the measured rate is approximate)
    assert 5 <= admitted <= 20
    assert 0.03 < wait < 0.2


def test_an_empty_queue_admits_anything():
    async def main():
        batcher = DynamicBatcher(RecordingModel(), max_batch_size=2, max_queue_delay_ms=0, max_queue_size=1,
                                 max_queue_wait_ms=0.001)
        batcher.start()
        with batcher.admit(time.perf_counter() - 1):    # even a request past its deadline: the queue says nothing
            pass
        out = await batcher.submit(rows(2), 2)
        await batcher.close()
        return out
    assert run(main())["y"].shape == (2, 3)


def test_requests_of_different_shapes_are_batched_apart_in_arrival_order():
    model = RecordingModel()

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=16, max_queue_delay_ms=50, max_queue_size=100)
        batcher.start()
        wide = {"x": np.full((1, 5), 3.0, dtype=np.float32)}
        results = await asyncio.gather(batcher.submit(rows(1, 1.0), 1), batcher.submit(rows(2, 2.0), 2),
                                       batcher.submit(wide, 1), batcher.submit(rows(1, 4.0), 1))
        await batcher.close()
        return results
    results = run(main())
    assert model.batch_rows == [3, 1, 1]            # (1+2 rows of width 3), the width-5 one, then the last
    assert results[2]["y"].shape == (1, 5) and results[3]["y"][0, 0] == 8.0


def test_a_flood_of_429s_logs_one_line_a_second_per_model_with_the_count_left_out():
    from serve.errors import ShedLog

    log = ShedLog()
    assert log.shed("a", now=100.0) == 0                       # the first is logged
    assert [log.shed("a", now=100.0 + i / 10) for i in range(1, 6)] == [None] * 5
    assert log.shed("b", now=100.2) == 0                       # another model has its own line
    assert log.shed("a", now=101.0) == 5                       # a second later: logged, with the 5 left out
    assert log.shed("a", now=101.5) is None


# ---- the collector's decision -------------------------------------------------------------------

def cut_in(requests=3, rows=3, waited=0.0, busy=0, instances=1, last=5, closing=False, running=None) -> float:
    """time_to_cut with max_batch_size 8 and a 10 ms delay window; by default three one-row
    requests just queued, under load (the previous batch had five), nothing running (and, when
    `busy`, full batches of 8 running unless `running` says how many rows the smallest holds)."""
    smallest = 0 if not busy else (8 if running is None else running)
    return time_to_cut(requests, rows, waited, busy, instances, max_batch_size=8, delay_s=0.010,
                       last_batch_requests=last, closing=closing, smallest_running_rows=smallest)


def test_the_decision_waits_for_an_event_when_nothing_can_start():
    assert cut_in(requests=0, rows=0) == math.inf                         # an empty queue: a submit
    assert cut_in(requests=0, rows=0, closing=True) == math.inf
    # every instance busy: a finished batch, whatever is queued (full, waited, lone, closing)
    for kwargs in ({}, {"rows": 8}, {"waited": 1.0}, {"requests": 1, "rows": 1, "last": 1}, {"closing": True}):
        assert cut_in(busy=1, **kwargs) == math.inf
        assert cut_in(busy=3, instances=3, **kwargs) == math.inf


def test_the_decision_cuts_at_once_without_load_when_full_or_closing():
    assert cut_in(requests=1, rows=1, last=1) == 0.0          # a lone request after a batch of one
    assert cut_in(requests=1, rows=1, last=0) == 0.0          # the first request of all
    assert cut_in(requests=1, rows=1, last=1, busy=1, instances=2) == 0.0   # on a free instance too
    assert cut_in(rows=8) == 0.0 and cut_in(rows=12) == 0.0   # a full batch (rows, not requests)
    assert cut_in(rows=8, busy=1, instances=2) == 0.0         # a further instance takes a full batch
    assert cut_in(closing=True) == 0.0                        # draining skips the window
    assert cut_in(closing=True, busy=1, instances=2) == 0.0


def test_the_decision_holds_the_delay_window_then_a_partial_batch_waits_for_the_others():
    assert cut_in() == pytest.approx(0.010)                   # under load: the window opens
    assert cut_in(requests=1, rows=1) == pytest.approx(0.010) # a lone request after a batch of five too
    assert cut_in(waited=0.004) == pytest.approx(0.006)       # what is left of it
    assert cut_in(waited=0.010) == 0.0                        # over: the partial batch goes
    assert cut_in(waited=0.004, busy=1, instances=2) == pytest.approx(0.006)
    # past the window a batch smaller than the smallest one running does not take a further
    # instance: it waits for it to grow (to that size or full) or for the running ones to finish
    assert cut_in(waited=0.020, busy=1, instances=2) == math.inf
    assert cut_in(waited=0.020, busy=2, instances=4) == math.inf
    assert cut_in(waited=0.020, busy=1, instances=2, running=4) == math.inf
    # as large as the smallest running batch: it goes (two batches of 4 alternate on two instances)
    assert cut_in(requests=4, rows=4, waited=0.020, busy=1, instances=2, running=4) == 0.0
    assert cut_in(requests=5, rows=5, waited=0.020, busy=2, instances=3, running=5) == 0.0
    assert cut_in(requests=4, rows=4, waited=0.004, busy=1, instances=2, running=4) == pytest.approx(0.006)
    assert time_to_cut(3, 3, 0.0, 0, 1, 8, 0.0, 5, False, 0) == 0.0   # no window configured


@pytest.mark.parametrize("arrival", ["to an empty queue", "filling the batch"])
def test_a_request_queued_while_the_collector_decides_is_not_left_waiting(monkeypatch, arrival):
    """The request arrives after the collector read the queue and before it sleeps (here: inside
    the decision, on the decision's stale answer); its wake-up must not be lost."""
    model = RecordingModel()
    decide, arrived, late = time_to_cut, [], []

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=4, max_queue_delay_ms=60_000, max_queue_size=10)
        if arrival == "filling the batch":
            batcher._last_batch_requests = 4        # under load, so three requests hold a window open
            arrived.extend(batcher.submit_all([(rows(1), 1)] * 3))

        def deciding(*args, **kwargs):
            answer = decide(*args, **kwargs)        # inf, or the minute-long window
            if answer > 0 and not late:             # once: the rows that make the batch full
                late.extend(batcher.submit_all([(rows(4 - len(arrived)), 4 - len(arrived))]))
            return answer

        monkeypatch.setattr(serve.batching, "time_to_cut", deciding)
        batcher.start()
        await asyncio.sleep(0)                      # the collector runs and decides
        await asyncio.wait_for(asyncio.gather(*arrived, *late), 2)     # not the window's minute
        await batcher.close()
    run(main())
    assert model.batch_rows == [4]


def test_a_finished_instance_starts_the_next_batch_before_its_requests_are_answered():
    """The loop answers a finished batch request by request; the instance must not wait for that
    (it idled 14-16 % of the time at 128 clients when the collector cut after the answers)."""
    model = RecordingModel()
    model.release.clear()
    queued_when_answered = []

    async def main():
        batcher = DynamicBatcher(model, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=10, instances=2)
        batcher._mean_batch_s = 1.0                 # a slow model: batches go to the instances' threads
        batcher.start()

        async def request(value):
            out = await batcher.submit(rows(1, value), 1)
            queued_when_answered.append(batcher.queue_depth)
            return out

        first = [asyncio.ensure_future(request(v)) for v in (1, 2, 3, 4)]   # two batches, both instances
        await asyncio.sleep(0.05)
        third = [asyncio.ensure_future(request(v)) for v in (5, 6)]        # queued: no instance free
        await asyncio.sleep(0.05)
        assert batcher.queue_depth == 2
        model.release.set()
        await asyncio.gather(*first, *third)
        await batcher.close()
    run(main())
    assert sorted(model.batch_rows) == [2, 2, 2]
    assert queued_when_answered[0] == 0             # the third batch had left before any answer
