"""The PromQL an operator runs, against a real Prometheus scraping a real zooserve that served known
traffic: the mean batch size, the p99 request time by model and version, and the 429s of a model
whose queue holds one request, each equal to what the test sent and to what /metrics says; then the
recording and alerting rules of deploy/prometheus evaluated on those series, and every query of the
Grafana dashboard (deploy/grafana/zooserve.json) run with its template variables filled in.

Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`, 2.42); skipped without it.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits

from model_registry import Registry
from serve.judge import histogram_quantile
from tests.prometheus_helpers import PROMETHEUS_MISSING, SKIP_REASON, query, running_prometheus, vector, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.skipif(PROMETHEUS_MISSING, reason=SKIP_REASON)]

ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "zooserve.json"
IMAGES = load_digits().images.astype(np.float32)

BATCHED = "mlp-digits"           # versions 1 and 2, sequential requests of known sizes
SHEDDING = "resnet-digits"       # max_batch_size 1, max_queue_size 1: bursts get 429s
ROWS = {"1": [1, 2, 3, 4, 8] * 6, "2": [1, 5] * 5}      # rows of each request, per version of BATCHED
BURST, MAX_BURSTS = 48, 10


def body(rows: int, offset: int = 0) -> dict:
    images = IMAGES[offset % 1000 : offset % 1000 + rows]
    return {"inputs": [{"name": "image", "shape": [rows, 1, 8, 8], "datatype": "FP32",
                        "data": images.flatten().tolist()}]}


def send_known_traffic(url: str, prometheus: str) -> Counter:
    """The traffic the assertions are about; returns the answers as {(model, version, status): count}."""
    sent: Counter = Counter()
    with httpx.Client(timeout=30) as client:
        # one request at a time: each runs alone, so each execution holds exactly its request's rows
        for version, sizes in ROWS.items():
            for i, rows in enumerate(sizes):
                r = client.post(f"{url}/v2/models/{BATCHED}/versions/{version}/infer", json=body(rows, i))
                assert r.status_code == 200, r.text
                sent[BATCHED, version, "200"] += 1

    async def bursts(at_least: int) -> None:
        """Bursts of 1-row requests on a queue of one, until `at_least` more were refused."""
        limits = httpx.Limits(max_connections=BURST, max_keepalive_connections=BURST)
        goal = sent[SHEDDING, "1", "429"] + at_least
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            for _ in range(MAX_BURSTS):
                answers = await asyncio.gather(*(client.post(f"{url}/v2/models/{SHEDDING}/infer", json=body(1, i))
                                                 for i in range(BURST)))
                sent.update((SHEDDING, "1", str(a.status_code)) for a in answers)
                if sent[SHEDDING, "1", "429"] >= goal:
                    return

    # a status' series is born with its first request, so the requests counted by the first scrape
    # that sees it are invisible to rate(): shed once, let Prometheus see the 429 series, shed again
    asyncio.run(bursts(1))
    wait_for_counts(prometheus, sent)
    time.sleep(1.5)                          # one more scrape at these values
    asyncio.run(bursts(5))
    assert {status for (model, _, status) in sent if model == SHEDDING} == {"200", "429"}, sent
    assert sent[SHEDDING, "1", "429"] >= 6, f"{MAX_BURSTS} bursts of {BURST} on a queue of one shed too few: {sent}"
    return sent


def wait_for_counts(prometheus: str, sent: Counter) -> None:
    """Until Prometheus' zooserve_requests_total are the answers counted in `sent`."""
    def counts(result: dict) -> dict:      # the series exposed at 0 from the start aside
        return {(d["model"], d["version"], d["status"]): v for d, v in ((dict(k), v) for k, v in result.items())
                if v}

    wanted = {key: float(n) for key, n in sent.items()}
    seen = wait_for(prometheus, "sum by (model, version, status) (zooserve_requests_total)",
                    lambda r: counts(r) == wanted)
    assert counts(seen) == wanted, "Prometheus never scraped the latest counters"


