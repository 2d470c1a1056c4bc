"""serve.rollout against a real Registry in tmp_path: the controller steps, promotes, rolls back, waits,
holds, respects the lease and manual changes; the metric sources read the server's real metrics; the
`zooserve rollout` command through subprocess."""

from __future__ import annotations

import asyncio
import json
import logging
import math
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from model_registry import Manifest, Registry, Rollout, Signature, TensorSpec, dump_json
from model_registry.routing import RolloutStatus
from serve.judge import Verdict
from serve.metrics import LATENCY_BUCKETS, Metrics
from serve.rollout import (
    ArmCounters,
    InProcessSource,
    MetricsError,
    PrometheusSource,
    RolloutController,
    ServerMetricsSource,
    counters_from_families,
    decide,
    rollout_events_counter,
    run,
    window_arms,
)

ROOT = Path(__file__).resolve().parents[2]
MODEL = "digits"
STABLE_V, CANARY_V = 1, 2
INTERVAL = 30.0


# ---- fixtures: a registry with two tiny fake versions --------------------------------------

def make_source(folder: Path, payload: bytes) -> Path:
    """A publishable folder (manifest and a fake artifact): no training needed to test routing."""
    folder.mkdir(parents=True)
    manifest = Manifest(
        family="mlp", kind="classify", format="onnx", artifacts={"onnx": "model.onnx"},
        signature=Signature(inputs=[TensorSpec(name="image", datatype="FP32", shape=[-1, 64])],
                            outputs=[TensorSpec(name="logits", datatype="FP32", shape=[-1, 10])]),
    )
    (folder / "manifest.json").write_text(dump_json(manifest))
    (folder / "model.onnx").write_bytes(payload)
    return folder


@pytest.fixture
def registry(tmp_path) -> Registry:
    registry = Registry(tmp_path / "registry")
    for version, payload in ((STABLE_V, b"old"), (CANARY_V, b"new")):
        assert registry.publish(MODEL, make_source(tmp_path / f"src{version}", payload)) == version
    registry.set_alias(MODEL, "stable", STABLE_V)
    registry.set_alias(MODEL, "canary", CANARY_V)
    return registry


def start(registry: Registry, **limits) -> None:
    registry.start_rollout(MODEL, Rollout(canary="canary", interval_s=INTERVAL, **limits), now=0.0)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeMetrics:
    """A test double of the METRICS only: cumulative counters per version that the test grows."""

    def __init__(self) -> None:
        self.counters = {STABLE_V: ArmCounters(), CANARY_V: ArmCounters()}
        self.before_snapshot = None          # a hook run inside snapshot (something happens meanwhile)
        self.snapshots = 0

    def serve(self, version: int, requests: int, errors: int = 0, latency_s: float = 0.003) -> None:
        """`requests` answered in `latency_s` each, `errors` of them with 500."""
        old = self.counters[version]
        latency = {le: old.latency.get(le, 0.0) + (requests if latency_s <= le else 0)
                   for le in (*LATENCY_BUCKETS, math.inf)}
        self.counters[version] = ArmCounters(old.requests + requests, old.errors + errors, latency)

    def snapshot(self, model, versions):
        self.snapshots += 1
        if self.before_snapshot is not None:
            self.before_snapshot()
        assert model == MODEL and dict(versions) == {STABLE_V: "stable", CANARY_V: "canary"}
        return dict(self.counters)


@pytest.fixture
def metrics() -> FakeMetrics:
    return FakeMetrics()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def events() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def controller(registry, metrics, clock, events) -> RolloutController:
    return RolloutController(registry, metrics, owner="controller-a", clock=clock,
                             events=rollout_events_counter(events))


