"""The rollout controller: judge canary against stable window by window, then step, promote or roll back.

State lives in the registry (`model.json`'s `rollout.status`, written by `Registry`'s rollout verbs),
so a controller that restarts resumes where the last one stopped. Only the analysis window's start
snapshot lives in memory: after a restart the controller opens a fresh window, because counters
taken before it started are unknown. One controller drives a model at a time, by a lease in the
registry that it renews on every tick (ttl: a few intervals, so a dead controller is replaced).

Metrics come from a `MetricsSource`: cumulative per-version counters (requests, errors, the latency
histogram, shadow comparisons). A window is the difference between two snapshots, which is what
Prometheus' `increase()` would give without its extrapolation.

Every decision is written to the registry (status and history), logged on "zooserve.rollout" and
counted in `zooserve_rollout_events_total{model,event}`: the controller's `events` counter (hand it a
server's `Metrics.rollout_events` to expose it on that server's /metrics; else it makes its own on a
private registry).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal, Protocol

import httpx
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from model_registry import Registry, RegistryError
from model_registry.routing import Rollout, RolloutStatus

from .judge import ArmWindow, Verdict, judge, load_tests
from .metrics import rollout_events_counter

log = logging.getLogger("zooserve.rollout")

REQUESTS = "zooserve_requests_total"
LATENCY_BUCKET = "zooserve_request_duration_seconds_bucket"
SHADOW = "zooserve_shadow_requests_total"
LEASE_INTERVALS = 3          # lease ttl, in rollout intervals: a controller that misses two ticks keeps it
MIN_LEASE_S = 10.0           # ... and at least this long, so a short interval with slow ticks keeps it too
HOLD_AFTER_WINDOWS = 10      # a window that waited this many intervals for a verdict is recorded as held


class MetricsError(Exception):
    """A metric source could not give counters (server unreachable, bad answer)."""


# ---- counters ------------------------------------------------------------------------------

@dataclass(frozen=True)
class ArmCounters:
    """Cumulative counters of one version, summed over every replica."""

    requests: float = 0.0
    errors: float = 0.0                               # answers with HTTP status >= 500
    latency: Mapping[float, float] = field(default_factory=dict)   # cumulative le -> count
    shadow_agree: float = 0.0
    shadow_disagree: float = 0.0

    def since(self, start: "ArmCounters") -> ArmWindow | None:
        """What happened between `start` and these counters; None when a counter went down (a replica
        restarted or left), since the window's difference then means nothing."""
        window = ArmWindow(
            requests=self.requests - start.requests, errors=self.errors - start.errors,
            latency={le: count - start.latency.get(le, 0.0) for le, count in self.latency.items()},
            shadow_agree=self.shadow_agree - start.shadow_agree,
            shadow_disagree=self.shadow_disagree - start.shadow_disagree,
        )
        deltas = [window.requests, window.errors, window.shadow_agree, window.shadow_disagree,
                  *window.latency.values()]
        vanished = set(start.latency) - set(self.latency)
        return None if vanished or any(d < 0 for d in deltas) else window

    def as_window(self) -> ArmWindow:
        """All the counters as one window (everything since the servers started)."""
        return ArmWindow(self.requests, self.errors, dict(self.latency), self.shadow_agree, self.shadow_disagree)


class _Tally:
    """Sums samples of the watched versions into counters; the shadow metric is labelled by alias."""

    def __init__(self, versions: Mapping[int, str]):
        self.version_of_alias = {alias: str(v) for v, alias in versions.items()}
        self.values = {str(v): {"requests": 0.0, "errors": 0.0, "agree": 0.0, "disagree": 0.0} for v in versions}
        self.latency: dict[str, dict[float, float]] = {str(v): {} for v in versions}

    def add(self, sample_name: str, labels: Mapping[str, str], value: float) -> None:
        if sample_name == SHADOW:
            version, result = self.version_of_alias.get(labels.get("alias", "")), labels.get("result")
            if version is not None and result in ("agree", "disagree"):
                self.values[version][result] += value
            return
        version = labels.get("version", "")
        if version not in self.values:
            return
        if sample_name == REQUESTS:
            self.values[version]["requests"] += value
            if _is_server_error(labels.get("status", "")):
                self.values[version]["errors"] += value
        elif sample_name == LATENCY_BUCKET:
            le = float(labels["le"])
            self.latency[version][le] = self.latency[version].get(le, 0.0) + value

    def counters(self) -> dict[int, ArmCounters]:
        return {int(v): ArmCounters(c["requests"], c["errors"], self.latency[v], c["agree"], c["disagree"])
                for v, c in self.values.items()}


def _is_server_error(status: str) -> bool:
    return status.isdigit() and int(status) >= 500


