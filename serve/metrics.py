"""Prometheus metrics: with serve/worker_metrics.py (one /metrics over several worker processes),
the only module that imports prometheus_client.

The hot path records into plain Python accumulators (`ModelMetrics`, one per (model, version),
labels bound once); a collector turns them into Prometheus families when /metrics is scraped.
Why not prometheus_client's own Counter/Histogram objects: a request touched about fifteen of
them, each a few Python calls deep with its own lock, and that cost more server CPU than decoding
the request (bench/classify.py, cProfile). prometheus_client still renders and names everything.

Each `ModelMetrics` takes one lock per recording call, so the token engine's thread and the event
loop can both record into the same series. Names follow DESIGN section 6.
"""

from __future__ import annotations

import threading
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST  # noqa: F401  (re-exported for the /metrics route)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric

disable_created_metrics()     # no `*_created` series beside every counter: ours have none either

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LABELS = ["model", "version"]


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


class HistogramValues:
    """One histogram series: a count per bucket (`le` semantics) plus the sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)     # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        out, running = [], 0
        for bound, count in zip((*map(_le, self.bounds), "+Inf"), self.counts):
            running += count
            out.append((bound, running))
        return out


class GaugeValue:
    """A gauge series: set by its owner, or read from `set_function`'s callable at scrape."""

    __slots__ = ("value", "function")

    def __init__(self) -> None:
        self.value = 0.0
        self.function: Callable[[], float] | None = None

    def set(self, value: float) -> None:
        self.value = value

    def set_function(self, function: Callable[[], float]) -> None:
        self.function = function

    def get(self) -> float:
        return float(self.function()) if self.function is not None else float(self.value)


def _le(bound: float) -> str:
    return str(float(bound))


# name, help, kind ("counter" | "gauge" | "histogram"), attribute of ModelMetrics, token models only
FAMILIES: list[tuple[str, str, str, str, bool]] = [
    ("zooserve_requests", "Inference requests by outcome", "counter", "status_counts", False),
    ("zooserve_request_duration_seconds", "End-to-end request time in the server", "histogram",
     "request_duration", False),
    ("zooserve_queue_duration_seconds", "Time a request waited for its batch", "histogram", "queue_duration", False),
    ("zooserve_compute_duration_seconds", "Model execution time per batch", "histogram", "compute_duration", False),
    ("zooserve_inference_count", "Rows inferred (batch-N request counts N)", "counter", "inference_count", False),
    ("zooserve_execution_count", "Model executions (batches)", "counter", "execution_count", False),
    ("zooserve_batch_size", "Rows per executed batch", "histogram", "batch_size", False),
    ("zooserve_queue_depth", "Requests waiting for a batch", "gauge", "queue_depth", False),
    ("zooserve_model_ready", "1 when the version serves, else 0", "gauge", "ready", False),
    ("zooserve_engine_restarts", "Engine restarts after a failure on its thread (a failed step, a dead thread); "
     "the requests it held were answered 503", "counter", "engine_restarts", False),
    ("zooserve_nonfinite_outputs", "KServe v2 answers with at least one NaN or Inf in a float output (one "
     "count per answer, not per value)", "counter", "nonfinite_outputs", False),
    # token engines (vLLM's vocabulary)
    ("zooserve_time_to_first_token_seconds", "Arrival to first generated token", "histogram", "ttft", True),
    ("zooserve_inter_token_latency_seconds", "Time between two tokens of one sequence", "histogram", "itl", True),
    ("zooserve_prompt_tokens", "Prompt tokens prefilled", "counter", "prompt_tokens", True),
    ("zooserve_generated_tokens", "Tokens generated", "counter", "generated_tokens", True),
    ("zooserve_requests_running", "Sequences holding a state slot", "gauge", "running", True),
    ("zooserve_requests_waiting", "Sequences waiting for a slot", "gauge", "waiting", True),
    ("zooserve_state_slots_used_ratio", "Share of state slots in use", "gauge", "slots_used", True),
]


# sequence engines (the rnn forecasters): padding of variable-length batches, live stateful sequences
PADDING_BUCKETS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
SEQUENCE_FAMILIES: list[tuple[str, str, str, str]] = [
    ("zooserve_padding_ratio", "Share of padded time steps in an executed batch of right-padded rows",
     "histogram", "padding_ratio"),
    ("zooserve_sequences_live", "Stateful sequences whose state the server holds between requests", "gauge",
     "sequences_live"),
    ("zooserve_sequence_state_bytes", "Bytes of state held for the live sequences", "gauge", "sequence_state_bytes"),
    ("zooserve_sequences_expired", "Sequences freed after the idle timeout", "counter", "sequences_expired"),
]


