"""Classifier serving benchmark: the real server against its in-process ONNX Runtime ceiling.

One run:
  1. builds a registry with `zooserve demo` in a temp dir (or reuses `--registry`);
  2. measures the ceiling: in-process ONNX Runtime (1 intra-op thread, CPU) on the served version's
     `model.onnx`, rows/s at batch sizes 1, 4, 16, 32 (the sizes the dynamic batcher forms);
  3. starts `zooserve serve --threads 1` on a free loopback port and waits for it to be ready;
  4. drives it with a light closed-loop load generator (asyncio, raw keep-alive HTTP/1.1, precomputed
     request bytes: a real digit per request) at each concurrency level, after a short warm-up;
  5. per level reports throughput, p50/p99 latency, server CPU per request (/proc/<pid>/stat),
     mean batch size (/metrics deltas), non-200 count and the load generator's own CPU per request;
  6. prints the table, the ratio server/ceiling throughput, the targets, and stops the server.

    .venv/bin/python bench/classify.py [--model mlp-digits] [--registry DIR] [--duration 10]
                                       [--concurrency 1 16 64] [--out FILE.json]

Why not httpx/aiohttp: they cost 1.6-3.4 ms CPU per request, more than the server under test, and on a
2-core machine the client would be the bottleneck. This client costs a few tens of microseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
CEILING_BATCHES = (1, 4, 16, 32)
CPU_TARGET_MS = 0.4
REPEATS = 3
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- data -----------------------------------------------------------------------------------

def load_digits_images() -> np.ndarray:
    """The real sklearn digits, (N, 1, 8, 8) float32 with values 0..16."""
    from sklearn.datasets import load_digits

    return load_digits().images.reshape(-1, 1, 8, 8).astype(np.float32)


def infer_body(image: np.ndarray) -> bytes:
    """The KServe v2 JSON body for one (1, 1, 8, 8) digit."""
    import orjson

    return orjson.dumps({"inputs": [{"name": "image", "shape": [1, 1, 8, 8], "datatype": "FP32",
                                     "data": [float(v) for v in image.reshape(-1)]}]})


def http_request(path: str, host: str, port: int, body: bytes | None = None) -> bytes:
    """Raw HTTP/1.1 request bytes (keep-alive); POST with a JSON body when `body` is given."""
    if body is None:
        return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return head.encode() + body


# ---- ceiling --------------------------------------------------------------------------------

def measure_ceiling(onnx_path: Path, images: np.ndarray, seconds: float) -> dict[int, dict[str, float]]:
    """In-process ONNX Runtime throughput per batch size, best of 3: {batch: {rows_per_s, ms_per_batch}}."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    rng = np.random.default_rng(0)
    result: dict[int, dict[str, float]] = {}
    for batch in CEILING_BATCHES:
        # a pool of real batches, so the timing is not of one cached input
        pool = [images[rng.integers(0, len(images), batch)] for _ in range(64)]
        warm_until = time.perf_counter() + 0.1
        while time.perf_counter() < warm_until:
            session.run(None, {input_name: pool[0]})
        best = None
        for _ in range(REPEATS):                 # best of REPEATS: the machine is shared
            runs, started = 0, time.perf_counter()
            deadline = started + seconds / REPEATS
            while True:
                session.run(None, {input_name: pool[runs % len(pool)]})
                runs += 1
                now = time.perf_counter()
                if now >= deadline:
                    break
            per_batch = (now - started) / runs
            best = per_batch if best is None else min(best, per_batch)
        result[batch] = {"rows_per_s": batch / best, "ms_per_batch": best * 1000}
    return result


# ---- server ---------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zooserve_cmd() -> list[str]:
    """The `zooserve` entry point of this interpreter's venv, else `python -m serve.cli`."""
    script = Path(sys.executable).with_name("zooserve")
    return [str(script)] if script.exists() else [sys.executable, "-m", "serve.cli"]


def build_registry(root: Path) -> None:
    print(f"[bench] building the demo registry in {root} (trains two small models, ~30 s) ...", flush=True)
    started = time.perf_counter()
    proc = subprocess.run([*zooserve_cmd(), "demo", "--registry", str(root), "--only", "mlp-digits", "resnet-digits"], cwd=REPO_ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:])
        raise SystemExit(f"zooserve demo failed with exit code {proc.returncode}")
    print(f"[bench] registry built in {time.perf_counter() - started:.0f} s", flush=True)


