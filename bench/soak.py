"""Soak: N minutes of mixed load on one server, watching for leaks and latency drift.

One run:
  1. builds the demo classifier registry with `zooserve demo` in a temp dir, or takes `--registry`
     (every engine kind: `zooserve demo --registry DIR`, the whole demo, ~12 minutes on 2 cores);
  2. starts `zooserve serve --threads 1` on a free loopback port;
  3. picks loadtest/locustfile.py's user class for every engine kind the registry serves (classify:
     ClassifierUser, tokens: StreamingTokenUser, sequence: ForecastUser, sample: GanUser / VaeUser,
     denoise: DiffusionUser) and runs them in one headless locust for `--minutes` (give at least one
     user per class: locust shares the users out by the classes' weights); this file, loaded by locust
     beside the locustfile, records every request's latency by minute of the run, overall, per engine
     kind and per model;
  4. samples the server process (psutil, else /proc) before the load ("start"), every `--sample-s`
     under load, and once the load has stopped ("end"): resident memory, open file descriptors,
     threads, CPU seconds, and from /metrics the requests, non-200 answers and the server-side p99
     of each interval (bucket deltas of zooserve_request_duration_seconds), overall and per engine
     kind, and the engine state that should drain once the load stops (token slots running and
     waiting, queued requests, live stateful sequences and their bytes; engine restarts);
  5. prints the table, the same per kind, the client p50/p99 of each minute, each model's p99 in the
     first and the last minute, the ratios end/start, and the growth from the first minute under load
     to the last (what a leak shows as: warm-up has happened by then).

    .venv/bin/python bench/soak.py [--minutes 10] [--registry DIR] [--users 9] [--wait 0]
                                   [--sample-s 60] [--out FILE.json] [--keep]

Not part of the test suite (minutes long). Results: docs/reliability.md, "Soak".
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))       # bench/classify.py, run by locust too
from classify import build_registry, free_port, zooserve_cmd  # noqa: E402  (standard library only)
LATENCY_ENV = "ZOOSERVE_SOAK_LATENCY_OUT"     # set: this file was loaded by locust, record latencies there
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- inside locust: per-minute client latencies ----------------------------------------------

KINDS_ENV = "ZOOSERVE_SOAK_KINDS"             # {model: engine kind} as JSON, for the hook's per-kind buckets
MODEL_IN_NAME = re.compile(r"^/v2/models/([^/]+)/|^/v1/completions (\S+)")


def model_of(name: str) -> str | None:
    """The model a locustfile request name is about ("/v2/models/M/infer (...)", "/v1/completions M ...")."""
    m = MODEL_IN_NAME.match(name)
    return m and (m.group(1) or m.group(2))


def install_locust_hooks(out_path: str, bucket_s: float, kinds: dict[str, str]) -> None:
    """Record each request's response time by `bucket_s` interval of the run, overall, by engine kind and
    by model (`kinds`: model -> kind; requests about no served model, such as the users' ready checks,
    count in "all" alone). Written at test stop as {"buckets": {index: {"all": summary, "kind": {kind:
    summary}, "model": {model: summary}}}} where summary = count, failures, p50, p99 (ms). Times are
    counted in 10 us steps, so memory stays small however long the run."""
    from locust import events

    started: list[float] = []
    counts: dict[int, dict[tuple[str, str], Counter]] = {}   # interval -> (group, key) -> {10 us steps: n}
    failures: dict[int, Counter] = {}                        # interval -> {(group, key): failed}

    @events.test_start.add_listener
    def _start(**_kwargs) -> None:
        started.append(time.monotonic())
        Path(out_path + ".started").touch()         # soak() starts its clock on this

    @events.request.add_listener
    def _request(request_type, name, response_time, exception=None, **_kwargs) -> None:
        if request_type == "SSE":        # the token user's extra "ttft" entries are not requests
            return
        index = int((time.monotonic() - (started[0] if started else time.monotonic())) // bucket_s)
        step = round(response_time * 100)
        model = model_of(name)
        keys = [("all", "all")]
        if model in kinds:
            keys += [("kind", kinds[model]), ("model", model)]
        for key in keys:
            counts.setdefault(index, {}).setdefault(key, Counter())[step] += 1
            if exception is not None:
                failures.setdefault(index, Counter())[key] += 1

    def summary(index: int, key: tuple[str, str], steps: Counter) -> dict:
        return {"count": sum(steps.values()), "failures": failures.get(index, Counter())[key],
                "p50_ms": quantile(steps, 0.50) / 100, "p99_ms": quantile(steps, 0.99) / 100}

    @events.test_stop.add_listener
    def _stop(**_kwargs) -> None:
        buckets = {}
        for index, by_key in sorted(counts.items()):
            out: dict = {"kind": {}, "model": {}}
            for (group, key), steps in sorted(by_key.items()):
                if group == "all":
                    out["all"] = summary(index, (group, key), steps)
                else:
                    out[group][key] = summary(index, (group, key), steps)
            buckets[index] = out
        Path(out_path).write_text(json.dumps({"bucket_s": bucket_s, "buckets": buckets}))


def quantile(counts: Counter, q: float) -> float:
    """The nearest-rank q-quantile of {value: count} (no interpolation): q of the requests took at most it."""
    total = sum(counts.values())
    if not total:
        return math.nan
    rank, seen = max(1, math.ceil(q * total)), 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return float(value)
    return float(max(counts))


if __name__ != "__main__" and os.environ.get(LATENCY_ENV):
    install_locust_hooks(os.environ[LATENCY_ENV], float(os.environ.get("ZOOSERVE_SOAK_BUCKET_S", "60")),
                         json.loads(os.environ.get(KINDS_ENV, "{}")))


# ---- the server process -----------------------------------------------------------------------

def process_sample(pid: int) -> dict[str, float]:
    """rss_mib, fds, threads, cpu_s of one process: psutil when installed, else /proc."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        p = psutil.Process(pid)
        with p.oneshot():
            cpu = p.cpu_times()
            return {"rss_mib": p.memory_info().rss / 2**20, "fds": p.num_fds(), "threads": p.num_threads(),
                    "cpu_s": cpu.user + cpu.system}
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return {"rss_mib": int(status["VmRSS"].split()[0]) / 1024, "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"]), "cpu_s": (int(fields[11]) + int(fields[12])) / CLK_TCK}


