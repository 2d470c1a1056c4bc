"""Execution instances (issue 16 §1): batches of one classify model run side by side, how many is
chosen from model.json, the server's setting or the machine, /config says so, and a changed
instance_group reloads the version while it keeps answering."""

from __future__ import annotations

import asyncio
import threading
import time

import httpx
import numpy as np
import pytest

from model_registry import InstanceGroup, Registry
import serve.batching
from serve.batching import DynamicBatcher
from serve.instances import choose, usable_cores


class MeetingModel:
    """Each batch waits (up to 5 s) until `parties` batches are inside at once, then doubles its
    input: it answers only where that many batches run side by side. Records the most seen at once."""

    def __init__(self, parties: int):
        self.barrier = threading.Barrier(parties, timeout=5)
        self.lock = threading.Lock()
        self.inside = self.most_inside = 0

    def __call__(self, inputs):
        with self.lock:
            self.inside += 1
            self.most_inside = max(self.most_inside, self.inside)
        try:
            self.barrier.wait()
            return {"y": inputs["x"] * 2}
        finally:
            with self.lock:
                self.inside -= 1


def rows(n: int, value: float) -> dict[str, np.ndarray]:
    return {"x": np.full((n, 3), value, dtype=np.float32)}


async def _two_full_batches(instances: int, model) -> list:
    batcher = DynamicBatcher(model, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=100, instances=instances,
                             inline_below_ms=0)
    batcher.start()
    try:
        return await asyncio.gather(*(batcher.submit(rows(1, float(i)), 1) for i in range(4)),
                                    return_exceptions=True)
    finally:
        await batcher.close()


def test_two_instances_run_two_batches_at_the_same_time():
    model = MeetingModel(parties=2)
    results = asyncio.run(_two_full_batches(2, model))
    assert model.most_inside == 2
    for i, out in enumerate(results):
        assert not isinstance(out, BaseException), out
        np.testing.assert_array_equal(out["y"], np.full((1, 3), 2.0 * i))


def test_one_instance_never_runs_two_batches_at_once():
    model = MeetingModel(parties=2)          # cannot be met with one instance: the barrier breaks
    started = time.perf_counter()
    results = asyncio.run(_two_full_batches(1, model))
    assert model.most_inside == 1
    assert all(isinstance(r, threading.BrokenBarrierError) for r in results)
    assert time.perf_counter() - started >= 5        # each batch waited for a partner that never came


def test_close_waits_for_the_batches_still_running_on_other_instances():
    release = threading.Event()
    finished = []

    def slow(inputs):
        release.wait(5)
        finished.append(len(inputs["x"]))
        return {"y": inputs["x"]}

    async def main():
        batcher = DynamicBatcher(slow, max_batch_size=1, max_queue_delay_ms=0, max_queue_size=10, instances=3,
                                 inline_below_ms=0)
        batcher.start()
        futures = [asyncio.ensure_future(batcher.submit(rows(1, i), 1)) for i in range(3)]
        await asyncio.sleep(0.1)
        assert batcher.in_flight == 3                # three batches running at once
        closing = asyncio.ensure_future(batcher.close())
        await asyncio.sleep(0.1)
        assert not closing.done()                    # it waits for them
        release.set()
        await closing
        return await asyncio.gather(*futures)
    results = asyncio.run(main())
    assert finished == [1, 1, 1] and len(results) == 3


def test_the_collector_sleeps_while_nothing_may_start_and_a_partial_batch_waits_for_the_others(monkeypatch):
    """Requests queued while every instance is busy, then a partial batch while another runs: the
    collector takes no decision until something changes (no spinning), and the partial batch starts
    only once the running batches are done (a further instance takes a batch as large as the
    smallest one running, or a full one)."""
    gate = threading.Semaphore(0)            # each release lets one running batch finish
    started: list[int] = []

    def gated(inputs):
        started.append(len(inputs["x"]))
        gate.acquire(timeout=5)
        return {"y": inputs["x"] * 2}

    decisions = []
    decide = serve.batching.time_to_cut
    monkeypatch.setattr(serve.batching, "time_to_cut", lambda *a, **k: decisions.append(a) or decide(*a, **k))

    async def until(condition):
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    async def quiet_decisions() -> int:
        """Decisions taken in 0.2 s while nothing changes (after the last change has settled)."""
        await asyncio.sleep(0.05)
        before = len(decisions)
        await asyncio.sleep(0.2)
        return len(decisions) - before

    async def main():
        batcher = DynamicBatcher(gated, max_batch_size=2, max_queue_delay_ms=0, max_queue_size=100, instances=2,
                                 inline_below_ms=0)
        batcher.start()
        futures = [asyncio.ensure_future(batcher.submit(rows(1, i), 1)) for i in range(7)]
        await until(lambda: started == [2, 2])          # both instances busy, three requests queued
        assert batcher.queue_depth == 3
        assert await quiet_decisions() == 0
        gate.release()                                  # one finishes: the full batch of the three goes
        await until(lambda: started == [2, 2, 2])
        gate.release()                                  # another: one instance free, a lone request
        await until(lambda: batcher.in_flight == 3)     # left after a batch of two
        assert await quiet_decisions() == 0 and started == [2, 2, 2]   # it waits for the running batch
        gate.release()
        await until(lambda: started == [2, 2, 2, 1])
        gate.release()
        results = await asyncio.gather(*futures)
        await batcher.close()
        return results, len(decisions)
    results, total = asyncio.run(main())
    for i, out in enumerate(results):
        np.testing.assert_array_equal(out["y"], np.full((1, 3), 2.0 * i))
    assert total < 20                                   # a few per change, not a loop


