"""PrometheusSource against a real Prometheus scraping a real zooserve server: the same counters as
scraping the server directly, Prometheus' own histogram_quantile equal to the judge's, and one
controller window judged from Prometheus' numbers.

Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`, 2.42); skipped without it.
"""

from __future__ import annotations

import math
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import numpy as np
import pytest
from sklearn.datasets import load_digits

from model_registry import Registry, Rollout
from serve.judge import histogram_quantile
from serve.rollout import PrometheusSource, RolloutController, ServerMetricsSource
from tests.prometheus_helpers import PROMETHEUS_MISSING, SKIP_REASON, running_prometheus

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PROMETHEUS_MISSING, reason=SKIP_REASON),
]

MODEL = "mlp-digits"
ARMS = {1: "stable", 2: "canary"}
IMAGES = load_digits().images.astype(np.float32)


def infer(server_url: str, version: int, count: int, bad: int = 0) -> None:
    """`count` good requests to one version, then `bad` malformed ones (answered 400)."""
    url = f"{server_url}/v2/models/{MODEL}/versions/{version}/infer"
    with httpx.Client(timeout=30) as client:
        for i in range(count):
            body = {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                "data": IMAGES[i % len(IMAGES)].flatten().tolist()}]}
            assert client.post(url, json=body).status_code == 200
        for _ in range(bad):
            assert client.post(url, json={"inputs": []}).status_code == 400


@pytest.fixture
def prometheus_for(tmp_path):
    """`prometheus_for(server) -> url`: start a Prometheus scraping that server; stopped at the end."""
    with ExitStack() as stack:
        def start(server) -> str:
            folder = tmp_path / f"prometheus-{server.port}"
            return stack.enter_context(running_prometheus(folder, [f"127.0.0.1:{server.port}"]))

        yield start


def wait_until_prometheus_agrees(prometheus: PrometheusSource, direct: ServerMetricsSource, timeout_s: float = 30):
    """Both snapshots once Prometheus has scraped the latest counters (scrape interval 1 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        expected, seen = direct.snapshot(MODEL, ARMS), prometheus.snapshot(MODEL, ARMS)
        if seen == expected or time.monotonic() > deadline:
            return seen, expected
        time.sleep(0.5)


@pytest.fixture
def two_versions(registry_copy) -> Path:
    registry = Registry(registry_copy)
    assert registry.publish(MODEL, registry_copy / MODEL / "1") == 2      # the same weights as version 2
    registry.set_alias(MODEL, "canary", 2)
    return registry_copy


def test_prometheus_source_matches_the_servers_own_counters(two_versions, start_server, prometheus_for):
    with start_server(two_versions) as server:
        prometheus = PrometheusSource(prometheus_for(server))
        direct = ServerMetricsSource([server.url])
        infer(server.url, 1, 60, bad=3)
        infer(server.url, 2, 25, bad=1)
        seen, expected = wait_until_prometheus_agrees(prometheus, direct)
    assert seen == expected
    assert (expected[1].requests, expected[2].requests) == (63, 26)
    assert expected[1].latency[math.inf] == 63 and expected[1].errors == 0


def test_prometheus_histogram_quantile_equals_the_judges(two_versions, start_server, prometheus_for):
    with start_server(two_versions) as server:
        url = prometheus_for(server)
        infer(server.url, 1, 80)
        seen, _ = wait_until_prometheus_agrees(PrometheusSource(url), ServerMetricsSource([server.url]))
        promql = (f'histogram_quantile(0.99, sum by (le) '
                  f'(zooserve_request_duration_seconds_bucket{{model="{MODEL}",version="1"}}))')
        body = httpx.get(f"{url}/api/v1/query", params={"query": promql}).json()
    assert body["status"] == "success", body
    theirs = float(body["data"]["result"][0]["value"][1])
    assert histogram_quantile(0.99, seen[1].latency) == pytest.approx(theirs, rel=1e-9)


def test_the_controller_steps_on_prometheus_numbers(two_versions, start_server, prometheus_for):
    registry = Registry(two_versions)
    # the plumbing is under test here, not the judge: sub-millisecond latencies on a busy machine
    # may drift a bucket, so the p99 limit is wide
    registry.start_rollout(MODEL, Rollout(canary="canary", interval_s=30, min_requests=20,
                                          max_p99_ratio=10.0), now=0.0)
    clock = [0.0]
    # this test's controller drives the rollout: the server's own (embedded) one stays off
    with start_server(two_versions, env={"ZOOSERVE_ROLLOUT_CONTROLLER": "false"}) as server:
        prometheus = PrometheusSource(prometheus_for(server))
        controller = RolloutController(registry, prometheus, owner="test", clock=lambda: clock[0])
        # a version's first requests are slow (runtime warm-up) and would weigh more in the small canary
        # arm; a rollout starts once the canary is warm, so warm both before the window opens
        infer(server.url, 1, 5)
        infer(server.url, 2, 5)
        wait_until_prometheus_agrees(prometheus, ServerMetricsSource([server.url]))
        assert controller.tick() == {}                       # the window opens on Prometheus' numbers
        for _ in range(10):                                  # interleaved, as a split serves them
            infer(server.url, 1, 8)
            infer(server.url, 2, 3)
        wait_until_prometheus_agrees(prometheus, ServerMetricsSource([server.url]))
        clock[0] = 30.0
        decision = controller.tick()["mlp-digits"]
    assert decision.action == "step", decision.reason
    assert "(0/30)" in decision.reason and "(0/80)" in decision.reason
    assert registry.model_config(MODEL).rollout.status.weight == 25