# denoise engines (diffusion): the batched denoising loop
STEP_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
DENOISE_FAMILIES: list[tuple[str, str, str, str]] = [
    ("zooserve_denoise_steps", "Denoising steps run, one UNet call each (rate = steps per second)", "counter",
     "steps"),
    ("zooserve_denoise_shared_steps", "Denoising steps whose UNet batch carried rows of more than one request",
     "counter", "shared_steps"),
    ("zooserve_denoise_step_rows", "UNet rows per denoising step (a guided sample is two rows)", "histogram",
     "step_rows"),
    ("zooserve_denoise_step_requests", "Requests sharing one denoising step", "histogram", "step_requests"),
    ("zooserve_denoise_request_steps", "Denoising steps of each finished request", "histogram", "request_steps"),
]


# A counter series is born with its first count, and Prometheus' rate() and increase() never see the
# count that created it: a first burst of 429s, or a first rollback, would be invisible to the rules
# in deploy/prometheus. The series the rules and the dashboard read are exposed at 0 from the start.
STATUSES_AT_ZERO = ("200", "400", "429", "500", "503", "504")
ROLLOUT_EVENTS = ("started", "stepped", "held", "promoted", "rolled_back", "aborted")


def rollout_events_counter(collector_registry: CollectorRegistry) -> Counter:
    """`zooserve_rollout_events_total{model,event}` on `collector_registry`: a server's (Metrics has
    one, shared with its embedded rollout controller) or a standalone controller's own."""
    return Counter("zooserve_rollout_events", "Rollout decisions (" + ", ".join(ROLLOUT_EVENTS) + ")",
                   ["model", "event"], registry=collector_registry)