def counters_from_families(families: Iterable[Metric], model: str,
                           versions: Mapping[int, str]) -> dict[int, ArmCounters]:
    """The watched versions' counters in prometheus_client metric families (parsed or collected)."""
    tally = _Tally(versions)
    for family in families:
        for sample in family.samples:
            if sample.labels.get("model") == model:
                tally.add(sample.name, sample.labels, sample.value)
    return tally.counters()


# ---- metric sources ------------------------------------------------------------------------

class MetricsSource(Protocol):
    def snapshot(self, model: str, versions: Mapping[int, str]) -> dict[int, ArmCounters]:
        """Cumulative counters of each version in `versions` (version -> the alias it is rolled out
        under, which labels its shadow comparisons); a version without series gets zeros."""


class ServerMetricsSource:
    """Scrapes every replica's /metrics and sums the counters."""

    def __init__(self, urls: Iterable[str], timeout_s: float = 5.0):
        self.urls = [url.rstrip("/") for url in urls]
        if not self.urls:
            raise ValueError("ServerMetricsSource needs at least one server URL")
        self.timeout_s = timeout_s

    def snapshot(self, model: str, versions: Mapping[int, str]) -> dict[int, ArmCounters]:
        families = [family for url in self.urls for family in self._scrape(url)]
        return counters_from_families(families, model, versions)

    def _scrape(self, url: str) -> list[Metric]:
        try:
            response = httpx.get(f"{url}/metrics", timeout=self.timeout_s)
            response.raise_for_status()
            return list(text_string_to_metric_families(response.text))
        except httpx.HTTPError as e:
            raise MetricsError(f"cannot scrape {url}/metrics: {e}") from e
        except ValueError as e:
            raise MetricsError(f"{url}/metrics is not Prometheus text format: {e}") from e


class PrometheusSource:
    """Asks a Prometheus server (HTTP API, instant queries) for the counters summed by version."""

    def __init__(self, url: str, timeout_s: float = 10.0):
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def snapshot(self, model: str, versions: Mapping[int, str]) -> dict[int, ArmCounters]:
        tally = _Tally(versions)
        for sample_name, promql in self.queries(model, versions).items():
            for labels, value in self._query(promql):
                tally.add(sample_name, labels, value)
        return tally.counters()

    @staticmethod
    def queries(model: str, versions: Mapping[int, str]) -> dict[str, str]:
        """PromQL per counter: the raw cumulative values, summed over replicas, by version."""
        model_label = f'model="{_promql_string(model)}"'
        version_match = "|".join(str(v) for v in versions)
        alias_match = "|".join(_regex_escape(alias) for alias in versions.values())
        return {
            REQUESTS: f'sum by (version, status) ({REQUESTS}{{{model_label},version=~"{version_match}"}})',
            LATENCY_BUCKET: f'sum by (version, le) ({LATENCY_BUCKET}{{{model_label},version=~"{version_match}"}})',
            SHADOW: f'sum by (alias, result) ({SHADOW}{{{model_label},alias=~"{_promql_string(alias_match)}"}})',
        }

    def _query(self, promql: str) -> list[tuple[dict[str, str], float]]:
        try:
            response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=self.timeout_s)
            body = response.json()
        except (httpx.HTTPError, ValueError) as e:
            raise MetricsError(f"cannot query Prometheus at {self.url} ({promql}): {e}") from e
        if body.get("status") != "success" or body.get("data", {}).get("resultType") != "vector":
            raise MetricsError(f"Prometheus at {self.url} refused {promql}: "
                               f"{body.get('errorType', '')} {body.get('error', body)}")
        return [(row["metric"], float(row["value"][1])) for row in body["data"]["result"]]


def _promql_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')


def _regex_escape(text: str) -> str:
    # RE2 metacharacters; aliases are [a-z0-9._-] today, so this only guards the dot
    return "".join("\\" + c if c in r".^$*+?()[]{}|\\" else c for c in text)


class InProcessSource:
    """Reads one server's own `serve.metrics.Metrics` (for a controller embedded in that server; in
    a server of several worker processes, every worker's counts, merged as /metrics shows them).

    It collects every collector on the server's registry, so families that other features
    register there (the shadow comparisons) are seen too."""

    def __init__(self, metrics):
        self.metrics = metrics

    def snapshot(self, model: str, versions: Mapping[int, str]) -> dict[int, ArmCounters]:
        return counters_from_families(self.metrics.families(), model, versions)


# ---- decisions (pure) ----------------------------------------------------------------------

Action = Literal["wait", "hold", "step", "promote", "rollback"]
EVENT_OF_ACTION = {"hold": "held", "step": "stepped", "promote": "promoted", "rollback": "rolled_back"}


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    step: int | None = None          # the step index moved to (action "step")