# engine state that should drain to zero once the load stops (a leak of slots, sequences or queue
# entries shows here first), and the engine restarts (a thread that failed), all summed over the models
GAUGES = {"zooserve_requests_running": "running", "zooserve_requests_waiting": "waiting",
          "zooserve_queue_depth": "queued", "zooserve_sequences_live": "sequences_live",
          "zooserve_sequence_state_bytes": "sequence_state_bytes",
          "zooserve_engine_restarts_total": "engine_restarts"}


def metric_totals(url: str) -> dict:
    """From /metrics, per model (every version summed): requests, non-200 answers and the request-time
    buckets; and the GAUGES, summed over every model."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as r:
        text = r.read().decode()
    models: dict[str, dict] = {}
    gauges = dict.fromkeys(GAUGES.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in GAUGES:
                gauges[GAUGES[s.name]] += s.value
            if s.name not in ("zooserve_requests_total", "zooserve_request_duration_seconds_bucket"):
                continue
            m = models.setdefault(s.labels["model"], {"requests": 0.0, "non200": 0.0, "buckets": {}})
            if s.name == "zooserve_requests_total":
                m["requests"] += s.value
                m["non200"] += s.value if s.labels["status"] != "200" else 0.0
            else:
                le = float(s.labels["le"])
                m["buckets"][le] = m["buckets"].get(le, 0.0) + s.value
    return {"models": models, "gauges": gauges}


def interval(before: dict, after: dict, models: list[str] | None = None) -> dict:
    """Requests, non-200s and server-side p99 (ms) answered between two scrapes by `models` (None: all).
    The p99 is interpolated in the buckets as Prometheus' histogram_quantile does."""
    from serve.judge import histogram_quantile

    empty = {"requests": 0.0, "non200": 0.0, "buckets": {}}
    out = {"requests": 0.0, "non200": 0.0}
    delta: dict[float, float] = {}
    for name in (after["models"] if models is None else models):
        a, b = after["models"].get(name, empty), before["models"].get(name, empty)
        out["requests"] += a["requests"] - b["requests"]
        out["non200"] += a["non200"] - b["non200"]
        for le, n in a["buckets"].items():
            delta[le] = delta.get(le, 0.0) + n - b["buckets"].get(le, 0.0)
    out["server_p99_ms"] = round(histogram_quantile(0.99, delta) * 1000, 3)
    return out


