"""`zooserve serve --workers 2`: two whole servers on one port, kept by a supervisor (serve/workers.py).
Real processes, real sockets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sklearn.datasets import load_digits

from tests.conftest import ROOT, free_port, running_server, wait_for
from tests.faulty_models import add_slow_digits

TOKEN = "test-admin-token"


@pytest.fixture(scope="module")
def two_workers(demo_registry):
    grpc_port = free_port()
    with running_server(demo_registry, ["--workers", "2", "--admin-token", TOKEN,
                                        "--grpc-port", str(grpc_port)]) as server:
        server.grpc = f"127.0.0.1:{grpc_port}"
        both_listening(server.url)
        yield server


def both_listening(url: str, timeout_s: float = 120.0) -> None:
    """Until new connections have reached both workers. The server is ready when one worker is; a
    worker listens only once its start-up load is done (serve/workers.py), and on a loaded machine
    the second can take much longer: until then the kernel gives every connection to the first."""
    prefixes: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while len(prefixes) < 2 and time.monotonic() < deadline:
        answer = httpx.get(f"{url}/v2/health/ready", timeout=30)      # a new connection each time
        prefixes.add(answer.headers["x-request-id"][:16])
        time.sleep(0.02)
    assert len(prefixes) == 2, f"only one worker took connections within {timeout_s:.0f} s"


def infer_body() -> dict:
    digits = load_digits()
    image = (digits.images[0] / 16.0).astype(np.float32)
    return {"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32", "data": image.ravel().tolist()}]}


def worker_pids(supervisor_pid: int) -> list[int]:
    """The supervisor's worker processes (not multiprocessing's resource tracker)."""
    pids = []
    for task in os.listdir(f"/proc/{supervisor_pid}/task"):
        with open(f"/proc/{supervisor_pid}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    return [p for p in pids if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes()]


def merged(url: str) -> dict[tuple, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def ok_count(url: str) -> float:
    return merged(url).get(("zooserve_requests_total", (("model", "mlp-digits"), ("status", "200"),
                                                        ("version", "1"))), 0.0)


def settled_ok_count(url: str) -> float:
    """ok_count once every worker has published what it answered (each does every second)."""
    previous = ok_count(url)
    while True:
        time.sleep(1.2)
        now = ok_count(url)
        if now == previous:
            return now
        previous = now


def success_count(url: str) -> int:
    row, = httpx.get(f"{url}/v2/models/mlp-digits/stats", timeout=10).json()["model_stats"]
    return row["inference_stats"]["success"]["count"]


def fresh_connection_requests(url: str, n: int, after_a_kill: bool = False) -> list[httpx.Response]:
    """n requests, each on a new connection (the kernel picks a worker per connection); a connection
    refused while a worker's socket closes is tried again, an answer never is.

    after_a_kill: a connection reset before any answer is tried again too: it was queued at the
    killed worker's socket, which no process read (serve/workers.py says why)."""
    answers, body = [], infer_body()
    not_answered = (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError) if after_a_kill \
        else httpx.ConnectError
    for _ in range(n):
        for attempt in range(20):
            try:
                answers.append(httpx.post(f"{url}/v2/models/mlp-digits/infer", json=body, timeout=30))
                break
            except not_answered:
                time.sleep(0.05)
        else:
            raise AssertionError("no connection in 20 tries")
    return answers


def answered_by(answers: list[httpx.Response]) -> set[str]:
    """The workers that gave these answers: a request id the server made starts with its process's prefix."""
    return {r.headers["x-request-id"][:16] for r in answers}


def test_both_workers_answer_and_metrics_count_them_all(two_workers):
    assert len(worker_pids(two_workers.proc.pid)) == 2
    before, stats_before = ok_count(two_workers.url), success_count(two_workers.url)
    answers = fresh_connection_requests(two_workers.url, 60)
    assert [r.status_code for r in answers] == [200] * 60
    assert len(answered_by(answers)) == 2
    # whichever worker answers /metrics shows both workers' counts (each publishes within a second)
    wait_for(lambda: ok_count(two_workers.url) == before + 60, 10, "the merged count")
    assert merged(two_workers.url)[("zooserve_workers", ())] == 2
    # and so do the Triton statistics routes
    assert success_count(two_workers.url) == stats_before + 60


