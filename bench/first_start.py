"""How long `make serve` takes to answer on a first start (empty registry) and on a later one.

  1. runs `make serve` on a registry folder that does not exist yet (a temporary one, or
     --registry), on a free port, and polls the server every 0.25 s: the first /v2/health/ready
     answer, then the repository index until every demo model asked for has a READY version;
  2. once all of them serve (or --timeout-s passes), stops make with SIGTERM, as a supervisor
     would, and checks that no process of its tree is left;
  3. runs `make serve` again on the now full registry: seconds until /v2/health/ready answers 200
     with every model served (strict readiness), then stops it.

It prints one line per event and a summary with the machine's load average (1 min) sampled
during each phase: on a shared machine the figures are only as good as that load says.

  .venv/bin/python bench/first_start.py                      # every demo model (~10 min on 2 cores)
  .venv/bin/python bench/first_start.py --only mlp-digits rnn-forecast
  .venv/bin/python bench/first_start.py --setup              # also time `make setup` (instant once done)

`make setup` is skipped by default (make -o .venv/.setup-stamp): a fresh clone adds its ~3 min.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from training.cli import DEMO_MODELS, usable_cores  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Loads:
    """The 1-minute load average, sampled on each poll."""

    def __init__(self):
        self.samples: list[float] = []

    def sample(self) -> None:
        self.samples.append(os.getloadavg()[0])

    def summary(self) -> str:
        s = self.samples or [os.getloadavg()[0]]
        return (f"load avg (1 min) {min(s):.1f}-{max(s):.1f}, mean {sum(s) / len(s):.1f}, "
                f"on {usable_cores()} usable cores")


def start_make(registry: Path, port: int, demo_args: str, setup: bool, log_path: Path) -> subprocess.Popen:
    cmd = ["make", "--no-print-directory", *([] if setup else ["-o", ".venv/.setup-stamp"]), "serve",
           f"REGISTRY={registry}", f"PORT={port}", f"DEMO_ARGS={demo_args}"]
    log = open(log_path, "a")
    return subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)


def stop_make(make: subprocess.Popen) -> list[str]:
    """SIGTERM to make, as a supervisor would; returns the processes of its tree left afterwards."""
    tree = psutil.Process(make.pid).children(recursive=True)
    make.send_signal(signal.SIGTERM)
    try:
        make.wait(60)
    except subprocess.TimeoutExpired:
        make.kill()
    time.sleep(0.5)
    left = []
    for proc in tree:
        try:
            if proc.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(proc.cmdline()))
                proc.kill()
        except psutil.NoSuchProcess:
            pass
    return left


def ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def serving(client: httpx.Client) -> set[str]:
    """The models with a READY version (one repository index call: polling each model's ready route
    would log a refusal for every model not published yet)."""
    try:
        rows = client.post("/v2/repository/index", timeout=2).json()
    except (httpx.HTTPError, ValueError):
        return set()
    return {row["name"] for row in rows if row.get("state") == "READY"}


def first_start(args, registry: Path, port: int, models: list[str], log_path: Path) -> dict:
    loads = Loads()
    t0 = time.monotonic()
    make = start_make(registry, port, args.demo_args, args.setup, log_path)
    events: dict[str, float] = {}
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}")
    try:
        while time.monotonic() - t0 < args.timeout_s and make.poll() is None:
            loads.sample()
            now = time.monotonic() - t0
            if "ready" not in events and ok(client, "/v2/health/ready"):
                events["ready"] = now
                print(f"[first start] {now:6.1f} s  /v2/health/ready answers 200 "
                      f"({len(models)} models to come)", flush=True)
            if "ready" in events:
                for name in sorted(serving(client) - set(events)):
                    if name in models:
                        events[name] = time.monotonic() - t0
                        print(f"[first start] {events[name]:6.1f} s  {name} served", flush=True)
            if all(name in events for name in models):
                break
            time.sleep(0.25)
    finally:
        client.close()
        left = stop_make(make)
    served = [events[n] for n in models if n in events]
    return {"ready_s": events.get("ready"), "first_model_s": min(served, default=None),
            "all_models_s": max(served) if len(served) == len(models) else None,
            "served": {n: round(events[n], 1) for n in models if n in events},
            "missing": [n for n in models if n not in events], "left_running": left, "load": loads.summary()}


def later_start(args, registry: Path, port: int, models: list[str], log_path: Path) -> dict:
    loads = Loads()
    t0 = time.monotonic()
    make = start_make(registry, port, args.demo_args, args.setup, log_path)
    took = None
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}")
    try:
        while time.monotonic() - t0 < 120 and make.poll() is None:
            loads.sample()
            if ok(client, "/v2/health/ready") and serving(client) >= set(models):
                took = time.monotonic() - t0
                break
            time.sleep(0.1)
    finally:
        client.close()
        left = stop_make(make)
    return {"all_ready_s": took, "left_running": left, "load": loads.summary()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", default=None, help="registry folder to create (must not exist; default: a temp one)")
    p.add_argument("--only", metavar="NAME", nargs="+", default=None,
                   help="demo models to train, as `zooserve demo --only` takes them (default: all)")
    p.add_argument("--jobs", type=int, default=None, help="`zooserve demo --jobs` (default: its own, one per core)")
    p.add_argument("--setup", action="store_true", help="let make run `make setup` when it is out of date")
    p.add_argument("--timeout-s", metavar="SECONDS", type=float, default=1800,
                   help="give up on the first start after this many seconds (default 1800)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the figures here, as JSON")
    args = p.parse_args()
    models = [name for name, _, _ in DEMO_MODELS if args.only is None or name in args.only]
    args.demo_args = " ".join([*(["--only", *models] if args.only else []),
                               *(["--jobs", str(args.jobs)] if args.jobs else [])])
    work = Path(tempfile.mkdtemp(prefix="zooserve-first-start-"))
    registry = Path(args.registry) if args.registry else work / "registry"
    if registry.exists():
        raise SystemExit(f"{registry} exists: a first start needs a registry folder that does not")
    log_path = work / "make.log"
    print(f"[bench] make serve REGISTRY={registry} DEMO_ARGS={shlex.quote(args.demo_args)}; "
          f"make's output in {log_path}", flush=True)
    first = first_start(args, registry, free_port(), models, log_path)
    later = later_start(args, registry, free_port(), models, log_path) if not first["missing"] else None
    fmt = lambda s: "-" if s is None else f"{s:.1f} s"  # noqa: E731
    print(f"[bench] first start: ready {fmt(first['ready_s'])}, first model served {fmt(first['first_model_s'])}, "
          f"all {len(models)} served {fmt(first['all_models_s'])}; {first['load']}")
    if first["missing"]:
        print(f"[bench] not served within {args.timeout_s:.0f} s: {', '.join(first['missing'])}")
    if later is not None:
        print(f"[bench] later start: all {len(models)} served {fmt(later['all_ready_s'])}; {later['load']}")
    for phase, result in (("first", first), ("later", later)):
        if result and result["left_running"]:
            print(f"[bench] {phase} start left processes running (killed now): {result['left_running']}")
    if args.json:
        Path(args.json).write_text(json.dumps({"models": models, "first": first, "later": later}, indent=2))
    ok_all = not first["missing"] and later is not None and later["all_ready_s"] is not None \
        and not first["left_running"] and not later["left_running"]
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
