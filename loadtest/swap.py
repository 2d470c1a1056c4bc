"""Hot swaps under load: a real headless locust against a running zooserve while the registry
changes under it (alias flips, publishes, split changes); exits non-zero on any failed request.

    .venv/bin/python loadtest/swap.py --registry R --host http://127.0.0.1:8000 --model mlp-digits
        [--flips 20] [--publishes 5] [--splits 5] [--interval 0.75] [--users 4] [--out DIR]

The server must serve the registry R (`zooserve serve --registry R`) and follow it (its watch is on
by default). What the script does, one job per function:

1. `prepare`: the model gets two versions and two aliases, `stable` and `canary` (a copy of the
   stable version is published when there is only one); it waits until the server serves both.
2. `run_locust`: starts `locust -f loadtest/locustfile.py <UserClass> --headless` against the
   server, the user class picked by the model's kind (classify: ClassifierUser, sequence:
   ForecastUser with stateful sequences, tokens: StreamingTokenUser over /v1/completions stream,
   denoise: DiffusionUser, sample: GanUser / VaeUser), every user on this one model.
3. `make_changes`: once requests flow, one registry change every `--interval` seconds, the kinds
   interleaved evenly; each waits until the server has the one before in force (its config
   endpoint shows the written revision and routing), so that none is coalesced into the next:
     flip     `stable` moves between the two versions of the current pair;
     publish  the stable version's folder is published as a new version (Registry.publish) and
              `canary` moves to it: the pair becomes (stable, new). The version policy stays the
              default ("latest 1" plus aliased versions), so the server holds the stable, the
              canary and the latest version, and unloads each version a change leaves behind (so a
              flip back to the older version of the pair loads it again: once `stable` left it,
              it was neither the latest nor aliased);
     split    `routing.split` goes stable=70 canary=30, then back to stable=100 canary=0.
4. `Monitor` polls the server meanwhile (/v2/repository/index, /metrics): how many versions of the
   model it held at once, and which versions answered requests.
5. `summarize`: locust's final counts (its --json-file), its failures CSV, the requests completed
   while the changes were made (its full stats history), the changes and how long each took to be
   in force; written to <out>/<stamp>_swap_<model>_swap.json. Requests are HTTP requests: the
   "ttft" entries the token users add to locust's stats are not counted.

Exit status: 0 when locust ran requests across the changes and none failed; 1 on a failed request
(or locust's own error); 2 when the run could not be made (server not ready, locust missing, no
request before the changes, a change refused).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from model_registry import ModelConfig, Registry, RegistryError

ROOT = Path(__file__).resolve().parents[1]

# kind (or family, for the two "sample" samplers) -> (locust user class, env var naming its model)
USERS = {
    "classify": ("ClassifierUser", "ZOOSERVE_LOADTEST_MODELS"),
    "sequence": ("ForecastUser", "ZOOSERVE_LOADTEST_FORECAST_MODELS"),
    "tokens": ("StreamingTokenUser", "ZOOSERVE_LOADTEST_TOKEN_MODELS"),
    "denoise": ("DiffusionUser", "ZOOSERVE_LOADTEST_DIFFUSION_MODEL"),
    "gan": ("GanUser", "ZOOSERVE_LOADTEST_GAN_MODEL"),
    "vae": ("VaeUser", "ZOOSERVE_LOADTEST_VAE_MODEL"),
}
STARTUP_S = 30.0      # locust's own start (imports, data sets) until its first request, at most
SPLITS = ({"stable": 70, "canary": 30}, {"stable": 100, "canary": 0})


class SwapError(Exception):
    """The run could not be made (exit status 2)."""


# ---- the model and its aliases -----------------------------------------------------------------

def user_class(registry: Registry, model: str) -> tuple[str, str]:
    """(locust user class, the env var that names its model) for the model's kind."""
    cfg = registry.model_config(model)
    key = cfg.family if cfg.kind == "sample" else cfg.kind
    if key not in USERS:
        raise SwapError(f"{model}: no locust user for kind {cfg.kind!r} (family {cfg.family!r})")
    return USERS[key]


