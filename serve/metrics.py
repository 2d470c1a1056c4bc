"""Prometheus metrics: the only module that imports prometheus_client.

Engines keep plain counters in `EngineStats` (served by the v2 statistics endpoint) and report
timings through a `ModelMetrics` recorder, whose label values are bound once per (model,
version) so the hot path does no label lookups. Names follow DESIGN section 6.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass
class EngineStats:
    """Cumulative counters of one (model, version), in Triton's statistics vocabulary."""

    success_count: int = 0
    success_ns: int = 0
    fail_count: int = 0
    fail_ns: int = 0
    queue_count: int = 0
    queue_ns: int = 0
    compute_count: int = 0
    compute_ns: int = 0
    inference_count: int = 0      # rows (a batch-N request counts N)
    execution_count: int = 0      # model executions; inference_count / execution_count = mean batch
    last_inference_ms: int = 0
    # batch size -> [executions, compute ns]
    batch_stats: dict[int, list[int]] = field(default_factory=dict)


class Metrics:
    """All zooserve_* metric families on one CollectorRegistry (one per server)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        labels = ("model", "version")
        r = self.registry
        self.requests = Counter("zooserve_requests", "Inference requests by outcome", (*labels, "status"), registry=r)
        self.request_duration = Histogram("zooserve_request_duration_seconds", "End-to-end request time in the server",
                                          labels, buckets=LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("zooserve_queue_duration_seconds", "Time a request waited for its batch",
                                        labels, buckets=LATENCY_BUCKETS, registry=r)
        self.compute_duration = Histogram("zooserve_compute_duration_seconds", "Model execution time per batch",
                                          labels, buckets=LATENCY_BUCKETS, registry=r)
        self.inference_count = Counter("zooserve_inference_count", "Rows inferred (batch-N request counts N)",
                                       labels, registry=r)
        self.execution_count = Counter("zooserve_execution_count", "Model executions (batches)", labels, registry=r)
        self.batch_size = Histogram("zooserve_batch_size", "Rows per executed batch", labels,
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_depth = Gauge("zooserve_queue_depth", "Requests waiting for a batch", labels, registry=r)
        self.model_ready = Gauge("zooserve_model_ready", "1 when the version serves, else 0", labels, registry=r)
        # token engines (vLLM's vocabulary)
        self.ttft = Histogram("zooserve_time_to_first_token_seconds", "Arrival to first generated token",
                              labels, buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("zooserve_inter_token_latency_seconds", "Time between two tokens of one sequence",
                             labels, buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("zooserve_prompt_tokens", "Prompt tokens prefilled", labels, registry=r)
        self.generated_tokens = Counter("zooserve_generated_tokens", "Tokens generated", labels, registry=r)
        self.requests_running = Gauge("zooserve_requests_running", "Sequences holding a state slot", labels, registry=r)
        self.requests_waiting = Gauge("zooserve_requests_waiting", "Sequences waiting for a slot", labels, registry=r)
        self.slots_used = Gauge("zooserve_state_slots_used_ratio", "Share of state slots in use", labels, registry=r)

    def for_model(self, model: str, version: int | str) -> "ModelMetrics":
        return ModelMetrics(self, model, str(version))

    def for_token_model(self, model: str, version: int | str) -> "TokenMetrics":
        return TokenMetrics(self, model, str(version))

    def exposition(self) -> bytes:
        """Prometheus text format of every metric."""
        return generate_latest(self.registry)


class ModelMetrics:
    """Metrics with (model, version) bound; what an engine and the HTTP layer call."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        self.stats = EngineStats()
        lv = (model, version)
        self._metrics, self._labels = metrics, lv
        self._status: dict[str, Counter] = {}
        self._request_duration = metrics.request_duration.labels(*lv)
        self._queue_duration = metrics.queue_duration.labels(*lv)
        self._compute_duration = metrics.compute_duration.labels(*lv)
        self._inference_count = metrics.inference_count.labels(*lv)
        self._execution_count = metrics.execution_count.labels(*lv)
        self._batch_size = metrics.batch_size.labels(*lv)
        self.queue_depth = metrics.queue_depth.labels(*lv)
        self.ready = metrics.model_ready.labels(*lv)

    def request_done(self, status: int, seconds: float) -> None:
        """One request answered with HTTP `status` after `seconds` in the server."""
        key = str(status)
        counter = self._status.get(key)
        if counter is None:
            counter = self._status[key] = self._metrics.requests.labels(*self._labels, key)
        counter.inc()
        self._request_duration.observe(seconds)
        ns = int(seconds * 1e9)
        if status == 200:
            self.stats.success_count += 1
            self.stats.success_ns += ns
        else:
            self.stats.fail_count += 1
            self.stats.fail_ns += ns

    def batch_done(self, rows: int, compute_s: float, queue_waits: list[float]) -> None:
        """One model execution over `rows` rows whose requests waited `queue_waits` seconds."""
        self._compute_duration.observe(compute_s)
        self._batch_size.observe(rows)
        self._inference_count.inc(rows)
        self._execution_count.inc()
        for wait in queue_waits:
            self._queue_duration.observe(wait)
        s = self.stats
        ns = int(compute_s * 1e9)
        s.inference_count += rows
        s.execution_count += 1
        s.compute_count += len(queue_waits)
        s.compute_ns += ns
        s.queue_count += len(queue_waits)
        s.queue_ns += int(sum(queue_waits) * 1e9)
        s.last_inference_ms = int(time.time() * 1000)
        entry = s.batch_stats.setdefault(rows, [0, 0])
        entry[0] += 1
        entry[1] += ns

    def remove(self) -> None:
        """Drop this version's series (after unload), so dashboards do not show a ghost."""
        m, lv = self._metrics, self._labels
        for family in (m.request_duration, m.queue_duration, m.compute_duration, m.inference_count,
                       m.execution_count, m.batch_size, m.queue_depth, m.model_ready, m.ttft, m.itl,
                       m.prompt_tokens, m.generated_tokens, m.requests_running, m.requests_waiting, m.slots_used):
            try:
                family.remove(*lv)
            except KeyError:
                pass
        for key in self._status:
            try:
                m.requests.remove(*lv, key)
            except KeyError:
                pass