# ---- the load -----------------------------------------------------------------------------------

def user_classes(registry: Path) -> tuple[list[str], dict[str, str], dict[str, list[str]]]:
    """(locust user classes, their environment, {kind: models}) for what the registry serves."""
    from model_registry import Registry

    reg = Registry(registry)
    kinds: dict[str, list[str]] = {}
    classes, env = [], {}
    samplers = {}
    for name in reg.models():
        cfg = reg.model_config(name)
        kinds.setdefault(cfg.kind, []).append(name)
        if cfg.kind in ("sample", "denoise"):
            samplers.setdefault(cfg.family if cfg.kind == "sample" else "diffusion", name)
    if kinds.get("classify"):
        classes.append("ClassifierUser")
        env["ZOOSERVE_LOADTEST_MODELS"] = ",".join(kinds["classify"])
    if kinds.get("tokens"):
        classes.append("StreamingTokenUser")
        env["ZOOSERVE_LOADTEST_TOKEN_MODELS"] = ",".join(kinds["tokens"])
    if kinds.get("sequence"):
        classes.append("ForecastUser")
        env["ZOOSERVE_LOADTEST_FORECAST_MODELS"] = ",".join(kinds["sequence"])
    for family, cls, var in (("gan", "GanUser", "GAN"), ("vae", "VaeUser", "VAE"),
                             ("diffusion", "DiffusionUser", "DIFFUSION")):
        if family in samplers:
            classes.append(cls)
            env[f"ZOOSERVE_LOADTEST_{var}_MODEL"] = samplers[family]
    if not classes:
        raise SystemExit(f"no model in {registry} that loadtest/locustfile.py has a user class for: {kinds}")
    return classes, env, kinds


def locust_cmd() -> list[str]:
    script = Path(sys.executable).with_name("locust")
    return [str(script)] if script.exists() else [sys.executable, "-m", "locust"]


@dataclass
class Sample:
    label: str                     # "start", "1", "2", ..., "end"
    at_s: float                    # seconds since the load started (negative: before)
    rss_mib: float
    fds: int
    threads: int
    cpu_total_s: float             # server CPU (user + system) since it started
    cpu_s: float                   # ... since the previous sample
    requests: float                # answered since the previous sample (/metrics)
    non200: float
    server_p99_ms: float
    client_p50_ms: float = math.nan
    client_p99_ms: float = math.nan
    by_kind: dict = field(default_factory=dict)   # kind -> the same counts for its models, client failures
    gauges: dict = field(default_factory=dict)    # GAUGES at the sample (engine_restarts: since start-up)


@dataclass
class Soak:
    date: str
    command: str
    machine: dict
    registry: str
    kinds: dict
    user_classes: list
    users: int
    minutes: float
    wait_s: float
    users_by_class: dict = field(default_factory=dict)   # as locust spawned them (its log)
    samples: list = field(default_factory=list)
    by_model: dict = field(default_factory=dict)         # model -> client p99 first/last full interval
    ratios: dict = field(default_factory=dict)
    locust_exit: int | None = None
    locust_summary: str = ""
    loadavg_before: tuple = ()      # the machine's 1/5/15-minute load: other work on it skews latency
    loadavg_after: tuple = ()


