"""One /metrics over several worker processes: the merge rules (serve/worker_metrics.py)."""

from __future__ import annotations

import os

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve.metrics import Metrics
from serve.sequence_store import SequenceStore, UnknownSequence
from serve.worker_metrics import SharedMetrics, merge, merge_stats
from serve.workers import MAX_DELAY_S, next_delay


def worker_text(ok: int, queue: int, ready: int, slots: float, latency_sum: float) -> str:
    return f"""# HELP zooserve_requests Inference requests by outcome
# TYPE zooserve_requests counter
zooserve_requests_total{{model="m",version="1",status="200"}} {ok}
# HELP zooserve_request_duration_seconds End-to-end request time
# TYPE zooserve_request_duration_seconds histogram
zooserve_request_duration_seconds_bucket{{model="m",version="1",le="0.01"}} {ok - 1}
zooserve_request_duration_seconds_bucket{{model="m",version="1",le="+Inf"}} {ok}
zooserve_request_duration_seconds_count{{model="m",version="1"}} {ok}
zooserve_request_duration_seconds_sum{{model="m",version="1"}} {latency_sum}
# HELP zooserve_queue_depth Requests waiting for a batch
# TYPE zooserve_queue_depth gauge
zooserve_queue_depth{{model="m",version="1"}} {queue}
# HELP zooserve_model_ready 1 when the version serves, else 0
# TYPE zooserve_model_ready gauge
zooserve_model_ready{{model="m",version="1"}} {ready}
# HELP zooserve_state_slots_used_ratio Share of state slots in use
# TYPE zooserve_state_slots_used_ratio gauge
zooserve_state_slots_used_ratio{{model="m",version="1"}} {slots}
"""


def samples(families) -> dict[tuple, float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def value(found: dict, name: str, **labels) -> float:
    return found[(name, tuple(sorted({"model": "m", "version": "1", **labels}.items())))]


def test_counters_and_histograms_sum_every_worker_gauges_only_the_live_ones():
    merged = samples(merge([(worker_text(10, 3, 1, 0.5, 0.25), True),
                            (worker_text(20, 4, 0, 0.25, 0.5), True),
                            (worker_text(7, 100, 1, 1.0, 9.0), False)]))      # a dead worker's last file
    assert value(merged, "zooserve_requests_total", status="200") == 37            # its requests happened
    assert value(merged, "zooserve_request_duration_seconds_bucket", le="0.01") == 34
    assert value(merged, "zooserve_request_duration_seconds_count") == 37
    assert value(merged, "zooserve_request_duration_seconds_sum") == pytest.approx(9.75)
    assert value(merged, "zooserve_queue_depth") == 7                              # live ones only, summed
    assert value(merged, "zooserve_model_ready") == 0                              # one live worker is not ready
    assert value(merged, "zooserve_state_slots_used_ratio") == pytest.approx(0.375)  # the mean
    assert merged[("zooserve_workers", ())] == 2


def test_the_merged_text_parses_and_keeps_the_one_process_names(tmp_path):
    one, two = Metrics(tmp_path), Metrics(tmp_path)
    two.shared.pid = 1                                   # another live process (init) as the second worker
    two.shared.path = tmp_path / "1.prom"
    for metrics, n in ((one, 3), (two, 5)):
        series = metrics.for_model("m", 1)
        for _ in range(n):
            series.request_done(200, 0.004)
    two.shared.publish()
    text = one.exposition().decode()
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    merged = samples(parsed.values())
    assert value(merged, "zooserve_requests_total", status="200") == 8
    assert value(merged, "zooserve_request_duration_seconds_count") == 8
    assert merged[("zooserve_workers", ())] == 2
    assert parsed["zooserve_requests"].type == "counter"
    # a lone server's exposition has the same families, less the worker count
    assert set(parsed) - {f.name for f in text_string_to_metric_families(Metrics().exposition().decode())} \
        == {"zooserve_workers"}
    # and the rollout controller reads the same merged families
    assert value(samples(one.families()), "zooserve_requests_total", status="200") == 8


def test_a_worker_publishes_atomically(tmp_path):
    shared = SharedMetrics(tmp_path, Metrics().registry, pid=os.getpid())
    shared.publish()
    assert [p.name for p in tmp_path.iterdir()] == [f"{os.getpid()}.prom"]


def test_an_unknown_sequence_in_a_server_of_workers_says_where_its_state_lives():
    with pytest.raises(UnknownSequence, match="2 worker processes.*one keep-alive connection"):
        SequenceStore(60, 8, workers=2).get("s")
    with pytest.raises(UnknownSequence) as lone:
        SequenceStore(60, 8).get("s")
    assert "worker" not in str(lone.value)


def test_a_worker_that_keeps_dying_young_is_restarted_ever_more_slowly():
    assert next_delay(lived_s=3600, previous_s=8) == 0            # served a while: at once
    delays, previous = [], 0.0
    for _ in range(8):
        previous = next_delay(lived_s=2, previous_s=previous)
        delays.append(previous)
    assert delays == [1, 2, 4, 8, 16, MAX_DELAY_S, MAX_DELAY_S, MAX_DELAY_S]


def stats_row(success: int, last: int, batches: dict[int, int]) -> dict:
    return {"name": "m", "version": "1", "last_inference": last, "inference_count": success,
            "inference_stats": {"success": {"count": success, "ns": 1000 * success}},
            "batch_stats": [{"batch_size": size, "compute_infer": {"count": n, "ns": 10 * n}}
                            for size, n in batches.items()]}


def test_statistics_of_workers_are_summed_the_latest_inference_kept():
    merged = merge_stats([[stats_row(3, 100, {1: 3})], [stats_row(5, 250, {1: 1, 4: 1})],
                          [{**stats_row(2, 50, {2: 1}), "version": "2"}]])
    assert [(r["name"], r["version"]) for r in merged] == [("m", "1"), ("m", "2")]
    one = merged[0]
    assert one["inference_count"] == 8 and one["last_inference"] == 250
    assert one["inference_stats"]["success"] == {"count": 8, "ns": 8000}
    assert one["batch_stats"] == [{"batch_size": 1, "compute_infer": {"count": 4, "ns": 40}},
                                  {"batch_size": 4, "compute_infer": {"count": 1, "ns": 10}}]
