"""One /metrics for a server of several worker processes (`zooserve serve --workers N`).

Each worker keeps its own accumulators (serve/metrics.py) and writes their exposition text to a
folder the supervisor made, `<pid>.prom`, once a second, at each scrape and when it stops. The
worker that answers a scrape (the kernel chose it) merges every file, so Prometheus, the rollout
controller and a user see one server, named as a one-process server names it:

- counters and histograms are summed over every file, a dead worker's included: its requests
  happened, and a worker restarted after a crash starts from 0, so the sum never goes down;
- gauges describe the present, so only live workers' count: summed (queue depth, sequences
  running), except `zooserve_model_ready` (the least: 1 only when every live worker serves the
  version) and `zooserve_state_slots_used_ratio` (the mean: every worker has the same slots);
- `zooserve_workers` is the number of live workers.

A scrape therefore reads another worker's counts as they were up to a second ago (PUBLISH_EVERY_S),
well inside any scrape interval. Why files and not prometheus_client's multiprocess mode: that mode
replaces each metric's value with an mmap'd one, and the hot path records into plain accumulators
precisely because prometheus_client's objects cost more than decoding the request (serve/metrics.py).
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from statistics import fmean
from typing import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

PUBLISH_EVERY_S = 1.0
SUFFIX = ".prom"
GAUGE_MERGE: dict[str, Callable[[list[float]], float]] = {
    "zooserve_model_ready": min,
    "zooserve_state_slots_used_ratio": fmean,
}


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # alive, someone else's (a reused pid): not ours, but not ours to judge
        return True
    return True


def merge(texts: Iterable[tuple[str, bool]]) -> list[Metric]:
    """Families of several workers' exposition texts, given as (text, worker alive), merged by the
    rules above; families and series in first-seen order."""
    kinds: dict[str, tuple[str, str]] = {}                               # family -> (type, help)
    values: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))
    live = 0
    for text, alive in texts:
        live += alive
        for family in text_string_to_metric_families(text):
            kinds.setdefault(family.name, (family.type, family.documentation))
            if family.type == "gauge" and not alive:
                continue
            for sample in family.samples:
                key = (sample.name, tuple(sample.labels.items()))
                values[family.name][key].append(sample.value)
    merged = []
    for name, (kind, help_text) in kinds.items():
        metric = Metric(name, help_text, kind)
        combine = GAUGE_MERGE.get(name, sum) if kind == "gauge" else sum
        for (sample_name, labels), seen in values[name].items():
            metric.add_sample(sample_name, dict(labels), float(combine(seen)))
        merged.append(metric)
    workers = GaugeMetricFamily("zooserve_workers", "Worker processes of this server that are alive")
    workers.add_metric([], live)
    merged.append(workers)
    return merged


class SharedMetrics:
    """One worker's side of the folder: publish its own text, read everyone's."""

    def __init__(self, folder: Path, own: CollectorRegistry, pid: int | None = None):
        self.folder, self.own = Path(folder), own
        self.pid = os.getpid() if pid is None else pid
        self.path = self.folder / f"{self.pid}{SUFFIX}"

    def publish(self) -> None:
        """Write this worker's exposition (atomically: a reader never sees half of it)."""
        partial = self.path.with_suffix(".partial")
        partial.write_bytes(generate_latest(self.own))
        os.replace(partial, self.path)

    def families(self) -> list[Metric]:
        """Every worker's families merged, this worker's as of now."""
        self.publish()
        texts = []
        for path in sorted(self.folder.glob(f"*{SUFFIX}")):
            try:
                text = path.read_text()
            except FileNotFoundError:       # the supervisor is clearing the folder at shutdown
                continue
            texts.append((text, path == self.path or pid_alive(int(path.stem))))
        return merge(texts)

    def exposition(self) -> bytes:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Fixed(self.families()))
        return generate_latest(registry)


class _Fixed:
    """A collector that yields families already built."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