def machine() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    info = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                           if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    for dist in ("onnxruntime", "torch", "locust", "uvicorn"):
        try:
            info[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return info


def soak(args) -> Soak:
    work = Path(tempfile.mkdtemp(prefix="zooserve-soak-"))
    registry = Path(args.registry) if args.registry else work / "registry"
    if not args.registry:
        build_registry(registry)
    classes, env, kinds = user_classes(registry)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = open(work / "server.log", "wb")
    server = subprocess.Popen([*zooserve_cmd(), "serve", "--registry", str(registry), "--port", str(port),
                               "--threads", "1", "--log-level", "warning"], cwd=REPO_ROOT,
                              stdout=server_log, stderr=subprocess.STDOUT)
    result = Soak(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                  command=" ".join([Path(sys.executable).name, *sys.argv]), machine=machine(),
                  registry=str(registry), kinds=kinds, user_classes=classes, users=args.users, minutes=args.minutes,
                  wait_s=args.wait)
    result.loadavg_before = os.getloadavg()
    load: subprocess.Popen | None = None
    try:
        wait_ready(url, server)
        latency_path = work / "latency.json"
        duration_s = int(round(args.minutes * 60))
        tail_s = 3        # locust runs a little longer, so that the last interval's sample is still under load
        locust_env = {**os.environ, **env, LATENCY_ENV: str(latency_path),
                      KINDS_ENV: json.dumps({m: kind for kind, models in kinds.items() for m in models}),
                      "ZOOSERVE_SOAK_BUCKET_S": str(args.sample_s), "ZOOSERVE_LOADTEST_WAIT": str(args.wait),
                      "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
        cmd = [*locust_cmd(), "-f", f"loadtest/locustfile.py,{Path(__file__).resolve()}", "--headless",
               "--host", url, "--users", str(args.users), "--spawn-rate", str(args.users),
               "--run-time", f"{duration_s + tail_s}s", "--stop-timeout", "10", "--only-summary",
               "--csv", str(work / "locust"), *classes]
        if args.users < len(classes):
            print(f"[soak] warning: {args.users} users for {len(classes)} user classes: some kinds get no load",
                  file=sys.stderr)
        print(f"[soak] {args.users} users ({', '.join(classes)}) for {duration_s} s against {url}; "
              f"files in {work}", flush=True)

        sample, _ = take(server.pid, url, "start", 0.0, None, None, kinds)
        result.samples.append(sample)
        locust_log = open(work / "locust.log", "w")
        load = subprocess.Popen(cmd, cwd=REPO_ROOT, env=locust_env, stdout=locust_log, stderr=subprocess.STDOUT)
        marker = Path(str(latency_path) + ".started")
        while not marker.exists() and load.poll() is None:     # locust imports, then starts its users
            time.sleep(0.05)
        started = time.monotonic()
        previous = metric_totals(url)           # the first interval starts with the load
        n = 1                                   # the interval that ends at the next sample
        while load.poll() is None:
            due = started + n * args.sample_s
            if due > started + duration_s + 0.5:          # every interval sampled: the tail runs out
                load.wait()
                break
            time.sleep(max(0.0, min(due - time.monotonic(), 1.0)))
            if time.monotonic() >= due and load.poll() is None:
                sample, previous = take(server.pid, url, str(n), time.monotonic() - started, previous,
                                        result.samples[-1], kinds)
                result.samples.append(sample)
                print(f"[soak] {format_row(sample)}", flush=True)     # the client's p99s come at the end
                n += 1
        result.locust_exit = load.wait()
        locust_log.close()
        result.users_by_class = spawned_users(work / "locust.log")
        time.sleep(5)                                      # connections close, queues drain
        sample, _ = take(server.pid, url, "end", time.monotonic() - started, previous, result.samples[-1], kinds)
        result.samples.append(sample)
        attach_client_latency(result, latency_path, args.sample_s)
        result.locust_summary = locust_aggregate(work / "locust_stats.csv")
    finally:
        if load is not None and load.poll() is None:      # interrupted: stop the load first
            load.terminate()
            load.wait()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        server_log.close()
    result.ratios = ratios(result.samples)
    result.loadavg_after = os.getloadavg()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return result


def wait_ready(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with {server.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"server not ready in {timeout_s} s")


def take(pid: int, url: str, label: str, at_s: float, before: dict | None, previous: Sample | None,
         kinds: dict[str, list[str]]) -> tuple[Sample, dict]:
    """One row: the process now, then what /metrics counted since `before` (overall and per engine kind);
    and the new totals. The process first: the scrape's own connection would count as an open file until
    the server closes it."""
    proc = process_sample(pid)
    after = metric_totals(url)
    before = before or after
    overall = interval(before, after)
    return Sample(label=label, at_s=round(at_s, 1), rss_mib=round(proc["rss_mib"], 1), fds=int(proc["fds"]),
                  threads=int(proc["threads"]), cpu_total_s=proc["cpu_s"],
                  cpu_s=round(proc["cpu_s"] - (previous.cpu_total_s if previous else proc["cpu_s"]), 2),
                  requests=overall["requests"], non200=overall["non200"], server_p99_ms=overall["server_p99_ms"],
                  by_kind={kind: interval(before, after, models) for kind, models in kinds.items()},
                  gauges=after["gauges"]), after


def spawned_users(locust_log: Path) -> dict[str, int]:
    """Users per class from locust's "All users spawned: {...} (N total users)" log line."""
    try:
        for line in locust_log.read_text().splitlines():
            if "All users spawned:" in line:
                return json.loads(line.split("All users spawned:", 1)[1].rsplit("(", 1)[0])
    except (OSError, ValueError):
        pass
    return {}


def attach_client_latency(result: Soak, path: Path, bucket_s: float) -> None:
    """Fill each interval's client p50/p99 (overall and per kind) from the locust hook's file, and each
    model's p99 in the first and the last full interval."""
    if not path.exists():
        print("[soak] locust wrote no latency file (see locust.log, --keep)", file=sys.stderr)
        return
    buckets = {int(k): v for k, v in json.loads(path.read_text())["buckets"].items()}
    for sample in result.samples:
        if not (sample.label.isdigit() and int(sample.label) - 1 in buckets):
            continue
        bucket = buckets[int(sample.label) - 1]
        sample.client_p50_ms, sample.client_p99_ms = bucket["all"]["p50_ms"], bucket["all"]["p99_ms"]
        for kind, row in sample.by_kind.items():
            client = bucket["kind"].get(kind, {})
            row |= {"client_requests": client.get("count", 0), "client_failures": client.get("failures", 0),
                    "client_p50_ms": client.get("p50_ms", math.nan), "client_p99_ms": client.get("p99_ms", math.nan)}
    full = [i for i in sorted(buckets) if i < int(result.minutes * 60 // bucket_s)]     # complete intervals only
    if full:
        first, last = buckets[full[0]]["model"], buckets[full[-1]]["model"]
        for model in sorted(set(first) & set(last)):
            result.by_model[model] = {
                "first_p99_ms": first[model]["p99_ms"], "last_p99_ms": last[model]["p99_ms"],
                "requests": sum(b["model"].get(model, {}).get("count", 0) for b in buckets.values()),
                "failures": sum(b["model"].get(model, {}).get("failures", 0) for b in buckets.values())}


def locust_aggregate(stats_csv: Path) -> str:
    import csv

    if not stats_csv.exists():
        return ""
    for row in csv.DictReader(stats_csv.open()):
        if row["Name"] == "Aggregated":
            return (f"{row['Request Count']} requests, {row['Failure Count']} failures, "
                    f"{float(row['Requests/s']):.1f} req/s, p50 {row['50%']} ms, p99 {row['99%']} ms")
    return ""


def ratios(samples: list[Sample]) -> dict:
    """end/start of the process figures; last/first full interval of those and of every p99 (also per kind)."""
    start, end = samples[0], samples[-1]
    loaded = [s for s in samples if s.label.isdigit()]
    out: dict = {f"{k}_end_over_start": round(getattr(end, k) / getattr(start, k), 3)
                 for k in ("rss_mib", "fds", "threads")}
    if len(loaded) < 2:
        return out
    first, last = loaded[0], loaded[-1]
    out |= {f"{k}_last_over_first_minute": round(getattr(last, k) / getattr(first, k), 3)
            for k in ("rss_mib", "fds", "threads")}
    for k in ("client_p99_ms", "server_p99_ms"):
        out[f"{k}_last_over_first_minute"] = ratio(getattr(first, k), getattr(last, k))
    out["by_kind"] = {kind: {f"{k}_last_over_first_minute": ratio(first.by_kind[kind].get(k, math.nan),
                                                                    last.by_kind.get(kind, {}).get(k, math.nan))
                             for k in ("client_p99_ms", "server_p99_ms")}
                      for kind in first.by_kind}
    return out


def ratio(a: float, b: float) -> float | None:
    return round(b / a, 3) if a and not math.isnan(a) and not math.isnan(b) else None


def ms(v: float, width: int = 8) -> str:
    return f"{'-':>{width}}" if v is None or math.isnan(v) else f"{v:>{width}.2f}"


def format_row(s: Sample) -> str:
    return (f"{s.label:>5} {s.at_s:>7.0f} {s.rss_mib:>8.1f} {s.fds:>5} {s.threads:>7} {s.cpu_s:>7.1f} "
            f"{s.requests:>9.0f} {s.non200:>6.0f} {ms(s.client_p50_ms)} {ms(s.client_p99_ms)} {ms(s.server_p99_ms)}")


HEADER = (f"{'when':>5} {'at_s':>7} {'rss_MiB':>8} {'fds':>5} {'threads':>7} {'cpu_s':>7} {'requests':>9} "
          f"{'non200':>6} {'p50_ms':>8} {'p99_ms':>8} {'srv_p99':>8}")


def print_report(result: Soak) -> None:
    print(f"\n[soak] {result.date}, {result.machine.get('cpus')} CPUs ({result.machine.get('cpu', '?')}), "
          f"{result.users} users {result.users_by_class or ''}, wait {result.wait_s:g} s, {result.minutes:g} min, "
          f"kinds {result.kinds}")
    print(f"load average before {result.loadavg_before}, after {result.loadavg_after}")
    print("p50_ms/p99_ms: the client's (locust) over the interval that ends at the row; srv_p99: the server's "
          "request time from /metrics buckets; start = before the load, end = 5 s after it stopped (its "
          "requests: the last few seconds of load)")
    print(HEADER)
    for s in result.samples:
        print(format_row(s))
    print("\nper engine kind: requests and non-200 answers (server), client failures, client p50/p99 and "
          "server p99 (ms) of each interval")
    print(f"    {'when':>5} {'requests':>8} {'non200':>6} {'fail':>5} {'p50_ms':>9} {'p99_ms':>9} {'srv_p99':>9}")
    for kind in result.kinds:
        print(f"  {kind}: {', '.join(result.kinds[kind])}")
        for s in result.samples[1:]:
            k = s.by_kind.get(kind, {})
            print(f"    {s.label:>5} {k.get('requests', 0):>8.0f} {k.get('non200', 0):>6.0f} "
                  f"{k.get('client_failures', 0):>5} {ms(k.get('client_p50_ms', math.nan), 9)} "
                  f"{ms(k.get('client_p99_ms', math.nan), 9)} {ms(k.get('server_p99_ms', math.nan), 9)}")
    end = result.samples[-1].gauges
    print("\nengine state 5 s after the load:", json.dumps(end))
    if result.by_model:
        print("\nclient p99 by model, first and last full interval:")
        for name, v in result.by_model.items():
            print(f"  {name:<20} {v['first_p99_ms']:>9.2f} -> {v['last_p99_ms']:>9.2f} ms  "
                  f"({v['requests']} requests, {v['failures']} failed)")
    print("\nratios:", json.dumps(result.ratios))
    print("locust:", result.locust_summary or "(no stats)", f"(exit {result.locust_exit})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=10.0, help="minutes of load (default 10)")
    ap.add_argument("--registry", help="registry to serve (default: build the demo classifiers in a temp dir; "
                    "`zooserve demo --registry DIR` builds one with every engine kind)")
    ap.add_argument("--users", type=int, default=9, help="locust users, all started at once (default 9: with "
                    "every kind served, 2 each for classifiers, token models, forecasters, 1 per sampler)")
    ap.add_argument("--wait", type=float, default=0.0, help="seconds each user waits between requests (default 0)")
    ap.add_argument("--sample-s", type=float, default=60.0, help="seconds between samples (default 60)")
    ap.add_argument("--out", metavar="FILE", help="also write the result as JSON here")
    ap.add_argument("--keep", action="store_true", help="keep the run folder (server and locust logs, CSVs)")
    args = ap.parse_args(argv)
    result = soak(args)
    print_report(result)
    if args.out:
        Path(args.out).write_text(json.dumps(asdict(result), indent=2, default=str))
    return 0 if result.locust_exit == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