def served_version(registry: Path, model: str) -> tuple[int, Path]:
    """The version an unversioned request gets (alias `stable`, else newest) and its model.onnx."""
    from model_registry import Registry

    reg = Registry(registry)
    version = reg.resolve(model, None)
    manifest = reg.manifest(model, version)
    artifact = manifest.artifacts.get("onnx") if isinstance(manifest.artifacts, dict) else None
    return version, reg.version_dir(model, version) / (artifact or "model.onnx")


class Server:
    """`zooserve serve` as a subprocess on a free loopback port."""

    def __init__(self, registry: Path, threads: int, log_path: Path, extra_args: list[str] | None = None,
                 cpus: set[int] | None = None):
        """`cpus`: the cores the server (and any worker process it starts) may run on; all by default."""
        self.host, self.port = "127.0.0.1", free_port()
        self.log_path = log_path
        self._log = open(log_path, "wb")
        cmd = [*zooserve_cmd(), "serve", "--registry", str(registry), "--host", self.host,
               "--port", str(self.port), "--threads", str(threads), "--log-level", "warning", *(extra_args or [])]
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=self._log, stderr=subprocess.STDOUT,
                                     preexec_fn=None if cpus is None else (lambda: os.sched_setaffinity(0, cpus)))

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def wait_ready(self, timeout_s: float = 120.0) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with code {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/v2/health/ready", timeout=2) as r:
                    if r.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def pids(self) -> list[int]:
        """The server process and its descendants (a server of several workers is a supervisor and
        its worker processes)."""
        found, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(child) for child in f.read().split())
            except OSError:            # it exited meanwhile
                continue
        return found

    @staticmethod
    def _stat_times(path: str) -> tuple[float, float]:
        try:
            with open(path) as f:
                stat = f.read()
        except OSError:
            return 0.0, 0.0
        fields = stat[stat.rindex(")") + 2:].split()   # after "pid (comm) "; fields[0] is field 3
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    def cpu_times(self) -> tuple[float, float]:
        """(utime, stime) of the server's processes (all threads), seconds."""
        times = [self._stat_times(f"/proc/{pid}/stat") for pid in self.pids()]
        return sum(u for u, _ in times), sum(s for _, s in times)

    def main_thread_cpu_seconds(self) -> float:
        """utime + stime of the server's main threads alone (the event loops'), seconds."""
        return sum(sum(self._stat_times(f"/proc/{pid}/task/{pid}/stat")) for pid in self.pids())

    def cpu_seconds(self) -> float:
        """utime + stime of the server process (all threads), seconds."""
        return sum(self.cpu_times())

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout_s: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine have used (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)       # idle + iowait
    return (sum(values[:8]) - idle) / CLK_TCK                    # guest time is already in user


# ---- load generator -------------------------------------------------------------------------