def scrape(url: str) -> dict[str, list]:
    """/metrics parsed: {sample name: [(labels, value), ...]}."""
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            samples.setdefault(s.name, []).append((s.labels, s.value))
    return samples


class Scraped:
    """What the module's tests read: Prometheus' URL, the traffic sent and the server's final /metrics."""

    def __init__(self, prometheus: str, sent: Counter, metrics: dict[str, list]):
        self.prometheus, self.sent, self.metrics = prometheus, sent, metrics

    def direct(self, name: str, **match: str) -> dict[tuple[str, str], float]:
        """{(model, version): value} of one sample name in /metrics, summed over the other labels."""
        out: dict[tuple[str, str], float] = {}
        for labels, value in self.metrics.get(name, []):
            if all(labels.get(k) == v for k, v in match.items()):
                key = (labels["model"], labels["version"])
                out[key] = out.get(key, 0.0) + value
        return out

    def buckets(self, name: str) -> dict[tuple[str, str], dict[float, float]]:
        out: dict[tuple[str, str], dict[float, float]] = {}
        for labels, value in self.metrics[f"{name}_bucket"]:
            out.setdefault((labels["model"], labels["version"]), {})[float(labels["le"])] = value
        return out


def by_model_version(result: dict) -> dict[tuple[str, str], float]:
    return {(dict(k)["model"], dict(k)["version"]): v for k, v in result.items()}


def nonzero(values: dict) -> dict:
    """The series that counted something (the others are exposed at 0 from the start, so a ratio
    over them is 0, or NaN where nothing at all was counted)."""
    return {k: v for k, v in values.items() if v and not math.isnan(v)}


@pytest.fixture(scope="module")
def scraped(demo_registry, start_server, tmp_path_factory):
    work = tmp_path_factory.mktemp("ops")
    root = work / "registry"
    shutil.copytree(demo_registry, root)
    registry = Registry(root)
    assert registry.publish(BATCHED, root / BATCHED / "1") == 2          # the same weights as version 2
    registry.set_alias(BATCHED, "canary", 2)                             # aliased versions are served
    cfg = registry.model_config(SHEDDING)
    cfg.batching.max_batch_size, cfg.batching.max_queue_size = 1, 1
    registry.write_model_config(cfg)

    with start_server(root) as server, \
            running_prometheus(work / "prometheus", [f"127.0.0.1:{server.port}"], RULES) as prometheus:
        # the first scrape sees every series at zero, so rate() over the window counts all the traffic
        first = wait_for(prometheus, "zooserve_request_duration_seconds_count", lambda r: len(r) == 3)
        assert len(first) == 3 and set(first.values()) == {0.0}, first
        sent = send_known_traffic(server.url, prometheus)
        metrics = scrape(server.url)
        wait_for_counts(prometheus, sent)
        # until the recording group has run on the final samples (it runs every second, on its own clock)
        fresh = ("abs(model_version:zooserve_request_duration_seconds:p99_5m - histogram_quantile(0.99, "
                 "sum by (model, version, le) (rate(zooserve_request_duration_seconds_bucket[5m])))) < 1e-12")
        assert len(wait_for(prometheus, fresh, lambda r: len(r) == 3)) == 3, "the recording rules never ran"
        yield Scraped(prometheus, sent, metrics)


def test_mean_batch_size_is_the_rows_sent_per_execution(scraped):
    expected = {(BATCHED, v): sum(rows) / len(rows) for v, rows in ROWS.items()} | {(SHEDDING, "1"): 1.0}
    raw = by_model_version(vector(scraped.prometheus, "sum by (model, version) (zooserve_inference_count_total)"
                                  " / sum by (model, version) (zooserve_execution_count_total)"))
    histogram = by_model_version(vector(scraped.prometheus, "sum by (model, version) (zooserve_batch_size_sum)"
                                        " / sum by (model, version) (zooserve_batch_size_count)"))
    recorded = by_model_version(vector(scraped.prometheus, "model_version:zooserve_batch_size:mean_rate5m"))
    direct = {key: rows / scraped.direct("zooserve_execution_count_total")[key]
              for key, rows in scraped.direct("zooserve_inference_count_total").items()}
    assert raw == expected == direct
    assert histogram == expected
    assert recorded == pytest.approx(expected, rel=1e-9)      # a ratio of two rates over the same samples


