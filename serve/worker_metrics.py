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

The Triton statistics routes (`/v2/models/.../stats`) are merged the same way from a
`<pid>.stats.json` beside each exposition: counts and nanoseconds summed (a dead worker's too),
`last_inference` the latest, batch sizes matched by size.

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

import orjson

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families

PUBLISH_EVERY_S = 1.0
SUFFIX = ".prom"
STATS_SUFFIX = ".stats.json"
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


def merge_stats(workers: Iterable[list[dict]]) -> list[dict]:
    """Triton statistics rows of several workers, one row per (name, version), in first-seen order."""
    merged: dict[tuple[str, str], dict] = {}
    for rows in workers:
        for row in rows:
            key = (row["name"], row["version"])
            merged[key] = _add_stats(merged[key], row) if key in merged else row
    return list(merged.values())


def _add_stats(a: dict, b: dict) -> dict:
    out = {}
    for key, value in a.items():
        other = b.get(key)
        if key == "last_inference":
            out[key] = max(value, other or 0)
        elif key == "batch_stats":
            by_size = {row["batch_size"]: row for row in value}
            for row in other or []:
                size = row["batch_size"]
                by_size[size] = _add_stats(by_size[size], row) if size in by_size else row
            out[key] = [by_size[size] for size in sorted(by_size)]
        elif key == "batch_size" or isinstance(value, str):
            out[key] = value
        elif isinstance(value, dict):
            out[key] = _add_stats(value, other or {})
        else:
            out[key] = value + (other or 0)
    return out


class SharedMetrics:
    """One worker's side of the folder: publish its own text (and statistics), read everyone's."""

    def __init__(self, folder: Path, own: CollectorRegistry, pid: int | None = None):
        self.folder, self.own = Path(folder), own
        self.pid = os.getpid() if pid is None else pid
        self.path = self.folder / f"{self.pid}{SUFFIX}"
        self.stats_path = self.folder / f"{self.pid}{STATS_SUFFIX}"
        # this worker's Triton statistics rows (set by the app: it knows the loaded versions)
        self.stats_source: Callable[[], list[dict]] | None = None

    def publish(self) -> None:
        """Write this worker's exposition and statistics (atomically: a reader never sees half)."""
        write_whole(self.path, generate_latest(self.own))
        self._publish_stats()

    def _publish_stats(self) -> None:
        if self.stats_source is not None:
            write_whole(self.stats_path, orjson.dumps(self.stats_source()))

    def stats(self) -> list[dict]:
        """Every worker's statistics rows merged, this worker's as of now."""
        self._publish_stats()
        workers = []
        for path in sorted(self.folder.glob(f"*{STATS_SUFFIX}")):
            try:
                workers.append(orjson.loads(path.read_bytes()))
            except FileNotFoundError:
                continue
        return merge_stats(workers)

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


def write_whole(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically: a reader in another worker never sees half."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


class _Fixed:
    """A collector that yields families already built."""

    def __init__(self, families: list[Metric]):
        self._families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)