def prepare(registry: Registry, model: str) -> tuple[int, int]:
    """Give the model aliases `stable` and `canary` on two different versions; (stable, canary)."""
    aliases = registry.model_config(model).routing.aliases
    stable = aliases.get("stable") or registry.versions(model)[-1]
    if "stable" not in aliases:
        registry.set_alias(model, "stable", stable)
    canary = aliases.get("canary")
    if canary is None or canary == stable:
        others = [v for v in registry.versions(model) if v != stable]
        canary = others[-1] if others else registry.publish(model, registry.version_dir(model, stable))
        registry.set_alias(model, "canary", canary)
    return stable, canary


def model_versions(host: str, model: str) -> dict[int, str]:
    """The versions of `model` the server holds now -> their state (READY, LOADING, UNLOADING, ...)."""
    rows = httpx.post(f"{host}/v2/repository/index", timeout=5).json()
    return {int(r["version"]): r["state"] for r in rows if r.get("name") == model and "version" in r}


def wait_serving(host: str, model: str, versions: set[int], timeout_s: float) -> None:
    """Until the server holds every one of `versions` READY (it picks registry changes up by itself)."""
    deadline, held = time.monotonic() + timeout_s, {}
    while time.monotonic() < deadline:
        try:
            held = model_versions(host, model)
            if all(held.get(v) == "READY" for v in versions):
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SwapError(f"{model}: the server at {host} does not serve versions {sorted(versions)} after "
                    f"{timeout_s:.0f} s (it holds {held}); is it serving this registry with its watch on?")


def settle(registry: Registry, host: str, model: str, timeout_s: float) -> tuple[dict[int, str], bool]:
    """Wait until the server holds just what the version policy and the aliases load, all READY;
    (what it holds, whether it got there). A forecaster's version stays until its live sequences end."""
    cfg = registry.model_config(model)
    available = registry.versions(model)
    policy = cfg.version_policy
    wanted = set(available if policy.policy == "all" else policy.versions if policy.policy == "specific"
                 else available[-policy.num_versions:]) & set(available)
    wanted |= set(cfg.routing.aliases.values())
    deadline, held = time.monotonic() + timeout_s, {}
    while True:
        held = model_versions(host, model)
        if held == {v: "READY" for v in wanted}:
            return held, True
        if time.monotonic() > deadline:
            return held, False
        time.sleep(0.2)


# ---- the registry changes ---------------------------------------------------------------------

def plan(flips: int, publishes: int, splits: int) -> list[str]:
    """The changes in order, each kind spread evenly over the run (offsets keep them from colliding)."""
    slots = [((i + offset) / n, kind) for kind, n, offset in (("flip", flips, 0.5), ("publish", publishes, 0.3),
                                                               ("split", splits, 0.7)) for i in range(n)]
    return [kind for _, kind in sorted(slots)]


def in_force(host: str, model: str) -> tuple[int, dict]:
    """(revision, routing) of the model.json the server has in force (its config endpoint)."""
    params = httpx.get(f"{host}/v2/models/{model}/config", timeout=5).json()["parameters"]
    return params["revision"]["int64_param"], json.loads(params["routing"]["string_value"])


def wait_applied(host: str, model: str, written: ModelConfig, timeout_s: float) -> float:
    """Seconds until the server has `written` (its revision and routing) in force: an alias on a
    version still loading is held back until that version passed its golden check."""
    want, started = written.routing.model_dump(mode="json"), time.monotonic()
    while True:
        try:
            revision, routing = in_force(host, model)
            if revision >= written.revision and routing == want:
                return time.monotonic() - started
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        if time.monotonic() - started > timeout_s:
            raise SwapError(f"{model}: revision {written.revision} ({want}) not in force at {host} after "
                            f"{timeout_s:.0f} s")
        time.sleep(0.05)