class Connection:
    """One keep-alive HTTP/1.1 connection; bodies must carry Content-Length (no chunked encoding)."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.retry_after: float | None = None

    async def open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.writer.transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def request(self, raw: bytes) -> tuple[int, bytes]:
        """Send precomputed request bytes; returns (status, body). Reconnects once if the server closed."""
        for attempt in (0, 1):
            if self.writer is None:
                await self.open()
            try:
                self.writer.write(raw)
                return await self._response()
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                self.close()
                if attempt:
                    raise ConnectionError(f"server closed the connection: {exc}") from exc
        raise AssertionError("unreachable")

    async def _response(self) -> tuple[int, bytes]:
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, close = 0, False
        self.retry_after = None          # seconds, from a 429's Retry-After (bench/overload.py honours it)
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"retry-after":
                self.retry_after = float(value)
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
            elif name == b"transfer-encoding":
                raise RuntimeError("chunked responses are not supported by this load generator")
        body = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, body

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


@dataclass
class LevelResult:
    concurrency: int
    seconds: float
    completed: int                  # responses (any status) received inside the window
    ok: int
    non_200: int
    non_200_statuses: dict[str, int]
    throughput_rps: float           # 200 responses per second
    p50_ms: float
    p99_ms: float
    server_cpu_ms_per_req: float
    server_sys_share: float         # kernel (stime) part of the server CPU
    client_cpu_ms_per_req: float
    other_load_cores: float         # CPU used by everything else on the machine meanwhile (cores)
    mean_batch: float | None
    executions: int
    loop_cpu_ms_per_req: float | None = None    # the server's main thread (its event loop) alone
    ceiling_batch: int | None = None
    ceiling_rows_per_s: float | None = None
    ratio_to_ceiling: float | None = None
    errors: list[str] = field(default_factory=list)


def metric_totals(text: str, model: str) -> dict[str, float]:
    """Sum of zooserve_inference_count_total / zooserve_execution_count_total for `model` (all versions)."""
    from prometheus_client.parser import text_string_to_metric_families

    totals = {"inference": 0.0, "execution": 0.0}
    wanted = {"zooserve_inference_count_total": "inference", "zooserve_execution_count_total": "execution"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = wanted.get(sample.name)
            if key and sample.labels.get("model") == model:
                totals[key] += sample.value
    return totals


async def scrape(conn: Connection, raw: bytes, model: str) -> dict[str, float]:
    status, body = await conn.request(raw)
    if status != 200:
        raise RuntimeError(f"GET /metrics answered {status}: {body[:200]!r}")
    return metric_totals(body.decode(), model)


async def run_level(server: Server, model: str, requests: list[bytes], concurrency: int,
                    warmup_s: float, duration_s: float, seed: int) -> LevelResult:
    """Closed loop: `concurrency` connections each send the next request as soon as the last answered."""
    host, port = server.host, server.port
    metrics_raw = http_request("/metrics", host, port)
    probe = Connection(host, port)
    phase = {"recording": False, "stop": False}
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    errors: list[str] = []

    async def worker(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        conn = Connection(host, port)
        try:
            while not phase["stop"]:
                raw = requests[rng.randrange(len(requests))]
                sent = time.perf_counter()
                try:
                    status, _ = await conn.request(raw)
                except (ConnectionError, OSError, asyncio.IncompleteReadError) as exc:
                    if phase["recording"]:
                        errors.append(f"{type(exc).__name__}: {exc}")
                        statuses[-1] = statuses.get(-1, 0) + 1
                    conn.close()
                    await asyncio.sleep(0.01)
                    continue
                if phase["recording"] and not phase["stop"]:
                    statuses[status] = statuses.get(status, 0) + 1
                    if status == 200:
                        latencies.append(time.perf_counter() - sent)
        finally:
            conn.close()

    tasks = [asyncio.create_task(worker(i)) for i in range(concurrency)]
    try:
        await asyncio.sleep(warmup_s)
        before = await scrape(probe, metrics_raw, model)
        busy0 = machine_busy_seconds()
        loop0 = server.main_thread_cpu_seconds()
        cpu0, client0, t0 = server.cpu_times(), time.process_time(), time.perf_counter()
        phase["recording"] = True
        await asyncio.sleep(duration_s)
        phase["stop"] = True
        cpu1, client1, t1 = server.cpu_times(), time.process_time(), time.perf_counter()
        loop1 = server.main_thread_cpu_seconds()
        busy1 = machine_busy_seconds()
        after = await scrape(probe, metrics_raw, model)
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=60)
    finally:
        for t in tasks:
            t.cancel()
        probe.close()

    seconds = t1 - t0
    user_s, sys_s = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    completed = sum(statuses.values())
    ok = statuses.get(200, 0)
    lat = np.sort(np.asarray(latencies)) * 1000 if latencies else np.asarray([float("nan")])
    executions = int(after["execution"] - before["execution"])
    rows = after["inference"] - before["inference"]
    non_200 = {str(k): v for k, v in sorted(statuses.items()) if k != 200}
    return LevelResult(
        concurrency=concurrency, seconds=seconds, completed=completed, ok=ok,
        non_200=completed - ok, non_200_statuses=non_200,
        throughput_rps=ok / seconds,
        p50_ms=float(np.percentile(lat, 50)), p99_ms=float(np.percentile(lat, 99)),
        server_cpu_ms_per_req=(user_s + sys_s) * 1000 / max(completed, 1),
        server_sys_share=sys_s / (user_s + sys_s) if user_s + sys_s else 0.0,
        client_cpu_ms_per_req=(client1 - client0) * 1000 / max(completed, 1),
        other_load_cores=max(0.0, (busy1 - busy0) - (user_s + sys_s) - (client1 - client0)) / seconds,
        mean_batch=rows / executions if executions else None, executions=executions,
        loop_cpu_ms_per_req=(loop1 - loop0) * 1000 / max(completed, 1),
        errors=errors[:5],
    )


# ---- report ---------------------------------------------------------------------------------

def closest_batch(mean_batch: float | None) -> int:
    if mean_batch is None:
        return 1
    return min(CEILING_BATCHES, key=lambda b: (abs(b - mean_batch), b))


def environment() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("onnxruntime", "torch", "numpy", "fastapi", "uvicorn"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    if versions["onnxruntime"] == "not installed":
        try:
            versions["onnxruntime"] = "gpu " + version("onnxruntime-gpu")
        except PackageNotFoundError:
            pass
    return {"python": platform.python_version(), "platform": platform.platform(),
            "cpus": str(os.cpu_count()), **versions}


def print_report(model: str, version: int, ceiling: dict[int, dict[str, float]], levels: list[LevelResult]) -> None:
    print()
    print(f"Ceiling: in-process ONNX Runtime, {model} v{version}, 1 intra-op thread, CPU")
    print("| batch | rows/s | ms/batch |")
    print("|---:|---:|---:|")
    for b, c in ceiling.items():
        print(f"| {b} | {c['rows_per_s']:,.0f} | {c['ms_per_batch']:.3f} |")
    print()
    print(f"Server: zooserve serve --threads 1, {model}, closed loop, one real digit per request")
    print("| concurrency | req/s | p50 ms | p99 ms | server CPU ms/req (kernel part) | mean batch | non-200 | "
          "client CPU ms/req | other load (cores) | ceiling rows/s (batch) | server/ceiling |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in levels:
        mb = f"{r.mean_batch:.2f}" if r.mean_batch is not None else "-"
        ratio = f"{r.ratio_to_ceiling:.1%}" if r.ratio_to_ceiling is not None else "-"
        print(f"| {r.concurrency} | {r.throughput_rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | "
              f"{r.server_cpu_ms_per_req:.3f} ({r.server_sys_share:.0%}) | {mb} | {r.non_200} | {r.client_cpu_ms_per_req:.3f} | {r.other_load_cores:.2f} | "
              f"{r.ceiling_rows_per_s:,.0f} ({r.ceiling_batch}) | {ratio} |")
    for r in levels:
        if r.non_200_statuses:
            print(f"  concurrency {r.concurrency}: non-200 statuses {r.non_200_statuses} {r.errors}")
    print()
    worst = max(r.server_cpu_ms_per_req for r in levels)
    cpu_ok = worst <= CPU_TARGET_MS
    print(f"Target server CPU <= {CPU_TARGET_MS} ms/request: {'met' if cpu_ok else 'MISSED'} "
          f"(per level: {', '.join(f'{r.server_cpu_ms_per_req:.3f}' for r in levels)} ms)")
    batches = [r.mean_batch or 0.0 for r in levels]
    grows = all(b2 >= b1 for b1, b2 in zip(batches, batches[1:])) and batches[-1] > batches[0]
    print(f"Target mean batch grows with concurrency: {'met' if grows else 'MISSED'} "
          f"(per level: {', '.join(f'{b:.2f}' for b in batches)})")


async def drive(server: Server, model: str, requests: list[bytes], levels: list[int],
                warmup_s: float, duration_s: float, seed: int) -> list[LevelResult]:
    results = []
    for i, c in enumerate(levels):
        print(f"[bench] concurrency {c}: {warmup_s:.1f} s warm-up + {duration_s:.1f} s ...", flush=True)
        r = await run_level(server, model, requests, c, warmup_s, duration_s, seed + i)
        print(f"[bench]   {r.throughput_rps:,.0f} req/s, p50 {r.p50_ms:.2f} ms, p99 {r.p99_ms:.2f} ms, "
              f"server CPU {r.server_cpu_ms_per_req:.3f} ms/req, mean batch "
              f"{(r.mean_batch or 0):.2f}, non-200 {r.non_200}", flush=True)
        results.append(r)
    return results


def event_loop_factory(choice: str):
    """uvloop (installed with uvicorn[standard]) halves the load generator's CPU; asyncio otherwise."""
    if choice in ("auto", "uvloop"):
        try:
            import uvloop

            return uvloop.new_event_loop, f"uvloop {uvloop.__version__}"
        except ImportError:
            if choice == "uvloop":
                raise SystemExit("--loop uvloop: uvloop is not installed")
    return None, "asyncio"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each default said once: not again after a help that says it, none for a flag that is off or
    unset by default, and a list as it is typed (1 16 64); no line broken at a hyphen."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or any(action.default is off for off in (None, False, argparse.SUPPRESS)):
            return text
        default = " ".join(map(str, action.default)) if isinstance(action.default, list) else "%(default)s"
        return f"{text} (default: {default})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)   # keep mlp-digits whole


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="mlp-digits",
                   help="classifier to benchmark, in the registry (its default version: the stable alias, else the "
                        "newest)")
    p.add_argument("--registry", type=Path, default=None,
                   help="existing registry holding --model (default: a temp one built with `zooserve demo --only "
                        "mlp-digits resnet-digits`, ~30 s)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per concurrency level")
    p.add_argument("--warmup", type=float, default=1.5, help="warm-up seconds before each level")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64], help="closed-loop connections per level")
    p.add_argument("--ceiling-seconds", type=float, default=1.0, help="seconds per batch size for the ceiling")
    p.add_argument("--threads", type=int, default=1, help="server intra-op threads (--threads of zooserve serve)")
    p.add_argument("--seed", type=int, default=0, help="seed of the order in which each connection picks "
                   "its requests")
    p.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto",
                   help="load generator event loop (auto: uvloop when installed)")
    p.add_argument("--keep", action="store_true", help="keep the temp registry and server log")
    args = p.parse_args(argv)

    workdir = Path(tempfile.mkdtemp(prefix="zooserve-bench-"))
    registry = args.registry
    server: Server | None = None
    try:
        if registry is None:
            registry = workdir / "registry"
            build_registry(registry)
        elif not registry.is_dir():
            raise SystemExit(f"--registry {registry} is not a directory")
        try:
            version, onnx_path = served_version(registry, args.model)
        except LookupError as exc:
            raise SystemExit(f"bench: {exc}") from None
        images = load_digits_images()

        print(f"[bench] ceiling: ONNX Runtime in-process on {onnx_path} ...", flush=True)
        ceiling = measure_ceiling(onnx_path, images, args.ceiling_seconds)
        for b, c in ceiling.items():
            print(f"[bench]   batch {b:>2}: {c['rows_per_s']:,.0f} rows/s ({c['ms_per_batch']:.3f} ms/batch)")

        server = Server(registry, args.threads, workdir / "server.log")
        ready_s = server.wait_ready()
        print(f"[bench] server pid {server.proc.pid} ready on {server.url} after {ready_s:.1f} s", flush=True)
        path = f"/v2/models/{args.model}/infer"
        requests = [http_request(path, server.host, server.port, infer_body(img)) for img in images]
        with urllib.request.urlopen(urllib.request.Request(
                server.url + path, data=infer_body(images[0]), headers={"Content-Type": "application/json"})) as r:
            answer = json.loads(r.read())
            served = r.headers.get("x-model-version")
        if answer["outputs"][0]["shape"] != [1, 10] or served != str(version):
            raise RuntimeError(f"unexpected answer (x-model-version {served}, expected {version}): {answer}")

        loop_factory, loop_name = event_loop_factory(args.loop)
        print(f"[bench] load generator on the {loop_name} event loop", flush=True)
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            levels = runner.run(drive(server, args.model, requests, args.concurrency, args.warmup,
                                      args.duration, args.seed))
        for r in levels:
            r.ceiling_batch = closest_batch(r.mean_batch)
            r.ceiling_rows_per_s = ceiling[r.ceiling_batch]["rows_per_s"]
            r.ratio_to_ceiling = r.throughput_rps / r.ceiling_rows_per_s
        print_report(args.model, version, ceiling, levels)

        code = server.stop()
        server_log = server.log_tail(2000).strip()
        server = None
        if code not in (0, None, -signal.SIGTERM):   # uvicorn re-raises SIGTERM after a clean shutdown
            print(f"[bench] warning: server exited with code {code}", file=sys.stderr)
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "environment": {**environment(), "client_loop": loop_name}, "model": args.model, "version": version,
                "duration_s": args.duration, "warmup_s": args.warmup,
                "ceiling": {str(b): c for b, c in ceiling.items()},
                "levels": [asdict(r) for r in levels],
                "server_exit_code": code, "server_log_tail": server_log,
            }, indent=2))
            print(f"[bench] wrote {args.out}")
        return 0
    finally:
        if server is not None:
            server.stop()
        if args.keep:
            print(f"[bench] kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
