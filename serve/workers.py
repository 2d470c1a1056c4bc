"""`zooserve serve --workers N`: N whole servers on one port, and the process that keeps them.

Why: one server process parses, decodes and answers every HTTP request on one event loop, and
under load that loop is the bound (bench/overload.py: ~0.9 of a core at 32x saturation, while
the model's thread waits). Several processes give several loops; each is a complete server (its
engines, batcher, pacer, watcher) on its own socket bound to the same address with SO_REUSEPORT,
and the kernel spreads new connections over the sockets that listen.

- A worker listens only once its start-up load is done (its lifespan waits for it; see
  serve/app.py), so a worker that was restarted after a crash takes no connection it would answer
  503; the others serve meanwhile.
- The supervisor holds the port (and the gRPC port, which the workers' gRPC servers share the same
  way) bound with SO_REUSEPORT but not listening (the kernel hands connections to listening sockets
  only): between restarts nothing else can take the port, and a second `zooserve serve` on it is
  refused by the plain bind tried first.
- A worker that exits is started again (at once after one that served 30 s, else after 1, 2, 4 ...
  up to 30 s), unless it failed to start (exit 3: a bad gRPC port, the address taken): then every
  worker is stopped and the supervisor exits 3, as a single server would.
- What a worker killed outright loses: the requests it had read, and the connections the kernel
  had queued at its socket but no process had taken yet (new ones keep arriving there until its
  socket closes, once its memory is unmapped: tens of ms on a busy machine). Linux resets those,
  unless `net.ipv4.tcp_migrate_req` is 1 (per network namespace), which hands them to a socket
  that still listens. Measured here with two listeners and 20 queued connections: 14 reset with
  0; all 20 taken by the survivor with 1. Clients see a reset before any answer, as with a single
  server that dies.
- SIGTERM, SIGINT or SIGHUP: every worker drains (as one server does: answers what it accepted,
  exits 0); the supervisor exits 0 when all of them did. A supervisor killed outright takes its
  workers with it: each asked Linux for a SIGTERM when its parent dies (PR_SET_PDEATHSIG), and
  drains.
- Metrics: each worker writes its counts to a folder the supervisor made and removes
  (serve/worker_metrics.py), so /metrics and the statistics routes, answered by whichever worker,
  show all of them.

- Repository load/unload: the worker asked carries it to every worker through a control log in
  the same folder, and a worker started later replays it (serve/worker_control.py).

What stays per worker, as it does per replica of a fleet (DESIGN section 9): a stateful sequence
(its state lives in the worker that started it: keep its requests on one keep-alive connection)
and the pacing of refused clients (per connection anyway).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from serve.settings import ServeSettings
from serve.worker_control import forget

log = logging.getLogger("zooserve.workers")

STARTUP_FAILURE = 3            # a server that could not start exits 3 (serve/cli.py)
POLL_S = 0.5
STABLE_S = 30.0                # a worker that lived this long is replaced at once
MAX_DELAY_S = 30.0


def next_delay(lived_s: float, previous_s: float) -> float:
    """Seconds before a dead worker's replacement starts: none after a worker that served a while,
    then 1, 2, 4 ... up to MAX_DELAY_S while replacements keep dying young (a model whose load
    crashes the process would otherwise start an interpreter twice a second, for ever)."""
    if lived_s >= STABLE_S:
        return 0.0
    return min(MAX_DELAY_S, max(1.0, 2.0 * previous_s))


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def reuseport_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to (host, port) with SO_REUSEPORT, not yet listening."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def reserve_port(host: str, port: int) -> socket.socket:
    """The port held for the workers: first a plain bind, which fails if any socket holds the port
    (another server, with SO_REUSEPORT or not); then a SO_REUSEPORT bind that the workers' sockets
    join. Another `zooserve serve` on the port then fails at its plain bind (only a program of the
    same user that sets SO_REUSEPORT itself could join). Port 0 picks a free one."""
    probe = socket.socket(_family(host), socket.SOCK_STREAM)
    try:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)    # a port in TIME_WAIT is free
        probe.bind((host, port))
        port = probe.getsockname()[1]
    finally:
        probe.close()
    return reuseport_socket(host, port)


def _stop_with_the_supervisor(supervisor_pid: int) -> None:
    """Ask Linux for a SIGTERM when the supervisor dies (even by SIGKILL), so that a worker drains
    and exits instead of serving on as an orphan nobody restarts or stops."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM))        # PR_SET_PDEATHSIG
    except (OSError, AttributeError):             # not Linux: the supervisor's own stop is all there is
        return
    if os.getppid() != supervisor_pid:            # it died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)