def good_window(metrics: FakeMetrics, weight: int, total: int = 1000) -> None:
    """Traffic split by `weight`, both arms equally healthy."""
    canary = total * weight // 100
    if total - canary:
        metrics.serve(STABLE_V, total - canary, errors=(total - canary) // 200)
    metrics.serve(CANARY_V, canary, errors=canary // 200)


def status(registry: Registry) -> RolloutStatus:
    return registry.model_config(MODEL).rollout.status


def events_total(events: CollectorRegistry, event: str) -> float:
    return events.get_sample_value("zooserve_rollout_events_total", {"model": MODEL, "event": event}) or 0.0


def model_json(registry: Registry) -> str:
    return (registry.root / MODEL / "model.json").read_text()


# ---- the controller ------------------------------------------------------------------------

def test_steps_through_every_weight_then_promotes(registry, metrics, clock, controller, events):
    start(registry)
    assert controller.tick() == {}                       # opens the first window
    for weight, next_split in ((5, {"stable": 75, "canary": 25}), (25, {"stable": 50, "canary": 50}),
                               (50, {"stable": 0, "canary": 100})):
        good_window(metrics, weight)
        clock.now += INTERVAL
        decision = controller.tick()[MODEL]
        assert decision.action == "step", decision.reason
        assert registry.model_config(MODEL).routing.split == next_split
    good_window(metrics, 100)                            # stable serves nothing: judged against its past
    clock.now += INTERVAL
    assert controller.tick()[MODEL].action == "promote"
    cfg = registry.model_config(MODEL)
    assert cfg.routing.aliases["stable"] == CANARY_V and cfg.routing.split == {"stable": 100}
    assert cfg.rollout.status.state == "promoted"
    assert [(e.event, e.weight) for e in cfg.rollout.status.history] == [
        ("started", 5), ("stepped", 25), ("stepped", 50), ("stepped", 100), ("promoted", 100)]
    assert all(e.at == 30.0 * i for i, e in enumerate(cfg.rollout.status.history))
    assert "window passed at step 1/4 (canary weight 5%)" in cfg.rollout.status.history[1].reason
    assert events_total(events, "stepped") == 3 and events_total(events, "promoted") == 1
    assert registry.lease(MODEL) is None                 # released once the rollout ended
    clock.now += INTERVAL
    assert controller.tick() == {}


def test_rolls_back_at_once_on_errors(registry, metrics, clock, controller, caplog, events):
    start(registry)
    controller.tick()
    metrics.serve(STABLE_V, 950)
    metrics.serve(CANARY_V, 200, errors=20)
    clock.now += INTERVAL
    with caplog.at_level(logging.INFO, logger="zooserve.rollout"):
        assert controller.tick()[MODEL].action == "rollback"
    cfg = registry.model_config(MODEL)
    assert cfg.routing.split == {"stable": 100} and cfg.routing.aliases == {"stable": 1, "canary": 2}
    assert cfg.rollout.status.state == "rolled_back"
    assert "error rate canary 10.00% (20/200)" in cfg.rollout.status.reason
    assert events_total(events, "rolled_back") == 1
    assert any(r.levelname == "WARNING" and "rolled_back" in r.getMessage() for r in caplog.records)


def test_rolls_back_on_latency(registry, metrics, clock, controller):
    start(registry)
    controller.tick()
    metrics.serve(STABLE_V, 950, latency_s=0.003)
    metrics.serve(CANARY_V, 100, latency_s=0.060)
    clock.now += INTERVAL
    assert controller.tick()[MODEL].action == "rollback"
    assert "p99 canary" in status(registry).reason


def test_waits_on_too_few_requests_then_holds(registry, metrics, clock, controller, events):
    start(registry)
    controller.tick()
    before = model_json(registry)
    metrics.serve(STABLE_V, 500)
    metrics.serve(CANARY_V, 10)
    clock.now += INTERVAL
    decision = controller.tick()[MODEL]
    assert decision.action == "wait" and "insufficient sample" in decision.reason
    assert model_json(registry) == before                 # waiting writes nothing
    metrics.serve(CANARY_V, 10)                           # the window keeps growing: 20 now
    clock.now += 8 * INTERVAL
    assert controller.tick()[MODEL].action == "wait"
    clock.now += INTERVAL                                 # 10 intervals without a verdict
    decision = controller.tick()[MODEL]
    assert decision.action == "hold" and "no verdict after 300 s" in decision.reason
    st = status(registry)
    assert st.history[-1].event == "held" and st.step == 0 and st.window_started_at == 300.0
    assert registry.model_config(MODEL).routing.split == {"stable": 95, "canary": 5}
    assert events_total(events, "held") == 1


def test_a_window_that_accumulates_enough_passes(registry, metrics, clock, controller):
    start(registry)
    controller.tick()
    metrics.serve(STABLE_V, 500)
    metrics.serve(CANARY_V, 30)
    clock.now += INTERVAL
    assert controller.tick()[MODEL].action == "wait"
    metrics.serve(STABLE_V, 500)
    metrics.serve(CANARY_V, 30)                           # 60 canary requests over the whole window
    clock.now += INTERVAL
    assert controller.tick()[MODEL].action == "step"


def test_nothing_happens_before_the_interval(registry, metrics, clock, controller):
    start(registry)
    controller.tick()
    good_window(metrics, 5)
    clock.now += INTERVAL - 1
    assert controller.tick() == {}
    assert metrics.snapshots == 1                         # no scrape until a window is due


def test_lease_held_by_another_owner_means_no_writes(registry, metrics, clock, controller):
    start(registry)
    assert registry.acquire_lease(MODEL, "controller-b", ttl_s=1000, now=0.0)
    before = model_json(registry)
    controller.tick()
    metrics.serve(CANARY_V, 200, errors=100)
    metrics.serve(STABLE_V, 1000)
    clock.now += INTERVAL
    assert controller.tick() == {}
    assert model_json(registry) == before and registry.lease(MODEL).owner == "controller-b"
    assert metrics.snapshots == 0


def test_takes_over_an_expired_lease(registry, metrics, clock, controller):
    start(registry)
    registry.acquire_lease(MODEL, "controller-b", ttl_s=10, now=0.0)
    clock.now = 11.0
    controller.tick()
    assert registry.lease(MODEL).owner == "controller-a"
    assert registry.lease(MODEL).expires_at == 11.0 + 3 * INTERVAL


def test_aborted_meanwhile_means_no_writes(registry, metrics, clock, controller, events):
    start(registry)
    controller.tick()
    metrics.serve(STABLE_V, 1000)
    metrics.serve(CANARY_V, 200, errors=100)             # a rollback is due ...
    aborted = []

    def abort_by_hand():
        registry.abort_rollout(MODEL, "stopped by hand", now=clock.now)
        aborted.append(model_json(registry))

    metrics.before_snapshot = abort_by_hand               # ... but someone aborts while it scrapes
    clock.now += INTERVAL
    assert controller.tick() == {}
    assert model_json(registry) == aborted[0]
    assert status(registry).state == "aborted" and status(registry).history[-1].event == "aborted"
    assert events_total(events, "rolled_back") == 0


def test_aborted_before_the_tick_is_left_alone(registry, metrics, clock, controller):
    start(registry)
    controller.tick()
    registry.abort_rollout(MODEL, "stopped by hand", now=1.0)
    before = model_json(registry)
    good_window(metrics, 5)
    clock.now += INTERVAL
    assert controller.tick() == {}
    assert model_json(registry) == before and registry.lease(MODEL) is None


def test_stepped_by_hand_meanwhile_voids_the_window(registry, metrics, clock, controller):
    start(registry)
    controller.tick()
    metrics.serve(STABLE_V, 1000)
    metrics.serve(CANARY_V, 200, errors=100)
    metrics.before_snapshot = lambda: registry.rollout_step(MODEL, 2, "by hand", now=clock.now)
    clock.now += INTERVAL
    assert controller.tick() == {}
    assert status(registry).state == "running" and status(registry).step == 2


def test_a_restarted_controller_resumes_from_the_registry(registry, metrics, clock, controller):
    start(registry)
    controller.tick()
    good_window(metrics, 5)
    clock.now += INTERVAL
    assert controller.tick()[MODEL].action == "step"
    restarted = RolloutController(registry, metrics, owner="controller-a", clock=clock)
    good_window(metrics, 25)                              # traffic before the restart: not in its window
    metrics.serve(CANARY_V, 100, errors=100)
    clock.now += 1
    assert restarted.tick() == {}                         # a fresh window
    good_window(metrics, 25)
    clock.now += INTERVAL
    assert restarted.tick()[MODEL].action == "step"
    assert status(registry).step == 2


def test_a_counter_reset_opens_a_fresh_window(registry, metrics, clock, controller):
    start(registry)
    good_window(metrics, 5, total=5000)
    controller.tick()
    metrics.counters[STABLE_V] = ArmCounters()            # a replica restarted
    good_window(metrics, 5)
    clock.now += INTERVAL
    assert controller.tick() == {}
    good_window(metrics, 5)
    clock.now += INTERVAL
    assert controller.tick()[MODEL].action == "step"


def test_a_metrics_error_skips_the_model_this_tick(registry, metrics, clock, controller, caplog):
    start(registry)

    def unreachable():
        raise MetricsError("cannot scrape http://replica-1/metrics: connection refused")

    metrics.before_snapshot = unreachable
    with caplog.at_level(logging.WARNING, logger="zooserve.rollout"):
        assert controller.tick() == {}
    assert "connection refused" in caplog.text


def test_run_loop_ticks_until_stopped_and_releases_the_lease(registry, metrics):
    start(registry)
    controller = RolloutController(registry, metrics, owner="embedded")

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(run(controller, stop, period_s=0.01))
        for _ in range(500):
            await asyncio.sleep(0.01)
            if registry.lease(MODEL) is not None:
                break
        assert registry.lease(MODEL).owner == "embedded"
        stop.set()
        await asyncio.wait_for(task, 5)

    asyncio.run(main())
    assert registry.lease(MODEL) is None


# ---- pure decisions ------------------------------------------------------------------------

def running(step: int, weight: int) -> RolloutStatus:
    return RolloutStatus(state="running", step=step, weight=weight, stable_version=1, canary_version=2)


@pytest.mark.parametrize("outcome, step, waited, action", [
    ("fail", 0, 30, "rollback"), ("pass", 0, 30, "step"), ("pass", 3, 30, "promote"),
    ("wait", 1, 30, "wait"), ("wait", 1, 300, "hold"),
])
def test_decide(outcome, step, waited, action):
    decision = decide(Verdict(outcome, "numbers"), running(step, [5, 25, 50, 100][step]), [5, 25, 50, 100],
                      waited_s=waited, hold_after_s=300)
    assert decision.action == action and "numbers" in decision.reason
    assert decision.step == (step + 1 if action == "step" else None)


def test_at_weight_100_the_canary_is_judged_against_stables_past():
    past = ArmCounters(5000, 5, {0.01: 5000, math.inf: 5000})
    start = {1: past, 2: ArmCounters(10, 0, {0.01: 10, math.inf: 10})}
    now = {1: past, 2: ArmCounters(110, 1, {0.01: 110, math.inf: 110})}
    stable, canary = window_arms(start, now, running(3, 100))
    assert (stable.requests, canary.requests, canary.errors) == (5000, 100, 1)
    stable, canary = window_arms(start, now, running(2, 50))
    assert stable.requests == 0


# ---- metric sources on the server's real metrics -------------------------------------------

def server_metrics(requests: dict[int, list[tuple[int, float]]]) -> Metrics:
    """A server's Metrics with (status, seconds) requests recorded per version of MODEL."""
    metrics = Metrics()
    for version, answered in requests.items():
        series = metrics.for_model(MODEL, version)
        for code, seconds in answered:
            series.request_done(code, seconds)
    metrics.for_model("other-model", 1).request_done(500, 1.0)
    return metrics


def expected_latency(seconds: list[float]) -> dict[float, float]:
    return {le: float(sum(s <= le for s in seconds)) for le in (*LATENCY_BUCKETS, math.inf)}


REPLICA = {1: [(200, 0.001)] * 5 + [(503, 0.2), (404, 0.002)], 2: [(200, 0.004), (500, 0.03)]}


def test_counters_from_the_exposition_text():
    text = server_metrics(REPLICA).exposition().decode()
    counters = counters_from_families(text_string_to_metric_families(text), MODEL, {1: "stable", 2: "canary"})
    assert counters[1].requests == 7 and counters[1].errors == 1     # 404 is the client's error, not ours
    assert counters[1].latency == expected_latency([0.001] * 5 + [0.2, 0.002])
    assert counters[2].requests == 2 and counters[2].errors == 1
    assert counters_from_families([], MODEL, {3: "x"})[3] == ArmCounters()


def test_in_process_source_reads_the_servers_metrics_and_the_shadow_counter():
    metrics = server_metrics(REPLICA)
    shadow = metrics.shadow_results
    shadow.labels(MODEL, "canary", "agree").inc(8)
    shadow.labels(MODEL, "canary", "disagree").inc(2)
    shadow.labels(MODEL, "canary", "dropped").inc(5)
    shadow.labels("other-model", "canary", "disagree").inc(7)
    counters = InProcessSource(metrics).snapshot(MODEL, {1: "stable", 2: "canary"})
    assert (counters[2].shadow_agree, counters[2].shadow_disagree) == (8, 2)
    assert (counters[1].shadow_agree, counters[1].shadow_disagree) == (0, 0)
    assert counters[1].requests == 7


class MetricsServer:
    """A tiny HTTP server whose /metrics is a Metrics object's exposition (a replica's, without a model);
    `on_scrape` runs before each answer."""

    def __init__(self, metrics: Metrics, on_scrape=None):
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if owner.on_scrape is not None:
                    owner.on_scrape()
                body = owner.metrics.exposition()
                self.send_response(200 if self.path == "/metrics" else 404)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.metrics, self.on_scrape = metrics, on_scrape
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def replicas():
    servers = [MetricsServer(server_metrics(REPLICA)), MetricsServer(server_metrics({2: [(200, 0.5)]}))]
    yield servers
    for server in servers:
        server.close()


def test_server_metrics_source_sums_the_replicas(replicas):
    counters = ServerMetricsSource([s.url for s in replicas]).snapshot(MODEL, {1: "stable", 2: "canary"})
    assert counters[1].requests == 7
    assert counters[2].requests == 3 and counters[2].errors == 1
    assert counters[2].latency == expected_latency([0.004, 0.03, 0.5])


def test_server_metrics_source_names_the_unreachable_replica(replicas):
    dead = replicas[1].url
    replicas[1].close()
    with pytest.raises(MetricsError, match=f"cannot scrape {dead}/metrics"):
        ServerMetricsSource([replicas[0].url, dead], timeout_s=2).snapshot(MODEL, {1: "stable"})


def test_prometheus_queries_sum_the_raw_counters_by_version():
    queries = PrometheusSource("http://prom").queries(MODEL, {1: "stable", 2: "canary"})
    assert queries["zooserve_requests_total"] == (
        'sum by (version, status) (zooserve_requests_total{model="digits",version=~"1|2"})')
    assert 'alias=~"stable|canary"' in queries["zooserve_shadow_requests_total"]


def test_prometheus_source_names_an_unreachable_prometheus():
    with pytest.raises(MetricsError, match="cannot query Prometheus at http://127.0.0.1:9"):
        PrometheusSource("http://127.0.0.1:9", timeout_s=2).snapshot(MODEL, {1: "stable"})


# ---- the command ---------------------------------------------------------------------------

def zooserve(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "serve.cli", "rollout", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)


def test_cli_start_status_abort(registry):
    root = str(registry.root)
    done = zooserve("start", "--registry", root, MODEL, "--canary", "canary", "--steps", "10,50,100",
                    "--interval", "2m", "--min-requests", "80", "--max-p99-ratio", "2", "--min-agreement", "0.9")
    assert done.returncode == 0, done.stderr
    assert "digits: running, step 1/3 (steps [10, 50, 100]), canary weight 10%" in done.stdout
    rollout = registry.model_config(MODEL).rollout
    assert (rollout.interval_s, rollout.min_requests, rollout.max_p99_ratio, rollout.min_agreement) == (120, 80, 2, 0.9)
    assert registry.model_config(MODEL).routing.split == {"stable": 90, "canary": 10}

    done = zooserve("status", "--registry", root, MODEL)
    assert done.returncode == 0, done.stderr
    assert "running" in done.stdout and "history:" in done.stdout and "started by hand" in done.stdout

    done = zooserve("abort", "--registry", root, MODEL)
    assert done.returncode == 0, done.stderr
    assert "digits: aborted" in done.stdout
    assert registry.model_config(MODEL).routing.split == {"stable": 100}
    done = zooserve("status", "--registry", root, MODEL)
    assert "aborted by hand (zooserve rollout abort)" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["start", MODEL, "--canary", "missing"], "error: model 'digits' has no canary alias 'missing'"),
    (["start", MODEL, "--canary", "canary", "--steps", "50,25"], "error: steps: Value error, steps must increase"),
    (["start", MODEL, "--canary", "canary", "--interval", "soon"], "a duration looks like 30s"),
    (["start", MODEL, "--canary", "canary", "--steps", "5,x"], "steps are comma-separated integer"),
    (["status", "nope"], "error: "),
    (["abort", MODEL], "error: cannot abort the rollout of model 'digits': it has no running rollout"),
    (["run", "nope", "--servers", "http://127.0.0.1:9"], "error: "),
    (["run", MODEL], "one of the arguments --servers --prometheus is required"),
])
def test_cli_errors(registry, args, message):
    verb, rest = args[0], args[1:]
    done = zooserve(verb, "--registry", str(registry.root), *rest)
    assert done.returncode == 2
    assert message in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_status_without_a_rollout(registry):
    done = zooserve("status", "--registry", str(registry.root), MODEL)
    assert done.returncode == 0 and "no rollout was ever started" in done.stdout