def test_p99_by_model_and_version_equals_the_servers_histogram(scraped):
    buckets = scraped.buckets("zooserve_request_duration_seconds")
    expected = {key: histogram_quantile(0.99, b) for key, b in buckets.items()}
    assert set(expected) == {(BATCHED, "1"), (BATCHED, "2"), (SHEDDING, "1")}
    assert all(0 < v < 30 for v in expected.values()), expected
    raw = by_model_version(vector(scraped.prometheus, "histogram_quantile(0.99, sum by (model, version, le) "
                                  "(zooserve_request_duration_seconds_bucket))"))
    windowed = by_model_version(vector(scraped.prometheus, "histogram_quantile(0.99, sum by (model, version, le) "
                                       "(rate(zooserve_request_duration_seconds_bucket[5m])))"))
    recorded = by_model_version(vector(scraped.prometheus, "model_version:zooserve_request_duration_seconds:p99_5m"))
    assert raw == pytest.approx(expected, rel=1e-12)
    # every bucket's rate is its count over the same span, so the interpolation lands on the same value
    assert windowed == pytest.approx(expected, rel=1e-9)
    assert recorded == pytest.approx(expected, rel=1e-9)
    counts = by_model_version(vector(scraped.prometheus,
                                     "sum by (model, version) (zooserve_request_duration_seconds_count)"))
    assert counts == {(m, v): float(sum(n for (m2, v2, _), n in scraped.sent.items() if (m2, v2) == (m, v)))
                      for m, v in expected}


def test_429s_counted_and_their_rate_and_share(scraped):
    refused = scraped.sent[SHEDDING, "1", "429"]
    total = sum(n for (m, _, _), n in scraped.sent.items() if m == SHEDDING)
    count = vector(scraped.prometheus, 'sum by (model, version) (zooserve_requests_total{status="429"})')
    assert nonzero(by_model_version(count)) == {(SHEDDING, "1"): refused}
    assert nonzero(scraped.direct("zooserve_requests_total", status="429")) == {(SHEDDING, "1"): refused}
    # every model's 429 series exists from its load on, at 0 until it counts: a first burst is a rate
    assert set(by_model_version(count)) == set(scraped.direct("zooserve_model_ready"))
    share = vector(scraped.prometheus, 'sum by (model, version) (zooserve_requests_total{status="429"})'
                                       " / sum by (model, version) (zooserve_requests_total)")
    assert nonzero(by_model_version(share)) == {(SHEDDING, "1"): refused / total}
    # windows: the second round of bursts came after the 429 series existed, so rate() sees it (the
    # first minute's rate reads low, and the first scrape's count is not a rate: no exact value here)
    rate = vector(scraped.prometheus, 'sum by (model) (rate(zooserve_requests_total{status="429"}[1m]))')
    assert list(nonzero(rate)) == [(("model", SHEDDING),)], rate
    # the rule group evaluates on its own clock: an evaluation that ran before the second round was
    # scraped divides 0 by 0 (NaN); wait for one after it
    recorded = by_model_version(wait_for(
        scraped.prometheus, "model_version:zooserve_requests_refused:ratio_rate5m",
        lambda r: any(0.01 < v < 1 for v in r.values()), timeout_s=20))
    # a version that never answered 429 has a share of 0 (NaN without any request): nothing to alert on
    assert list(nonzero(recorded)) == [(SHEDDING, "1")] and 0.01 < recorded[SHEDDING, "1"] < 1, recorded
    # above 1 %: the queue-saturation alert is pending (it fires after 5 minutes of it)
    pending = wait_for(scraped.prometheus, 'ALERTS{alertname="ZooserveQueueFull"}', lambda r: len(r) == 1,
                       timeout_s=10)       # the alert group runs on its own clock, after the recording one
    assert [dict(k)["model"] for k in pending] == [SHEDDING] and dict(next(iter(pending)))["alertstate"] == "pending"


