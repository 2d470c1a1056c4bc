"""loadtest/run.sh --workers: a real locust master and two real workers (separate processes, on
loopback) against a real server. The master's stats must be the sum of what each worker sent, and
each worker must really have sent requests (its own tally, loadtest/worker.py, and the
server's /metrics, parsed with prometheus_client's parser).

locust patches sockets with gevent, so it only ever runs as subprocesses, never inside pytest."""

from __future__ import annotations

import csv
import os
import re
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
TALLY = re.compile(r"zooserve worker (\S+): (\d+) requests, (\d+) failures")


def answered(url: str, model: str) -> int:
    """Requests the server answered for `model`, every status, from its /metrics."""
    text = urllib.request.urlopen(f"{url}/metrics", timeout=10).read().decode()
    return int(sum(sample.value for family in text_string_to_metric_families(text)
                   for sample in family.samples
                   if sample.name == "zooserve_requests_total" and sample.labels.get("model") == model))


def has_matplotlib() -> bool:
    import importlib.util

    return importlib.util.find_spec("matplotlib") is not None


def loadtest_env(out: Path) -> dict[str, str]:
    return {**os.environ, "ZOOSERVE_LOADTEST_MODELS": "mlp-digits", "ZOOSERVE_LOADTEST_OUT": str(out),
            "LOCUST_ARGS": "ClassifierUser"}


def test_a_master_and_two_workers_aggregate_both_workers_requests(demo_registry, start_server, tmp_path):
    port = free_port()
    with start_server(demo_registry) as server:
        before = answered(server.url, "mlp-digits")
        proc = subprocess.run(["bash", "loadtest/run.sh", "--workers", "2", "--master-port", str(port),
                               server.url, "4", "6s"], cwd=ROOT, env=loadtest_env(tmp_path),
                              capture_output=True, text=True, timeout=120)
        sent_to_server = answered(server.url, "mlp-digits") - before
    output = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, output
    assert "from 2 local and 0 remote workers (master on 127.0.0.1:" in proc.stdout, output

    (stats,) = tmp_path.glob("*_stats.csv")                 # written by the master alone
    with stats.open() as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = int(rows["Aggregated"]["Request Count"])
    assert total > 20 and rows["Aggregated"]["Failure Count"] == "0", rows["Aggregated"]
    assert int(rows["/v2/models/mlp-digits/infer"]["Request Count"]) == total

    logs = sorted(tmp_path.glob("*_worker-*.log"))
    assert [p.name.rsplit("_", 1)[1] for p in logs] == ["worker-1.log", "worker-2.log"]
    tallies = []
    for log in logs:
        found = TALLY.findall(log.read_text())
        assert len(found) == 1, f"{log.name} has no request tally:\n{log.read_text()[-2000:]}"
        tallies.append(found[0])
    assert tallies[0][0] != tallies[1][0], "the two logs are one worker's"           # distinct client ids
    per_worker = [int(requests) for _, requests, _ in tallies]
    assert all(n > 5 for n in per_worker), per_worker                 # each worker drove load
    assert [failures for _, _, failures in tallies] == ["0", "0"]
    # the master's stats are exactly the workers' requests, merged: it waited for their last reports
    # (locust alone waits a fixed 0.5 s, and a slow worker's last samples were lost: loadtest/worker.py)
    assert "zooserve master: final reports from 2 of 2 workers" in output, output
    assert sum(per_worker) == total, (per_worker, total)
    # and the server saw them: every counted request was answered; at most one request per user can
    # have been cut at the stop, answered by the server but never counted by locust
    assert total <= sent_to_server <= total + 4, (sent_to_server, total)
    assert f"run.sh: {total} requests, 0 failures" in proc.stdout, output
    for k, n in ((1, per_worker[0]), (2, per_worker[1])):
        assert re.search(rf"run.sh: worker {k}: exit status 0; zooserve worker \S+: {n} requests", proc.stdout)
    # the history (a row a second, drawn by plot.py) grows every second while all users run: the
    # workers report every 0.5 s (loadtest/worker.py), not locust's 3 s, which left two rows in three flat
    (history,) = tmp_path.glob("*_stats_history.csv")
    with history.open() as f:
        steady = [int(row["Total Request Count"]) for row in csv.DictReader(f)
                  if row["Name"] == "Aggregated" and row["User Count"] == "4"]
    assert len(steady) >= 4, steady
    assert all(later > earlier for earlier, later in zip(steady, steady[1:])), steady
    assert len(list(tmp_path.glob("*.png"))) == (1 if has_matplotlib() else 0)


def test_a_worker_that_never_comes_ends_the_run_with_an_error_and_no_load(tmp_path):
    """One local worker, one remote worker that never connects: the master gives up after
    --workers-wait seconds, exits non-zero, and run.sh says so; the local worker is ended too."""
    with socket.socket() as idle:                          # a host URL nothing may be sent to
        idle.bind(("127.0.0.1", 0))
        host = f"http://127.0.0.1:{idle.getsockname()[1]}"
        proc = subprocess.run(["bash", "loadtest/run.sh", "--workers", "1", "--remote-workers", "1",
                               "--master-bind-host", "127.0.0.1", "--master-port", str(free_port()),
                               "--workers-wait", "3", host, "2", "5s"], cwd=ROOT, env=loadtest_env(tmp_path),
                              capture_output=True, text=True, timeout=90)
    output = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode != 0, output
    assert "locust exited with status" in proc.stderr, output
    assert re.search(r"(?i)gave up waiting for workers|waiting for workers", output), output
    assert "run.sh: worker 1: exit status" in proc.stdout, output        # reaped, not left running


def test_bad_worker_options_are_refused_before_locust_starts(tmp_path):
    for args, message in ((["--workers", "two"], "--workers takes a whole number, got 'two'"),
                          (["--master-port", "70000"], "--master-port takes a port 1-65535"),
                          (["--remote-workers"], "--remote-workers needs a value"),
                          (["--workers", "1", "a", "b", "c", "d"], "at most three arguments")):
        proc = subprocess.run(["bash", "loadtest/run.sh", *args], cwd=ROOT, env=loadtest_env(tmp_path),
                              capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr)
        assert not list(tmp_path.iterdir()), args                             # nothing started
