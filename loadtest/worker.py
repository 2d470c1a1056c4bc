"""Worker side of a distributed locust run: loadtest/run.sh loads this file beside
loadtest/locustfile.py in every worker it starts, and remote workers are started the same way:

    .venv/bin/locust -f loadtest/locustfile.py,loadtest/worker.py --worker --master-host MASTER

It defines no user class. In a worker process (`--worker` on its command line) it does these:

1. Loads the user classes' data (sklearn digits, the co2 series, ...: each class's `prepare()`) while
   the file is imported, before locust creates the worker runner. The runner connects to the master
   and then fires locust's init event, where loadtest/locustfile.py would load the data; that blocks
   the worker's gevent loop for seconds, its heartbeats stop, and the master, which starts the test
   as soon as the workers have connected, declares them missing and stops the test ("The last worker
   went missing"). Loaded here, the data is already there when init fires (prepare() caches it).
2. Tallies the requests it sends: a worker hands its stats to the master every few seconds and
   resets them, so its own stats cannot say at the end what it sent. At exit it logs one line,

       zooserve worker <client id>: 812 requests, 0 failures

   counting what locust counts as requests (the "Aggregated" row: the SSE rows, TTFT and inter-token
   gaps, are not requests). Summed over the workers it equals the master's Aggregated Request Count
   (tests/loadtest/test_distributed_locust.py checks it).

3. Reports its stats to the master every REPORT_INTERVAL_S (0.5 s) instead of locust's 3 s
   (locust.runners.WORKER_REPORT_INTERVAL, which locust reads at each report and offers no option
   for). The master's history CSV is a row a second built from what the workers have reported so
   far: with reports every 3 s, two rows in three saw no new request and loadtest/plot.py drew a
   run at a steady rate as bursts of 3x separated by zeros.

4. Sends its last stats before the master writes its own. A headless master at the end of
   `--run-time` sends its workers "quit" and waits a fixed 0.5 s for their final reports
   (locust.runners.MasterRunner.quit); a worker slower than that on a busy machine had its last
   samples left out of the master's stats (seen in CI: 3,601 counted against 3,676 sent). run.sh
   loads this file into the master too: when the test stops, the master asks every worker to stop
   its users and report, and waits until each has answered (or `stop_timeout` + 5 s), before it
   quits. Its message, and the "done" answer, reach the master after the report they follow.

In a single-process run it does nothing.
"""

from __future__ import annotations

import logging
import sys
import time

import gevent
import locust.runners
from locust import events
from locust.runners import MasterRunner, WorkerRunner

IN_WORKER = "--worker" in sys.argv
TALLY = {"requests": 0, "failures": 0}
REPORT_INTERVAL_S = 0.5
FINAL_REPORT, REPORTED = "zooserve_final_report", "zooserve_reported"     # custom messages (4.)


def prepare_every_user_class() -> None:
    locustfile = sys.modules.get("locustfile")
    if locustfile is None or not hasattr(locustfile, "ZooserveUser"):
        raise RuntimeError("loadtest/worker.py is loaded after loadtest/locustfile.py: "
                           "locust -f loadtest/locustfile.py,loadtest/worker.py --worker ...")
    for value in vars(locustfile).values():
        if isinstance(value, type) and issubclass(value, locustfile.ZooserveUser) and not value.abstract:
            value.prepare()


def count_request(exception=None, **_kwargs) -> None:
    TALLY["requests"] += 1
    if exception is not None:
        TALLY["failures"] += 1


@events.init.add_listener
def tally_in_workers(environment, **_kwargs) -> None:
    if isinstance(environment.runner, WorkerRunner):
        environment.events.request.add_listener(count_request)


@events.quitting.add_listener
def report_tally(environment, **_kwargs) -> None:
    if isinstance(environment.runner, WorkerRunner):
        logging.getLogger("zooserve.loadtest").info("zooserve worker %s: %d requests, %d failures",
                                                    environment.runner.client_id, TALLY["requests"],
                                                    TALLY["failures"])


@events.init.add_listener
def final_reports_before_quit(environment, **_kwargs) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        def report(environment, msg, **_kw) -> None:
            runner.stop()                     # no user starts a request after this report
            runner._send_stats()              # locust's own final report (WorkerRunner, "quit")
            runner.send_message(REPORTED)
        runner.register_message(FINAL_REPORT, report)
    elif isinstance(runner, MasterRunner):
        reported: set[str] = set()
        runner.register_message(REPORTED, lambda environment, msg, **_kw: reported.add(msg.node_id))

        def wait_for_final_reports(environment, **_kw) -> None:
            workers = set(runner.clients.keys())
            runner.send_message(FINAL_REPORT)                  # to every worker
            deadline = time.monotonic() + environment.stop_timeout + 5
            while not workers <= reported and time.monotonic() < deadline:
                gevent.sleep(0.05)                             # the master's listener takes the reports meanwhile
            logging.getLogger("zooserve.loadtest").info("zooserve master: final reports from %d of %d workers",
                                                        len(workers & reported), len(workers))
        environment.events.test_stopping.add_listener(wait_for_final_reports)


if IN_WORKER:
    if not hasattr(locust.runners, "WORKER_REPORT_INTERVAL") or not hasattr(WorkerRunner, "_send_stats"):
        raise RuntimeError("this locust has no locust.runners.WORKER_REPORT_INTERVAL or no "
                           "WorkerRunner._send_stats: loadtest/worker.py was written for locust 2.47; "
                           "check how its workers pace and send their reports")
    locust.runners.WORKER_REPORT_INTERVAL = REPORT_INTERVAL_S
    prepare_every_user_class()