def decide(verdict: Verdict, status: RolloutStatus, steps: list[int], waited_s: float, hold_after_s: float) -> Decision:
    """What a rollout does with a window's verdict: fail rolls back at once, pass moves one step (or
    promotes after the last), wait keeps the window growing until it has waited `hold_after_s`."""
    at = f"step {status.step + 1}/{len(steps)} (canary weight {status.weight}%)"
    if verdict.outcome == "fail":
        return Decision("rollback", f"canary failed at {at}: {verdict.reason}")
    if verdict.outcome == "pass" and status.step + 1 < len(steps):
        return Decision("step", f"window passed at {at}: {verdict.reason}", status.step + 1)
    if verdict.outcome == "pass":
        return Decision("promote", f"last window passed at {at}: {verdict.reason}")
    if waited_s >= hold_after_s:
        return Decision("hold", f"no verdict after {waited_s:.0f} s at {at}: {verdict.reason}")
    return Decision("wait", verdict.reason)


def window_key(status: RolloutStatus) -> tuple:
    """What a window judges; when another writer changes it the window is void."""
    return status.stable_version, status.canary_version, status.step, status.window_started_at


def window_arms(start: Mapping[int, ArmCounters], now: Mapping[int, ArmCounters],
                status: RolloutStatus) -> tuple[ArmWindow, ArmWindow] | None:
    """(stable, canary) windows between two snapshots; None when a counter was reset.

    At canary weight 100 stable serves nothing, so the canary's window is judged against everything
    stable served before the window (its cumulative counters at the window's start)."""
    stable_v, canary_v = status.stable_version, status.canary_version
    canary = now[canary_v].since(start[canary_v])
    stable = start[stable_v].as_window() if status.weight >= 100 else now[stable_v].since(start[stable_v])
    return None if canary is None or stable is None else (stable, canary)


# ---- the controller ------------------------------------------------------------------------

@dataclass
class Window:
    key: tuple                          # window_key of the status it judges
    started_at: float                   # controller clock
    start: dict[int, ArmCounters]       # snapshot at started_at