class Metrics:
    """Every zooserve_* family, collected from the live `ModelMetrics` on one registry per server."""

    def __init__(self, shared_folder: Path | None = None) -> None:
        self.registry = CollectorRegistry()
        self._series: dict[tuple[str, str], ModelMetrics] = {}
        # a worker of several (`zooserve serve --workers N`): /metrics and the embedded rollout
        # controller see every worker's counts through this folder (serve/worker_metrics.py)
        self.shared = None
        if shared_folder is not None:
            from serve.worker_metrics import SharedMetrics
            self.shared = SharedMetrics(shared_folder, self.registry)
        self.registry.register(self)
        # routing families: rare events (a shadow copy, a rollout decision), so prometheus_client's own
        self.shadow_results = Counter("zooserve_shadow_requests", "Shadow copies by outcome (agree, disagree, "
                                      "dropped, error)", ["model", "alias", "result"], registry=self.registry)
        self.shadow_differences = Histogram("zooserve_shadow_difference", "Shadow answer against the primary's: "
                                            "max |difference| of tensors, share of differing tokens",
                                            ["model", "alias"], registry=self.registry,
                                            buckets=(0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 0.5, 1.0, 10.0, 100.0))
        self.rollout_events = rollout_events_counter(self.registry)

    def for_model(self, model: str, version: int | str) -> "ModelMetrics":
        return self._add(ModelMetrics(self, model, str(version)))

    def for_token_model(self, model: str, version: int | str) -> "TokenMetrics":
        return self._add(TokenMetrics(self, model, str(version)))

    def for_sequence_model(self, model: str, version: int | str) -> "SequenceMetrics":
        return self._add(SequenceMetrics(self, model, str(version)))

    def for_denoise_model(self, model: str, version: int | str) -> "DenoiseMetrics":
        return self._add(DenoiseMetrics(self, model, str(version)))

    def _add(self, series: "ModelMetrics"):
        self._series[series.labels] = series
        for event in ROLLOUT_EVENTS:          # at 0 from the model's first load (see STATUSES_AT_ZERO)
            self.rollout_events.labels(model=series.labels[0], event=event)
        return series

    def _forget(self, series: "ModelMetrics") -> None:
        if self._series.get(series.labels) is series:
            del self._series[series.labels]

    def exposition(self) -> bytes:
        """Prometheus text format of every metric (of every worker, in a server of several)."""
        return generate_latest(self.registry) if self.shared is None else self.shared.exposition()

    def families(self) -> Iterable[Metric]:
        """Every family as /metrics shows it (of every worker, in a server of several)."""
        return self.registry.collect() if self.shared is None else self.shared.families()

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector protocol: one family per metric, one sample set per series."""
        series = list(self._series.values())
        for name, help_text, kind, attribute, token_only in FAMILIES:
            rows = [s for s in series if not token_only or hasattr(s, attribute)]   # token (and denoise) engines
            if kind == "counter" and attribute == "status_counts":
                family = CounterMetricFamily(name, help_text, labels=[*LABELS, "status"])
                for s in rows:
                    with s.lock:      # the embedded rollout controller collects from its own thread
                        counts = sorted(s.status_counts.items())
                    for status, count in counts:
                        family.add_metric([*s.labels, status], count)
            elif kind == "counter":
                family = CounterMetricFamily(name, help_text, labels=LABELS)
                for s in rows:
                    family.add_metric(list(s.labels), getattr(s, attribute))
            elif kind == "gauge":
                family = GaugeMetricFamily(name, help_text, labels=LABELS)
                for s in rows:
                    family.add_metric(list(s.labels), getattr(s, attribute).get())
            else:
                family = HistogramMetricFamily(name, help_text, labels=LABELS)
                for s in rows:
                    with s.lock:
                        values: HistogramValues = getattr(s, attribute)
                        buckets, total = values.cumulative(), values.sum
                    family.add_metric(list(s.labels), buckets, total)
            yield family
        yield from _extra_families([s for s in series if isinstance(s, SequenceMetrics)], SEQUENCE_FAMILIES)
        yield from _extra_families([s for s in series if isinstance(s, DenoiseMetrics)], DENOISE_FAMILIES)


class ModelMetrics:
    """What an engine and the HTTP layer record for one (model, version)."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        self._metrics = metrics
        self.labels = (model, version)
        self.lock = threading.Lock()
        self.stats = EngineStats()
        self.status_counts: dict[str, int] = dict.fromkeys(STATUSES_AT_ZERO, 0)
        self.request_duration = HistogramValues(LATENCY_BUCKETS)
        self.queue_duration = HistogramValues(LATENCY_BUCKETS)
        self.compute_duration = HistogramValues(LATENCY_BUCKETS)
        self.batch_size = HistogramValues(BATCH_BUCKETS)
        self.inference_count = 0
        self.execution_count = 0
        self.nonfinite_outputs = 0
        self.queue_depth = GaugeValue()
        self.ready = GaugeValue()
        self.engine_restarts = 0

    def request_done(self, status: int, seconds: float) -> None:
        """One request answered with HTTP `status` after `seconds` in the server."""
        key = str(status)
        ns = int(seconds * 1e9)
        with self.lock:
            self.status_counts[key] = self.status_counts.get(key, 0) + 1
            self.request_duration.observe(seconds)
            s = self.stats
            if status == 200:
                s.success_count += 1
                s.success_ns += ns
            else:
                s.fail_count += 1
                s.fail_ns += ns

    def batch_done(self, rows: int, compute_s: float, queue_waits: list[float]) -> None:
        """One model execution over `rows` rows whose requests waited `queue_waits` seconds."""
        ns = int(compute_s * 1e9)
        with self.lock:
            self.compute_duration.observe(compute_s)
            self.batch_size.observe(rows)
            self.inference_count += rows
            self.execution_count += 1
            waited = 0.0
            for wait in queue_waits:
                self.queue_duration.observe(wait)
                waited += wait
            s = self.stats
            s.inference_count += rows
            s.execution_count += 1
            s.compute_count += len(queue_waits)
            s.compute_ns += ns
            s.queue_count += len(queue_waits)
            s.queue_ns += int(waited * 1e9)
            s.last_inference_ms = int(time.time() * 1000)
            entry = s.batch_stats.get(rows)
            if entry is None:
                entry = s.batch_stats[rows] = [0, 0]
            entry[0] += 1
            entry[1] += ns

    def nonfinite_answer(self) -> None:
        """One v2 answer carried a NaN or Inf (a model that overflows): 200 all the same, so counted here."""
        with self.lock:
            self.nonfinite_outputs += 1

    def engine_restarted(self) -> None:
        """The engine failed on its own thread and restarted (serve/engines/step_loop.py)."""
        with self.lock:
            self.engine_restarts += 1

    def remove(self) -> None:
        """Drop this version's series (after unload), so dashboards do not show a ghost."""
        self._metrics._forget(self)