def test_every_rule_evaluates_on_the_real_series(scraped):
    groups = httpx.get(f"{scraped.prometheus}/api/v1/rules").json()["data"]["groups"]
    names = {g["name"] for g in groups}
    assert names == {"zooserve-recording", "zooserve-errors", "zooserve-latency", "zooserve-saturation",
                     "zooserve-availability", "zooserve-rollouts"}
    for group in groups:
        for rule in group["rules"]:
            assert rule["health"] == "ok", (group["name"], rule["name"], rule.get("lastError"))
    # nothing fires on a healthy server: every version ready, no 5xx, no rollback
    firing = vector(scraped.prometheus, 'ALERTS{alertstate="firing"}')
    assert firing == {}, firing
    ready = by_model_version(vector(scraped.prometheus, "zooserve_model_ready"))
    assert ready == {(BATCHED, "1"): 1.0, (BATCHED, "2"): 1.0, (SHEDDING, "1"): 1.0}


# ---- the Grafana dashboard ------------------------------------------------------------------------

# what Grafana puts in place of the variables, for "All" models and versions
VARIABLES = {"$__rate_interval": "1m", "$__interval": "15s", "$__range": "5m", "$model": ".*", "$version": ".*",
             "${datasource}": "prometheus"}


def dashboard_exprs(node) -> list[tuple[str, str]]:
    """(where, expr) of every `expr` in the dashboard JSON: panel targets and annotations."""
    out = []
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            out.append((node.get("legendFormat") or node.get("name") or "?", node["expr"]))
        for value in node.values():
            out += dashboard_exprs(value)
    elif isinstance(node, list):
        for value in node:
            out += dashboard_exprs(value)
    return out


def substitute(expr: str, variables: dict[str, str]) -> str:
    for name in sorted(variables, key=len, reverse=True):      # $__rate_interval before $__range
        expr = expr.replace(name, variables[name])
    assert "$" not in expr, f"a template variable the test does not know: {expr}"
    return expr


def test_every_dashboard_query_runs(scraped):
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard)
    targets = [t for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) == len(targets) + len(dashboard["annotations"]["list"]) >= 20
    served = f"{BATCHED}|{SHEDDING}"       # what Grafana sends for a multi-value selection, as a regex
    answered = {}
    for variables in (VARIABLES, {**VARIABLES, "$model": served, "$version": "1|2"}):
        for where, expr in exprs:
            body = query(scraped.prometheus, substitute(expr, variables))
            assert body["status"] == "success", (where, expr, body)
            answered[expr] = answered.get(expr, False) or bool(body["data"]["result"])
    # the panels this server's families feed show data (the token, sequence, sampler, shadow and
    # rollout panels are empty on a classifier-only server that never rolled out)
    with_data = {p["title"] for p in dashboard["panels"] for t in p.get("targets", []) if answered[t["expr"]]}
    assert {"Requests / s", "Refused with 429 (queue full) / s", "Request time p50 / p99", "Queue wait p99",
            "Compute time per batch p99", "Mean batch size", "Queue depth", "Executions / s and rows / s",
            "Ready replicas"} <= with_data, with_data


def test_dashboard_variables_resolve_to_the_served_models(scraped):
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert set(variables) == {"datasource", "model", "version"}
    label_values = re.compile(r"label_values\((?P<match>.+), (?P<label>\w+)\)")
    found = {}
    for name in ("model", "version"):
        m = label_values.fullmatch(variables[name]["query"]["query"])
        assert m, variables[name]
        match = m["match"].replace("$model", ".*")
        answer = httpx.get(f"{scraped.prometheus}/api/v1/label/{m['label']}/values", params={"match[]": match}).json()
        assert answer["status"] == "success", answer
        found[name] = answer["data"]
    assert found == {"model": [BATCHED, SHEDDING], "version": ["1", "2"]}