def run_worker(settings: ServeSettings, index: int, folder: str, supervisor_pid: int) -> None:
    """A worker process: one whole server on its own SO_REUSEPORT socket."""
    import sys

    from serve import logs
    from serve.cli import run_server

    _stop_with_the_supervisor(supervisor_pid)
    logs.configure(settings.log_level, settings.log_format)
    log.info("worker %d of %d (pid %d) loading, then serving on %s:%d", index + 1, settings.workers, os.getpid(),
             settings.host, settings.port)
    sys.exit(run_server(settings, shared_folder=Path(folder), sockets=[reuseport_socket(settings.host, settings.port)]))


class Supervisor:
    """Starts `settings.workers` servers on one port, starts again one that exits, stops them all."""

    def __init__(self, settings: ServeSettings):
        self.settings = settings
        self._spawn = multiprocessing.get_context("spawn")   # a fresh interpreter: no inherited threads or loop
        self._stop = threading.Event()
        self._processes: list = []
        self._due: dict[int, float] = {}       # worker index -> when its replacement may start
        self._delay: dict[int, float] = {}     # worker index -> the last wait before a replacement
        self.failed_to_start = False

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT; 0 when every worker drained and exited 0, 3 when one could not
        start, 1 otherwise."""
        settings = self.settings
        held = []
        try:
            for name in ("port", "grpc_port") if settings.grpc_port else ("port",):
                held.append(reserve_port(settings.host, getattr(settings, name)))
        except OSError as exc:
            log.error("cannot bind %s:%d: %s", settings.host, getattr(settings, name), exc)
            for sock in held:
                sock.close()
            return STARTUP_FAILURE
        settings = self.settings = settings.model_copy(update={"port": held[0].getsockname()[1]})
        folder = tempfile.mkdtemp(prefix="zooserve-workers-")
        previous = {sig: signal.signal(sig, lambda signum, frame: self._stop.set())
                    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
        try:
            log.info("%d workers on %s:%d (supervisor pid %d)", settings.workers, settings.host, settings.port,
                     os.getpid())
            self._processes = [self._start(index, folder) for index in range(settings.workers)]
            while not self._stop.wait(POLL_S):
                self._restart_exited(folder)
            return self._stop_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for sock in held:
                sock.close()
            shutil.rmtree(folder, ignore_errors=True)

    def _start(self, index: int, folder: str):
        process = self._spawn.Process(target=run_worker, args=(self.settings, index, folder, os.getpid()),
                                      name=f"zooserve-worker-{index + 1}")
        process.start()
        process.started_at = time.monotonic()
        return process

    def _restart_exited(self, folder: str) -> None:
        for index, process in enumerate(self._processes):
            if process.exitcode is None:
                continue
            if process.exitcode == STARTUP_FAILURE:
                log.error("worker %d (pid %d) could not start; stopping every worker", index + 1, process.pid)
                self.failed_to_start = True
                self._stop.set()
                return
            now = time.monotonic()
            if index not in self._due:
                forget(folder, process.pid)         # reaped now: its pid may be another process's soon
                lived = now - process.started_at
                self._delay[index] = next_delay(lived, self._delay.get(index, 0.0))
                self._due[index] = now + self._delay[index]
                log.error("worker %d (pid %d) exited with status %s after %.1f s; starting another in %.0f s",
                          index + 1, process.pid, process.exitcode, lived, self._delay[index])
            if now >= self._due[index]:
                del self._due[index]
                self._processes[index] = self._start(index, folder)

    def _stop_all(self) -> int:
        for process in self._processes:
            if process.exitcode is None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.settings.drain_timeout_s + 10.0
        codes = []
        for process in self._processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.exitcode is None:
                log.error("worker pid %d did not drain in time; killed", process.pid)
                process.kill()
                process.join()
            codes.append(process.exitcode)
        if self.failed_to_start:
            return STARTUP_FAILURE
        return 0 if all(code == 0 for code in codes) else 1