def test_a_request_left_over_after_a_full_cut_does_not_take_a_further_instance():
    """After a batch of one, five requests arrive at once: four fill a batch, and the fifth is no
    lone request (the batch just cut had four), so it waits for that batch rather than starting
    on the free instance."""
    gate = threading.Semaphore(0)
    started: list[int] = []

    def gated(inputs):
        started.append(len(inputs["x"]))
        gate.acquire(timeout=5)
        return {"y": inputs["x"] * 2}

    async def main():
        batcher = DynamicBatcher(gated, max_batch_size=4, max_queue_delay_ms=0, max_queue_size=100, instances=2,
                                 inline_below_ms=0)
        batcher.start()
        gate.release()
        await batcher.submit(rows(1, 0.0), 1)             # a batch of one: no load
        futures = [asyncio.ensure_future(batcher.submit(rows(1, i), 1)) for i in range(5)]
        await asyncio.sleep(0.2)
        running = list(started)
        gate.release()
        gate.release()
        await asyncio.gather(*futures)
        await batcher.close()
        return running
    assert asyncio.run(main()) == [1, 4]
    assert started == [1, 4, 1]


def test_a_batch_as_large_as_the_running_one_starts_beside_it():
    """Fewer clients than two full batches (the closed loop of bench/instances.py at 32 clients,
    max_batch_size 32): a batch of three runs, three more queue, and they start on the second
    instance at once, without waiting for a full batch or for the first to finish."""
    gate = threading.Semaphore(0)
    started: list[int] = []

    def gated(inputs):
        started.append(len(inputs["x"]))
        gate.acquire(timeout=5)
        return {"y": inputs["x"] * 2}

    async def main():
        batcher = DynamicBatcher(gated, max_batch_size=8, max_queue_delay_ms=0, max_queue_size=100, instances=2,
                                 inline_below_ms=0)
        batcher.start()
        first = [asyncio.ensure_future(batcher.submit(rows(1, i), 1)) for i in range(3)]
        await asyncio.sleep(0.1)
        second = [asyncio.ensure_future(batcher.submit(rows(1, i), 1)) for i in range(2)]
        await asyncio.sleep(0.1)
        two_queued = list(started)                     # two rows queued beside a running three: they wait
        second.append(asyncio.ensure_future(batcher.submit(rows(1, 2), 1)))
        await asyncio.sleep(0.1)
        three_queued = list(started)
        for _ in range(2):
            gate.release()
        await asyncio.gather(*first, *second)
        await batcher.close()
        return two_queued, three_queued
    assert asyncio.run(main()) == ([3], [3, 3])


def test_expected_wait_counts_the_instances():
    """The admission estimate drains n times faster with n instances (no cycle measured yet)."""
    one = DynamicBatcher(lambda x: x, 8, 0, 100, instances=1)
    four = DynamicBatcher(lambda x: x, 8, 0, 100, instances=4)
    for b in (one, four):     # 8-row batches of 10 ms measured, one request queued
        b._mean_batch_s, b._mean_batch_rows = 0.010, 8.0
        b._queue.append(None)
    assert four.expected_wait_s(reserved=7) == pytest.approx(one.expected_wait_s(reserved=7) / 4)


def test_instances_must_be_positive():
    with pytest.raises(ValueError, match="instances must be 1 or more"):
        DynamicBatcher(lambda x: x, 8, 0, 100, instances=0)


# ---- the choice ---------------------------------------------------------------------------------

