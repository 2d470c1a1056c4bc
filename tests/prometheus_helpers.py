"""A real Prometheus for tests: started on a loopback port with its own storage folder, scraping
the given targets every second (optionally evaluating rule files), and PromQL through its HTTP API.

Needs the `prometheus` binary (Debian: `apt-get install -y prometheus`, 2.42); the tests that use
this skip without it (`PROMETHEUS_MISSING`). A scraped series is queryable about 5 s after start.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import httpx

PROMETHEUS_MISSING = shutil.which("prometheus") is None
SKIP_REASON = "no `prometheus` binary on PATH (Debian/Ubuntu: apt-get install -y prometheus)"


def prometheus_config(targets: list[str], rule_files: Sequence[Path] = (), job: str = "zooserve") -> str:
    """Scrape `targets` every second and evaluate `rule_files` every second."""
    quoted = ", ".join(f'"{t}"' for t in targets)
    text = "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
    if rule_files:
        text += "rule_files:\n" + "".join(f'  - "{Path(f).resolve()}"\n' for f in rule_files)
    return text + f"scrape_configs:\n  - job_name: {job}\n    static_configs:\n      - targets: [{quoted}]\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_prometheus(folder: Path, targets: list[str], rule_files: Sequence[Path] = ()) -> Iterator[str]:
    """A Prometheus scraping `targets` (host:port), its files under `folder`; yields its URL."""
    port = free_port()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "prometheus.yml").write_text(prometheus_config(targets, rule_files))
    log_path = folder / "prometheus.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            ["prometheus", f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_ready(proc, url, log_path)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited with {proc.returncode}:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"prometheus not ready in {timeout_s} s:\n{log_path.read_text()}")


def query(url: str, promql: str) -> dict:
    """The whole answer of an instant query (`status`, `data`, or `errorType`/`error`)."""
    return httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10).json()


def vector(url: str, promql: str) -> dict[tuple[tuple[str, str], ...], float]:
    """An instant vector query as {sorted labels (without __name__): value}; fails on an error."""
    body = query(url, promql)
    assert body["status"] == "success", (promql, body)
    assert body["data"]["resultType"] == "vector", (promql, body["data"]["resultType"])
    return {tuple(sorted((k, v) for k, v in r["metric"].items() if k != "__name__")): float(r["value"][1])
            for r in body["data"]["result"]}


def wait_for(url: str, promql: str, done: Callable[[dict], bool], timeout_s: float = 30) -> dict:
    """Poll `vector(url, promql)` until `done(result)`; the last result (the caller asserts on it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = vector(url, promql)
        if done(result) or time.monotonic() > deadline:
            return result
        time.sleep(0.5)