class RolloutController:
    """Drives every running rollout in a registry (or in `models`) whose lease it can hold."""

    def __init__(self, registry: Registry, source: MetricsSource, owner: str,
                 clock: Callable[[], float] = time.time, models: Iterable[str] | None = None,
                 events: Counter | None = None,
                 hold_after_windows: float = HOLD_AFTER_WINDOWS, lease_intervals: float = LEASE_INTERVALS,
                 min_lease_s: float = MIN_LEASE_S):
        self.registry = registry
        self.source = source
        self.owner = owner
        self.clock = clock
        self.models = list(models) if models is not None else None
        self.events = events if events is not None else rollout_events_counter(CollectorRegistry())
        self.hold_after_windows = hold_after_windows
        self.lease_intervals = lease_intervals
        self.min_lease_s = min_lease_s
        self._windows: dict[str, Window] = {}
        self._leased: set[str] = set()

    # -- the verbs

    def tick(self) -> dict[str, Decision]:
        """One pass over the models: judge every window that is due; returns the decisions taken
        (a "wait" included, so a caller can show why nothing moved)."""
        now = self.clock()
        decisions = {}
        for name in self._model_names():
            try:
                decision = self.tick_model(name, now)
            except (RegistryError, MetricsError) as e:
                log.warning("rollout of %s: no decision this tick: %s", name, e)
                continue
            if decision is not None:
                decisions[name] = decision
        return decisions

    def tick_model(self, name: str, now: float) -> Decision | None:
        """Judge `name`'s window if it is due, and write the decision; None when nothing was due."""
        rollout = self._running(name)
        if rollout is None or not self._hold_lease(name, rollout, now):
            self._windows.pop(name, None)
            return None
        window = self._windows.get(name)
        if window is None or window.key != window_key(rollout.status):
            self._open_window(name, rollout.status, now, self._snapshot(name, rollout))
            return None
        if now - window.started_at < rollout.interval_s:
            return None
        current = self._snapshot(name, rollout)
        arms = window_arms(window.start, current, rollout.status)
        if arms is None:
            log.info("rollout of %s: a counter went down (a replica restarted?); opening a fresh window", name)
            self._open_window(name, rollout.status, now, current)
            return None
        verdict = judge(*arms, rollout)
        decision = decide(verdict, rollout.status, rollout.steps, now - window.started_at,
                          self.hold_after_windows * rollout.interval_s)
        if decision.action == "wait":
            log.debug("rollout of %s: waiting: %s", name, decision.reason)
            return decision
        return self._write(name, window, decision, now, current)

    def release_leases(self) -> None:
        """Give up every lease this controller holds (on shutdown), so another may take over at once."""
        for name in sorted(self._leased):
            with contextlib.suppress(RegistryError):
                self.registry.release_lease(name, self.owner)
        self._leased.clear()

    # -- steps of a tick

    def _model_names(self) -> list[str]:
        return self.models if self.models is not None else self.registry.models()

    def _running(self, name: str) -> Rollout | None:
        """The model's running rollout, or None (then a lease it held is released)."""
        rollout = self.registry.model_config(name).rollout
        if rollout is not None and rollout.status is not None and rollout.status.state == "running":
            return rollout
        if name in self._leased:
            self.registry.release_lease(name, self.owner)
            self._leased.discard(name)
        return None

    def _hold_lease(self, name: str, rollout: Rollout, now: float) -> bool:
        """Take or renew the lease; False (and no writes this tick) while another owner holds it."""
        ttl_s = max(self.lease_intervals * rollout.interval_s, self.min_lease_s)
        held = self.registry.acquire_lease(name, self.owner, ttl_s, now=now)
        if held and name not in self._leased:
            log.info("rollout of %s: lease taken by %s", name, self.owner)
            self._leased.add(name)
        elif not held and name in self._leased:
            log.warning("rollout of %s: lease lost to another controller", name)
            self._leased.discard(name)
        return held

    def _snapshot(self, name: str, rollout: Rollout) -> dict[int, ArmCounters]:
        status = rollout.status
        return self.source.snapshot(name, {status.stable_version: rollout.stable,
                                           status.canary_version: rollout.canary})

    def _open_window(self, name: str, status: RolloutStatus, now: float, snapshot: dict[int, ArmCounters]) -> None:
        self._windows[name] = Window(window_key(status), now, snapshot)

    def _write(self, name: str, window: Window, decision: Decision, now: float,
               current: dict[int, ArmCounters]) -> Decision | None:
        """Write a decision unless the rollout changed meanwhile (aborted, promoted, moved by hand);
        the revision read here guards the write against a change in between."""
        cfg = self.registry.model_config(name)
        rollout = cfg.rollout
        if rollout is None or rollout.status is None or rollout.status.state != "running" \
                or window_key(rollout.status) != window.key:
            state = rollout.status.state if rollout is not None and rollout.status is not None else "gone"
            log.info("rollout of %s changed meanwhile (now %s); dropping the decision to %s", name, state,
                     decision.action)
            self._windows.pop(name, None)
            return None
        written = self._apply(name, decision, now, cfg.revision).rollout
        self._record(name, decision)
        if written.status.state == "running":
            self._open_window(name, written.status, now, current)
        else:
            self._windows.pop(name, None)
            self.registry.release_lease(name, self.owner)
            self._leased.discard(name)
        return decision

    def _apply(self, name: str, decision: Decision, now: float, revision: int):
        registry, reason = self.registry, decision.reason
        if decision.action == "step":
            return registry.rollout_step(name, decision.step, reason, now, expected_revision=revision)
        if decision.action == "hold":
            return registry.rollout_hold(name, reason, now, expected_revision=revision)
        if decision.action == "promote":
            return registry.promote(name, reason, now, expected_revision=revision)
        if decision.action == "rollback":
            return registry.rollback(name, reason, now, expected_revision=revision)
        raise ValueError(f"decision {decision.action!r} writes nothing")

    def _record(self, name: str, decision: Decision) -> None:
        event = EVENT_OF_ACTION[decision.action]
        self.events.labels(model=name, event=event).inc()
        level = logging.WARNING if decision.action in ("rollback", "hold") else logging.INFO
        log.log(level, "rollout of %s %s: %s", name, event, decision.reason)


async def run(controller: RolloutController, stop: asyncio.Event, period_s: float) -> None:
    """Tick every `period_s` until `stop` is set, then give the leases back. Ticks run in a thread
    (they read files and scrape servers); an unexpected error is logged and the loop goes on, so an
    embedding server keeps its controller."""
    try:
        await asyncio.to_thread(load_tests)       # now, not in the middle of the first judgement
        while not stop.is_set():
            try:
                await asyncio.to_thread(controller.tick)
            except Exception:
                log.exception("rollout controller tick failed; trying again in %s s", period_s)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=period_s)
    finally:
        await asyncio.to_thread(controller.release_leases)


def next_due_s(registry: Registry, models: Iterable[str]) -> float:
    """The longest interval among the models' running rollouts (0 when none runs): how long one
    window of each takes."""
    intervals = [cfg.rollout.interval_s for cfg in map(registry.model_config, models)
                 if cfg.rollout is not None and cfg.rollout.status is not None
                 and cfg.rollout.status.state == "running"]
    return max(intervals, default=0.0)


__all__ = ["ArmCounters", "Decision", "InProcessSource", "MetricsError", "MetricsSource", "PrometheusSource",
           "RolloutController", "ServerMetricsSource", "counters_from_families", "decide", "next_due_s", "run",
           "window_arms"]