def test_choice_order_model_json_then_server_setting_then_the_cores():
    assert choose(InstanceGroup(count=3), 2, 1, cores=8).count == 3
    assert choose(InstanceGroup(count=3), 2, 1, cores=8).chosen == "model.json"
    assert choose(InstanceGroup(), 2, 1, cores=8).count == 2
    assert choose(InstanceGroup(), 2, 1, cores=8).chosen == "server setting"
    auto = choose(InstanceGroup(), None, 1, cores=8)      # one core left to the event loop
    assert (auto.count, auto.intra_op_threads) == (7, 1) and auto.chosen.startswith("auto")
    # intra-op threads per instance share the cores out: (9 cores - 1) / 2 threads = 4 instances
    assert choose(InstanceGroup(intra_op_threads=2), None, 1, cores=9).count == 4
    assert choose(InstanceGroup(), None, 1, cores=2).count == 1          # 2 cores: one, as before
    assert choose(InstanceGroup(), None, 4, cores=2).count == 1          # never fewer than one


def test_workers_share_the_cores_their_loops_leave():
    # 16 cores, 4 worker processes: 12 left to the models, 3 instances in each worker
    assert choose(InstanceGroup(), None, 1, cores=16, workers=4).count == 3
    assert "4 workers" in choose(InstanceGroup(), None, 1, cores=16, workers=4).chosen
    assert choose(InstanceGroup(), None, 1, cores=2, workers=2).count == 1      # at least one each
    assert choose(InstanceGroup(count=2), None, 1, cores=2, workers=2).count == 2   # model.json still wins


def test_usable_cores_follows_the_cgroup_quota(tmp_path):
    affinity = usable_cores(tmp_path / "absent")
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")          # 1.5 CPUs: rounds up to 2
    assert usable_cores(quota) == min(affinity, 2)
    quota.write_text("max 100000\n")
    assert usable_cores(quota) == affinity


def test_instance_group_is_validated():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="count"):
        InstanceGroup(count=0)
    with pytest.raises(ValidationError, match="extra"):
        InstanceGroup.model_validate({"count": 2, "kind": "KIND_GPU"})


# ---- the server ---------------------------------------------------------------------------------

def _config(server, model: str = "mlp-digits") -> dict:
    r = httpx.get(f"{server.url}/v2/models/{model}/config", timeout=5)
    assert r.status_code == 200, r.text
    return r.json()


def _digit_request() -> dict:
    from sklearn.datasets import load_digits

    image = load_digits().images[0].astype(np.float32)
    return {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": image.ravel().tolist()}]}


@pytest.mark.slow
def test_the_server_setting_and_model_json_choose_the_instances(registry_copy, start_server):
    with start_server(registry_copy, ["--instances", "2"]) as server:
        config = _config(server)
        assert config["instance_group"][0]["count"] == 2
        assert config["parameters"]["instance_count_chosen_by"]["string_value"] == "server setting"
        assert config["parameters"]["intra_op_threads"]["int64_param"] == 1
        other = _config(server, "resnet-digits")
        assert other["instance_group"][0]["count"] == 2

    registry = Registry(registry_copy)
    cfg = registry.model_config("mlp-digits")
    registry.write_model_config(cfg.model_copy(update={"instance_group": InstanceGroup(count=3)}))
    with start_server(registry_copy) as server:
        config = _config(server)
        assert config["instance_group"][0]["count"] == 3
        assert config["parameters"]["instance_count_chosen_by"]["string_value"] == "model.json"
        auto = _config(server, "resnet-digits")      # model.json silent, no server setting: the cores
        assert auto["instance_group"][0]["count"] == max(1, usable_cores() - 1)
        assert auto["parameters"]["instance_count_chosen_by"]["string_value"].startswith("auto")


@pytest.mark.slow
def test_a_changed_instance_group_reloads_the_version_while_it_answers(registry_copy, start_server):
    body = _digit_request()
    with start_server(registry_copy, ["--instances", "1"]) as server:
        url = f"{server.url}/v2/models/mlp-digits/infer"
        expected = httpx.post(url, json=body, timeout=5).json()["outputs"][0]["data"]
        registry = Registry(registry_copy)
        cfg = registry.model_config("mlp-digits")
        registry.write_model_config(cfg.model_copy(update={"instance_group": InstanceGroup(count=4)}))
        statuses, deadline = [], time.monotonic() + 20
        while time.monotonic() < deadline:
            r = httpx.post(url, json=body, timeout=5)
            statuses.append(r.status_code)
            assert r.json()["outputs"][0]["data"] == expected
            if _config(server)["instance_group"][0]["count"] == 4:
                break
        assert _config(server)["instance_group"][0]["count"] == 4, server.logs()[-2000:]
        assert set(statuses) == {200}
        for _ in range(20):                          # and the reloaded version answers the same
            r = httpx.post(url, json=body, timeout=5)
            assert r.status_code == 200 and r.json()["outputs"][0]["data"] == expected