class TokenMetrics(ModelMetrics):
    """What a token engine records, mostly from its own thread."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        super().__init__(metrics, model, version)
        self.ttft = HistogramValues(LATENCY_BUCKETS)
        self.itl = HistogramValues(LATENCY_BUCKETS)
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.running, self.waiting, self.slots_used = GaugeValue(), GaugeValue(), GaugeValue()

    def scheduler_state(self, running: int, waiting: int, rows: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.slots_used.set(running / rows)
        self.queue_depth.set(waiting)

    def step_done(self, rows: int, seconds: float) -> None:
        """One model step over `rows` sequences."""
        self.batch_done(rows, seconds, [])

    def admitted(self, prompt_tokens: int, queued_s: float) -> None:
        """A sequence got a slot after `queued_s` and prefilled its prompt."""
        with self.lock:
            self.queue_duration.observe(queued_s)
            self.prompt_tokens += prompt_tokens
            self.stats.queue_count += 1
            self.stats.queue_ns += int(queued_s * 1e9)

    def token_emitted(self, stream, now: float, arrival: float) -> None:
        """A token reached a sequence's stream: time to first token, else inter-token latency."""
        with self.lock:
            if stream.last_token_at is None:
                self.ttft.observe(now - arrival)
            else:
                self.itl.observe(now - stream.last_token_at)
            self.generated_tokens += 1
        stream.last_token_at = now

    def finished(self, finish_reason: str, seconds: float) -> None:
        """A sequence ended; an abort (client gone) counts as status 499."""
        self.request_done(499 if finish_reason == "abort" else 200, seconds)


class SequenceMetrics(ModelMetrics):
    """What a sequence engine records besides the stateless metrics; the live-sequence gauges and
    the expiry count are read from its sequence store at scrape (`set_function`)."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        super().__init__(metrics, model, version)
        self.padding_ratio = HistogramValues(PADDING_BUCKETS)
        self.sequences_live, self.sequence_state_bytes = GaugeValue(), GaugeValue()
        self.sequences_expired = GaugeValue()     # cumulative; exposed as a counter

    def batch_padded(self, ratio: float) -> None:
        """One execution over right-padded rows, `ratio` of whose time steps were padding."""
        with self.lock:
            self.padding_ratio.observe(ratio)


class DenoiseMetrics(ModelMetrics):
    """What a denoise engine records from its loop thread. A step is an execution over its UNet rows
    (`zooserve_execution_count` / `zooserve_inference_count`, `zooserve_batch_size`), the wait for
    admission is the queue time, and running/waiting requests share the token engines' gauges."""

    def __init__(self, metrics: Metrics, model: str, version: str):
        super().__init__(metrics, model, version)
        self.steps = 0
        self.shared_steps = 0
        self.step_rows = HistogramValues(BATCH_BUCKETS)
        self.step_requests = HistogramValues(BATCH_BUCKETS)
        self.request_steps = HistogramValues(STEP_BUCKETS)
        self.running, self.waiting = GaugeValue(), GaugeValue()

    def scheduler_state(self, running: int, waiting: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.queue_depth.set(waiting)

    def admitted(self, queued_s: float) -> None:
        """A request joined the loop after `queued_s` waiting."""
        with self.lock:
            self.queue_duration.observe(queued_s)
            self.stats.queue_count += 1
            self.stats.queue_ns += int(queued_s * 1e9)

    def step_done(self, rows: int, requests: int, seconds: float) -> None:
        """One denoising step: one UNet call over `rows` rows of `requests` requests."""
        self.batch_done(rows, seconds, [])
        with self.lock:
            self.steps += 1
            self.shared_steps += requests > 1
            self.step_rows.observe(rows)
            self.step_requests.observe(requests)

    def finished_steps(self, steps: int) -> None:
        """A request finished after `steps` steps."""
        with self.lock:
            self.request_steps.observe(steps)


def _extra_families(rows: list[ModelMetrics], families: list[tuple[str, str, str, str]]) -> Iterator[Metric]:
    for name, help_text, kind, attribute in families:
        if kind == "histogram":
            family = HistogramMetricFamily(name, help_text, labels=LABELS)
            for s in rows:
                with s.lock:
                    values: HistogramValues = getattr(s, attribute)
                    buckets, total = values.cumulative(), values.sum
                family.add_metric(list(s.labels), buckets, total)
        else:
            family = (GaugeMetricFamily if kind == "gauge" else CounterMetricFamily)(name, help_text, labels=LABELS)
            for s in rows:
                value = getattr(s, attribute)          # a plain count, or a gauge read at scrape
                family.add_metric(list(s.labels), value.get() if isinstance(value, GaugeValue) else value)
        yield family