@dataclass
class Changer:
    """Makes one registry change at a time and waits until the server has it in force;
    `pair` is the two versions `stable` flips between."""

    registry: Registry
    host: str
    model: str
    pair: list[int]
    apply_timeout_s: float = 30.0
    splits_made: int = 0
    log: list[dict] = field(default_factory=list)

    def apply(self, kind: str, t: float) -> None:
        written, detail = getattr(self, kind)()
        applied_s = wait_applied(self.host, self.model, written, self.apply_timeout_s)
        self.log.append({"t": round(t, 2), "change": kind, **detail, "revision": written.revision,
                         "in_force_after_s": round(applied_s, 3)})

    def flip(self) -> tuple[ModelConfig, dict]:
        stable = self.registry.model_config(self.model).routing.aliases["stable"]
        target = self.pair[1] if stable == self.pair[0] else self.pair[0]
        return self.registry.set_alias(self.model, "stable", target), {"stable": target}

    def publish(self) -> tuple[ModelConfig, dict]:
        stable = self.registry.model_config(self.model).routing.aliases["stable"]
        version = self.registry.publish(self.model, self.registry.version_dir(self.model, stable))
        self.pair = [stable, version]
        written = self.registry.set_alias(self.model, "canary", version)
        return written, {"published": version, "copy_of": stable, "canary": version}

    def split(self) -> tuple[ModelConfig, dict]:
        weights = dict(SPLITS[self.splits_made % len(SPLITS)])
        self.splits_made += 1
        return self.registry.set_split(self.model, weights), {"split": weights}


def make_changes(changer: Changer, changes: list[str], interval_s: float) -> None:
    """One change every `interval_s` seconds, each once the server has the one before in force."""
    t0 = time.monotonic()
    for kind in changes:
        changer.apply(kind, time.monotonic() - t0)
        time.sleep(max(0.0, interval_s - (time.monotonic() - t0 - changer.log[-1]["t"])))


# ---- watching the server ----------------------------------------------------------------------

class Monitor(threading.Thread):
    """Polls the server: the most versions of the model held at once, and requests answered per
    version (zooserve_requests_total, status 200; a version's counters go when it unloads, so
    this is the largest count seen, a lower bound)."""

    def __init__(self, host: str, model: str, period_s: float = 0.25):
        super().__init__(daemon=True)
        self.host, self.model, self.period_s = host, model, period_s
        self.done = threading.Event()
        self.max_held, self.held_at_max = 0, {}
        self.seen: set[int] = set()
        self.answered: dict[int, int] = {}
        self.errors = 0

    def run(self) -> None:
        while not self.done.wait(self.period_s):
            try:
                self.sample()
            except (httpx.HTTPError, ValueError):
                self.errors += 1

    def sample(self) -> None:
        held = model_versions(self.host, self.model)
        self.seen |= set(held)
        if len(held) > self.max_held:
            self.max_held, self.held_at_max = len(held), held
        text = httpx.get(f"{self.host}/metrics", timeout=5).text
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "zooserve_requests_total" and s.labels.get("model") == self.model \
                        and s.labels.get("status") == "200":
                    version = int(s.labels["version"])
                    self.answered[version] = max(self.answered.get(version, 0), int(s.value))


# ---- locust -----------------------------------------------------------------------------------

def locust_binary() -> str:
    here = Path(sys.executable).with_name("locust")
    found = str(here) if here.exists() else shutil.which("locust")
    if not found:
        raise SwapError("locust not found (next to this Python or on PATH); install the dev extra")
    return found


def run_locust(host: str, user: str, model_env: str, model: str, users: int, run_time_s: int,
               prefix: Path) -> subprocess.Popen:
    """Start a headless locust of `users` users of class `user`, all on `model`; its log goes to <prefix>_locust.log."""
    cmd = [locust_binary(), "-f", str(ROOT / "loadtest" / "locustfile.py"), user, "--headless",
           "-u", str(users), "-r", str(users), "--run-time", f"{run_time_s}s", "--stop-timeout", "10",
           "--host", host, "--csv", str(prefix), "--csv-full-history", "--json-file", str(prefix), "--only-summary",
           "--exit-code-on-error", "1"]
    env = {**os.environ, model_env: model}
    with open(f"{prefix}_locust.log", "w") as log:         # the child keeps its own copy of the file
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def history(prefix: Path) -> list[tuple[int, int, int]]:
    """(unix second, HTTP requests so far, their failures so far) per second of locust's full stats
    history; the "ttft" entries StreamingTokenUser adds (type SSE) are not requests of their own."""
    path = Path(f"{prefix}_stats_history.csv")
    if not path.exists():
        return []
    ticks, requests, failed = [], 0, 0
    with path.open() as f:
        for r in csv.DictReader(f):          # each tick: a row per entry, then the Aggregated row
            if r["Name"] == "Aggregated":
                ticks.append((int(r["Timestamp"]), requests, failed))
                requests = failed = 0
            elif r["Type"] != "SSE" and r["Total Request Count"]:
                requests += int(r["Total Request Count"])
                failed += int(r["Total Failure Count"])
    return ticks