def test_cli_run_once_judges_one_window_from_the_servers(registry):
    registry.start_rollout(MODEL, Rollout(canary="canary", interval_s=0.5, min_requests=20), now=0.0)
    metrics = Metrics()
    stable, canary = metrics.for_model(MODEL, STABLE_V), metrics.for_model(MODEL, CANARY_V)

    def traffic():                                        # every scrape finds 95 + 25 more requests
        for _ in range(95):
            stable.request_done(200, 0.003)
        for _ in range(25):
            canary.request_done(200, 0.003)

    server = MetricsServer(metrics, on_scrape=traffic)
    try:
        done = zooserve("run", "--registry", str(registry.root), MODEL, "--servers", server.url, "--once",
                        "--log-level", "warning")
    finally:
        server.close()
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("digits: step: window passed at step 1/4 (canary weight 5%)"), done.stdout
    assert registry.model_config(MODEL).routing.split == {"stable": 75, "canary": 25}
    assert registry.lease(MODEL) is None


def test_cli_start_writes_what_status_reads_back_as_json(registry):
    zooserve("start", "--registry", str(registry.root), MODEL, "--canary", "canary")
    on_disk = json.loads(model_json(registry))
    assert on_disk["rollout"]["status"]["state"] == "running" and on_disk["rollout"]["steps"] == [5, 25, 50, 100]


def test_the_lease_outlives_a_short_interval(registry, metrics, clock):
    registry.start_rollout(MODEL, Rollout(canary="canary", interval_s=0.5), now=0.0)
    RolloutController(registry, metrics, owner="a", clock=clock, min_lease_s=10).tick()
    assert registry.lease(MODEL).expires_at == 10.0


def test_a_servers_rollout_counter_can_be_handed_over(registry, metrics, clock):
    server = Metrics()
    controller = RolloutController(registry, metrics, owner="a", clock=clock, events=server.rollout_events)
    start(registry)
    controller.tick()
    metrics.serve(STABLE_V, 950)
    metrics.serve(CANARY_V, 200, errors=20)
    clock.now += INTERVAL
    controller.tick()
    assert 'zooserve_rollout_events_total{event="rolled_back",model="digits"} 1.0' in server.exposition().decode()