class TokenMetrics(ModelMetrics):
    """What a token engine records, from its own thread (prometheus_client is thread-safe)."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        super().__init__(metrics, model, version)
        lv = (model, version)
        self._ttft, self._itl = metrics.ttft.labels(*lv), metrics.itl.labels(*lv)
        self._prompt_tokens = metrics.prompt_tokens.labels(*lv)
        self._generated_tokens = metrics.generated_tokens.labels(*lv)
        self._running, self._waiting = metrics.requests_running.labels(*lv), metrics.requests_waiting.labels(*lv)
        self._slots_used = metrics.slots_used.labels(*lv)

    def scheduler_state(self, running: int, waiting: int, rows: int) -> None:
        self._running.set(running)
        self._waiting.set(waiting)
        self._slots_used.set(running / rows)
        self.queue_depth.set(waiting)

    def step_done(self, rows: int, seconds: float) -> None:
        """One model step over `rows` sequences."""
        self.batch_done(rows, seconds, [])

    def admitted(self, prompt_tokens: int, queued_s: float) -> None:
        """A sequence got a slot after `queued_s` and prefilled its prompt."""
        self._queue_duration.observe(queued_s)
        self._prompt_tokens.inc(prompt_tokens)
        self.stats.queue_count += 1
        self.stats.queue_ns += int(queued_s * 1e9)

    def token_emitted(self, stream, now: float, arrival: float) -> None:
        """A token reached a sequence's stream: time to first token, else inter-token latency."""
        if stream.last_token_at is None:
            self._ttft.observe(now - arrival)
        else:
            self._itl.observe(now - stream.last_token_at)
        stream.last_token_at = now
        self._generated_tokens.inc()

    def finished(self, finish_reason: str, seconds: float) -> None:
        """A sequence ended; an abort (client gone) counts as status 499."""
        self.request_done(499 if finish_reason == "abort" else 200, seconds)