def wait_first_request(proc: subprocess.Popen, monitor: "Monitor", baseline: int, timeout_s: float) -> None:
    """Until the server has answered locust's first requests (its counters, as the monitor sees them;
    locust's own CSV reaches the disk only every few seconds)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SwapError(f"locust exited with {proc.returncode} before any request; see its log")
        if sum(monitor.answered.values()) > baseline:
            return
        time.sleep(0.1)
    raise SwapError(f"the server answered no request within {timeout_s:.0f} s of starting locust; see its log")


def failures(prefix: Path) -> list[dict]:
    """locust's failures CSV: one row per (method, name, error) with its occurrences."""
    path = Path(f"{prefix}_failures.csv")
    if not path.exists():
        return []
    with path.open() as f:
        return [{"name": r["Name"], "error": r["Error"], "occurrences": int(r["Occurrences"])} for r in csv.DictReader(f)]


# ---- the report ---------------------------------------------------------------------------------

def summarize(prefix: Path, locust_rc: int, changer: Changer, planned: int, window: tuple[float, float],
              monitor: Monitor, held_after: dict[int, str], extra: dict) -> dict:
    """Everything the run measured, as one dict (also written to <prefix>_swap.json)."""
    final = json.loads(Path(f"{prefix}.json").read_text()) if Path(f"{prefix}.json").exists() else []
    http = [e for e in final if e["method"] != "SSE"]       # not the token users' "ttft" entries
    requests = sum(e["num_requests"] for e in http)
    failed = sum(e["num_failures"] for e in final)
    rows = history(prefix)
    applied = [c["in_force_after_s"] for c in changer.log]
    start, end = window
    during = [r for r in rows if start <= r[0] <= end + 1]
    before = [r for r in rows if r[0] < start]
    in_window = (during[-1][1] - (before[-1][1] if before else 0)) if during else 0
    stalled = sum(1 for a, b in zip(during, during[1:]) if b[1] == a[1])
    report = {
        **extra,
        "requests": requests, "failures": failed, "locust_exit_code": locust_rc,
        "requests_during_changes": in_window,
        "seconds_without_a_completed_request_during_changes": stalled,
        "changes_planned": planned, "changes_made": len(changer.log),
        "flips": sum(c["change"] == "flip" for c in changer.log),
        "publishes": sum(c["change"] == "publish" for c in changer.log),
        "splits": sum(c["change"] == "split" for c in changer.log),
        "changes_seconds": round(end - start, 1),
        "in_force_after_s_median": round(statistics.median(applied), 3) if applied else None,
        "in_force_after_s_max": round(max(applied), 3) if applied else None,
        "max_versions_held": monitor.max_held, "held_at_max": monitor.held_at_max,
        "versions_seen": sorted(monitor.seen), "answered_by_version": dict(sorted(monitor.answered.items())),
        "held_after": held_after,
        "per_request_name": {e["name"]: [e["num_requests"], e["num_failures"]] for e in final},
        "failure_reasons": failures(prefix),
        "changes": changer.log,
    }
    Path(f"{prefix}_swap.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def print_report(r: dict, prefix: Path) -> None:
    print(f"swap: {r['model']} ({r['user_class']}, {r['users']} users): {r['requests']} requests, "
          f"{r['failures']} failures; {r['changes_made']}/{r['changes_planned']} changes ({r['flips']} alias flips, "
          f"{r['publishes']} publishes, {r['splits']} split changes) in {r['changes_seconds']} s, each in force "
          f"after {r['in_force_after_s_median']} s (median; max {r['in_force_after_s_max']} s), "
          f"{r['requests_during_changes']} requests meanwhile "
          f"({r['seconds_without_a_completed_request_during_changes']} s without one)")
    print(f"swap: versions held at once at most {r['max_versions_held']} {r['held_at_max']}; held after the run "
          f"{r['held_after']}{'' if r['settled'] else ' (not yet settled)'}; requests answered per version (at least) {r['answered_by_version']}")
    for f in r["failure_reasons"]:
        print(f"swap: FAILED {f['occurrences']}x {f['name']}: {f['error']}")
    print(f"swap: details in {prefix}_swap.json, locust's log and CSVs beside it")


# ---- main -------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--registry", required=True, type=Path, help="registry root the server serves")
    p.add_argument("--host", default="http://127.0.0.1:8000", help="the server's URL (default: %(default)s)")
    p.add_argument("--model", required=True, help="model to load and change (its kind picks the locust user)")
    p.add_argument("--flips", type=int, default=20,
                   help="alias flips of `stable` between two versions (default: %(default)s)")
    p.add_argument("--publishes", type=int, default=5,
                   help="new versions published (copies of stable) (default: %(default)s)")
    p.add_argument("--splits", type=int, default=5,
                   help="split changes (stable=70 canary=30, and back) (default: %(default)s)")
    p.add_argument("--interval", type=float, default=0.75, help="seconds between two changes (default: %(default)s)")
    p.add_argument("--users", type=int, default=4, help="locust users, all spawned at once (default: %(default)s)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of load before the first change (default: %(default)s)")
    p.add_argument("--cooldown", type=float, default=5.0,
                   help="seconds of load after the last change (default: %(default)s)")
    p.add_argument("--settle", type=float, default=10.0, help="seconds to wait, after the load, for the server "
                   "to hold just the versions the policy and aliases load (default: %(default)s)")
    p.add_argument("--out", type=Path, default=ROOT / "loadtest" / "results",
                   help="folder for the results (default: loadtest/results)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    host = args.host.rstrip("/")
    registry = Registry(args.registry)
    prefix = args.out / f"{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}_swap_{args.model}"
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        user, model_env = user_class(registry, args.model)
        stable, canary = prepare(registry, args.model)
        wait_serving(host, args.model, {stable, canary}, timeout_s=60)
        changes = plan(args.flips, args.publishes, args.splits)
        # locust stops on SIGTERM once the changes and the cooldown are over (as at its --run-time,
        # which is only a backstop here: locust's start, a run of late changes)
        backstop = int(STARTUP_S + args.warmup + 3 * len(changes) * args.interval + args.cooldown) + 1
        monitor = Monitor(host, args.model)
        monitor.sample()
        baseline = sum(monitor.answered.values())
        monitor.start()
        proc = run_locust(host, user, model_env, args.model, args.users, backstop, prefix)
        changer = Changer(registry, host, args.model, [stable, canary])
        try:
            wait_first_request(proc, monitor, baseline, timeout_s=STARTUP_S)
            time.sleep(args.warmup)
            start = time.time()
            make_changes(changer, changes, args.interval)
            end = time.time()
            time.sleep(args.cooldown)
        finally:
            stopped = time.time()
            if proc.poll() is None:
                proc.terminate()
            locust_rc = proc.wait()
            monitor.done.set()
            monitor.join()
    except (SwapError, RegistryError) as exc:
        print(f"swap: {exc}", file=sys.stderr)
        return 2
    held_after, settled = settle(registry, host, args.model, args.settle)
    report = summarize(prefix, locust_rc, changer, len(changes), (start, end), monitor, held_after,
                       {"model": args.model, "user_class": user, "users": args.users, "host": host,
                        "interval_s": args.interval, "load_seconds_around_changes": round(stopped - start + args.warmup, 1),
                        "settled": settled})
    print_report(report, prefix)
    if report["failures"] or locust_rc != 0:
        return 1
    if report["requests_during_changes"] == 0:
        print("swap: no request completed while the changes were made", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