def test_a_load_or_unload_reaches_every_worker_and_a_replacement_keeps_it(two_workers):
    import tritonclient.grpc as tgrpc

    auth = {"Authorization": f"Bearer {TOKEN}"}
    # the token is checked first: a caller without it learns nothing
    assert httpx.post(f"{two_workers.url}/v2/repository/models/mlp-digits/unload", timeout=10).status_code == 401
    r = httpx.post(f"{two_workers.url}/v2/repository/models/mlp-digits/unload", headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    # answered once every worker has unloaded it: whichever worker a new connection reaches says so
    answers = fresh_connection_requests(two_workers.url, 24)
    assert {r.status_code for r in answers} == {404}, [r.text for r in answers if r.status_code != 404]
    assert all("unloaded" in r.json()["error"] for r in answers)
    assert len(answered_by(answers)) == 2
    # an unload of what no worker serves is refused as a one-process server refuses it
    r = httpx.post(f"{two_workers.url}/v2/repository/models/mlp-digits/unload", headers=auth, timeout=30)
    assert r.status_code == 404 and "already unloaded" in r.json()["error"], r.text

    # a worker started after the unload (a replacement) replays it before it listens
    pids = worker_pids(two_workers.proc.pid)
    os.kill(pids[0], signal.SIGKILL)
    wait_for(lambda: (lambda now: len(now) == 2 and pids[0] not in now)(worker_pids(two_workers.proc.pid)),
             30, "a replacement worker")
    wait_for(lambda: merged(two_workers.url)[("zooserve_workers", ())] == 2, 60, "two live workers")
    answers = fresh_connection_requests(two_workers.url, 24)
    assert {r.status_code for r in answers} == {404}
    assert len(answered_by(answers)) == 2

    # the stock gRPC client's load reaches both, the replacement included
    with tgrpc.InferenceServerClient(two_workers.grpc) as client:
        client.load_model("mlp-digits", headers={"authorization": f"Bearer {TOKEN}"})
    answers = fresh_connection_requests(two_workers.url, 24)
    assert [r.status_code for r in answers] == [200] * 24
    assert len(answered_by(answers)) == 2


def test_grpc_is_served_by_both_workers_on_its_one_port(two_workers):
    import tritonclient.grpc as tgrpc

    image = np.asarray(infer_body()["inputs"][0]["data"], np.float32).reshape(1, 1, 8, 8)
    before = settled_ok_count(two_workers.url)
    for _ in range(12):                  # a new channel each time: the kernel picks a worker per connection
        with tgrpc.InferenceServerClient(two_workers.grpc) as client:
            inp = tgrpc.InferInput("image", [1, 1, 8, 8], "FP32")
            inp.set_data_from_numpy(image)
            assert client.infer("mlp-digits", [inp]).as_numpy("logits").shape == (1, 10)
    wait_for(lambda: ok_count(two_workers.url) == before + 12, 10, "gRPC requests in the merged count")
    with tgrpc.InferenceServerClient(two_workers.grpc) as client:
        row, = client.get_inference_statistics("mlp-digits", as_json=True)["model_stats"]
    assert int(row["inference_stats"]["success"]["count"]) == success_count(two_workers.url)


def test_a_killed_worker_is_replaced_its_counts_kept_and_no_request_meets_a_loading_worker(two_workers):
    pids = worker_pids(two_workers.proc.pid)
    wait_for(lambda: ok_count(two_workers.url) > 0, 10, "a count")
    before = ok_count(two_workers.url)
    os.kill(pids[0], signal.SIGKILL)
    # the survivor serves while the replacement loads; the replacement listens only once loaded,
    # so not one of these meets a worker that would answer 503
    answers = fresh_connection_requests(two_workers.url, 100, after_a_kill=True)
    assert [r.status_code for r in answers] == [200] * 100
    replaced = wait_for(lambda: (lambda now: len(now) == 2 and pids[0] not in now and now)(
        worker_pids(two_workers.proc.pid)), 30, "a replacement worker")
    assert pids[1] in replaced
    wait_for(lambda: merged(two_workers.url)[("zooserve_workers", ())] == 2, 60, "two live workers")
    # the dead worker's requests stay counted: the total never goes down
    wait_for(lambda: ok_count(two_workers.url) >= before + 100, 10, "the counts")
    assert "exited with status -9" in two_workers.logs()


@pytest.fixture
def slow_registry(registry_copy, tmp_path):
    """mlp-digits plus slow-digits: ~50 ms a request, one at a time in each worker."""
    add_slow_digits(registry_copy, tmp_path, max_queue_wait_ms=5000)
    return registry_copy


def test_sigterm_drains_every_worker_and_exits_0(slow_registry):
    with running_server(slow_registry, ["--workers", "2"]) as server:
        body = infer_body()

        async def across_sigterm() -> tuple[list, float]:
            # one connection per client, so the kernel spreads them over both workers; ~400 ms of
            # work in all, most of it still queued when the signal comes
            clients = [httpx.AsyncClient(timeout=60) for _ in range(8)]
            try:
                async def one(client):
                    r = await client.post(f"{server.url}/v2/models/slow-digits/infer", json=body)
                    return r.status_code, time.monotonic()
                work = [asyncio.ensure_future(one(c)) for c in clients]
                # the signal once the first answer is back, not after a fixed 50 ms, which on a busy
                # machine came before the workers had accepted every connection (one still queued in a
                # listening socket is refused at the drain); each worker runs one ~50 ms request at a
                # time, so most are still in flight then
                await asyncio.wait(work, return_when=asyncio.FIRST_COMPLETED)
                signalled = time.monotonic()
                server.proc.send_signal(signal.SIGTERM)
                return await asyncio.gather(*work, return_exceptions=True), signalled
            finally:
                for c in clients:
                    await c.aclose()

        answers, signalled = asyncio.run(across_sigterm())
        assert server.proc.wait(60) == 0, server.logs()
    assert all(not isinstance(a, Exception) for a in answers), answers
    assert [status for status, _ in answers] == [200] * 8
    assert sum(t > signalled for _, t in answers) >= 4        # these were in flight at the signal


def test_workers_do_not_outlive_a_supervisor_killed_outright(demo_registry):
    with running_server(demo_registry, ["--workers", "2"]) as server:
        workers = worker_pids(server.proc.pid)
        assert len(workers) == 2
        server.proc.kill()                      # SIGKILL: no drain of its own, no signal forwarded
        server.proc.wait(10)

        def gone() -> bool:
            return all(not Path(f"/proc/{pid}").exists() or b"zombie" in _state(pid) for pid in workers)
        wait_for(gone, 30, "the orphaned workers to drain and exit")
        with socket.socket() as probe:          # and the port is free again
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(("127.0.0.1", server.port))


def _state(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/status").read_bytes()
    except OSError:
        return b"zombie"


def test_a_taken_port_is_refused_and_litserve_does_not_take_workers(demo_registry, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        run = subprocess.run([sys.executable, "-m", "serve.cli", "serve", "--registry", str(demo_registry),
                              "--port", str(port), "--workers", "2"], cwd=ROOT, capture_output=True, text=True,
                             timeout=60)
    assert run.returncode == 3, run.stderr
    assert "cannot bind" in run.stderr
    run = subprocess.run([sys.executable, "-m", "serve.cli", "serve", "--registry", str(demo_registry),
                          "--port", str(free_port()), "--workers", "2", "--frontend", "litserve"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "--workers 2" in run.stderr, run.stderr
